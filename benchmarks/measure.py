"""What the harness measures on a model file, always against the fp32 original.

- Size: bytes on disk and gzip -9 bytes, each as a ratio to the original's.
- Accuracy on the validation samples (never the calibration ones), through
  ``onnxslim_cnn.validate.compare``: top-1 of both and Δtop-1 = top1(candidate) −
  top1(fp32) in points, top-1 agreement with fp32, max |y − r|, mean cosine.
- Latency at batch 1 on the CPU execution provider, ORT_ENABLE_ALL, for each intra-op
  thread count: the fp32 and the candidate session live in one process and run
  ALTERNATELY (who goes first alternates too), so drift on a shared machine hits both;
  after warm-up, ``ratio`` = median over runs of candidate time / the fp32 time of the
  same round. Thread spinning is off for both sessions so that one session's idle
  workers do not steal the cores from the other's run.
- Start-up: median wall time of creating a session from the file.
- MACs: multiply-accumulates of the Conv/Gemm/MatMul nodes (and their QLinear/Integer
  forms) of the file at batch 1, from onnx shape inference: output elements times the
  reduced length (C_in/group * kh * kw, or K). Decode subgraphs are not counted (they
  are folded at load); ``macs_ratio`` is against the original's.
- int8 kernels: the model onnxruntime actually runs (written through
  ``SessionOptions.optimized_model_filepath`` at ORT_ENABLE_ALL), counting convolutions
  that run as int8 (QLinearConv, ConvInteger, com.microsoft QLinear*Conv) against those
  that run in float (Conv in any domain, FusedConv).
"""

from __future__ import annotations

import gzip
import hashlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxslim_cnn import validate
from onnxslim_cnn.calibration import Dataset

FLOAT_CONVS = {"Conv", "FusedConv", "NhwcFusedConv"}
INT8_CONVS = {"QLinearConv", "ConvInteger", "NhwcQLinearConv"}


@dataclass(frozen=True)
class Timing:
    """How long latency and start-up are measured."""

    threads: tuple[int, ...] = (1, 2)
    runs: int = 30
    warmup: int = 5
    startups: int = 3


def session(path: Path, threads: int = 1, optimized: Path | None = None) -> ort.InferenceSession:
    """A CPU session at ORT_ENABLE_ALL, sequential, without thread spinning."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sizes(path: Path, ref: Path) -> dict:
    """File and gzip -9 sizes of ``path``, their ratios to ``ref``'s, and its sha256."""
    raw, ref_raw = path.read_bytes(), ref.read_bytes()
    packed, ref_packed = len(gzip.compress(raw, 9)), len(gzip.compress(ref_raw, 9))
    return {"size_bytes": len(raw), "size_ratio": len(raw) / len(ref_raw),
            "gzip_bytes": packed, "gzip_ratio": packed / ref_packed,
            "sha256": hashlib.sha256(raw).hexdigest()}


def outputs(sess: ort.InferenceSession, batches: list[dict]) -> list[np.ndarray]:
    """Every output of ``sess`` over ``batches``, concatenated along the batch axis."""
    names = [i.name for i in sess.get_inputs()]
    runs = [sess.run(None, {n: b[n] for n in names}) for b in batches]
    return [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]


def accuracy(ref_names: list[str], ref: list[np.ndarray], cand: list[np.ndarray],
             labels: np.ndarray | None) -> dict:
    """Accuracy metrics of ``cand`` against ``ref`` (outputs matched by position)."""
    if len(cand) != len(ref):
        raise ValueError(f"{len(cand)} outputs where the original has {len(ref)}")
    metrics = validate.compare(dict(zip(ref_names, ref, strict=True)),
                               dict(zip(ref_names, cand, strict=True)), labels)
    drop = metrics.top1_drop
    return {"top1_fp32": metrics.top1_ref, "top1": metrics.top1,
            "delta_top1": None if drop is None else -drop,
            "top1_agreement": metrics.top1_agreement, "max_abs": metrics.max_abs,
            "cosine": metrics.cosine, "sqnr_db": metrics.sqnr_db}


def latency(ref: Path, cand: Path, feed: dict, threads: int, timing: Timing) -> dict:
    """Alternating batch-1 latency of ``cand`` and ``ref`` (medians, ms, and the ratio)."""
    pair = (session(ref, threads), session(cand, threads))
    for _ in range(timing.warmup):
        for sess in pair:
            sess.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(timing.runs):
        for which in ((0, 1) if round_ % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            pair[which].run(None, feed)
            times[which].append(time.perf_counter() - start)
    ratios = [c / r for r, c in zip(*times, strict=True)]
    return {"fp32_ms": 1e3 * statistics.median(times[0]),
            "ms": 1e3 * statistics.median(times[1]), "ratio": statistics.median(ratios)}


def startup_ms(path: Path, repeats: int) -> float:
    """Median wall time of creating a session for ``path``, in milliseconds."""
    spans = []
    for _ in range(repeats):
        start = time.perf_counter()
        session(path)
        spans.append(time.perf_counter() - start)
    return 1e3 * statistics.median(spans)


def conv_kernels(path: Path) -> dict:
    """Counts of int8 and float convolutions in the graph onnxruntime runs for ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, optimized=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    kinds = [_conv_kind(node.op_type) for node in graph.node]
    int8, floating = kinds.count("int8"), kinds.count("float")
    total = int8 + floating
    return {"int8_convs": int8, "float_convs": floating,
            "int8_conv_fraction": int8 / total if total else None}


def _conv_kind(op_type: str) -> str | None:
    if op_type in INT8_CONVS or (op_type.startswith("QLinear") and "Conv" in op_type):
        return "int8"
    return "float" if op_type in FLOAT_CONVS else None


# op -> input index of the weight whose dims 1.. give the reduced length (Conv family),
# or of the left operand whose last dim is it (MatMul family)
CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
MATMUL_LEFT = {"MatMul": 0, "Gemm": 0, "MatMulInteger": 0, "QLinearMatMul": 0}


def macs(path: Path, feed: dict[str, np.ndarray]) -> int | None:
    """Multiply-accumulates of the model at ``path`` for inputs shaped like ``feed`` (see
    the module docstring); None when shapes cannot be inferred for some layer."""
    model = onnx.load(str(path))
    del model.graph.value_info[:]  # shapes of another batch size would be kept
    # below IR 4 onnx infers from initializers only when they are also graph inputs,
    # which converted old models (onnxruntime's and NNCF's outputs of them) do not list
    model.ir_version = max(model.ir_version, 4)
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    for inp in model.graph.input:
        if inp.name in feed:
            dims = inp.type.tensor_type.shape.dim
            for dim, size in zip(dims, feed[inp.name].shape, strict=False):
                dim.Clear()
                dim.dim_value = size
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a model onnx cannot infer (custom domains): no figure
        return None
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
            shapes[info.name] = [d.dim_value for d in tensor.shape.dim]
    total = 0
    for node in model.graph.node:
        if node.op_type in CONV_WEIGHT:
            weight = shapes.get(node.input[CONV_WEIGHT[node.op_type]])
            reduced = None if weight is None else int(np.prod(weight[1:]))
        elif node.op_type in MATMUL_LEFT:
            left = shapes.get(node.input[0])
            trans = node.op_type == "Gemm" and any(a.name == "transA" and a.i
                                                   for a in node.attribute)
            reduced = None if not left else left[0 if trans else -1]
        else:
            continue
        out = shapes.get(node.output[0])
        if reduced is None or out is None:
            return None
        total += int(np.prod(out)) * reduced
    return total


@dataclass
class Reference:
    """The fp32 original and its outputs on the validation samples."""

    path: Path
    data: Dataset
    names: list[str]
    values: list[np.ndarray]
    macs: int | None = None

    @classmethod
    def of(cls, path: Path, data: Dataset) -> Reference:
        sess = session(path, threads=2)
        ref = cls(path, data, [o.name for o in sess.get_outputs()], outputs(sess, data.val))
        ref.macs = macs(path, ref.batch1)
        return ref

    @property
    def batch1(self) -> dict:
        return {name: value[:1] for name, value in self.data.val[0].items()}


def candidate(ref: Reference, path: Path, timing: Timing) -> dict:
    """Every measurement of the model at ``path`` against ``ref``."""
    values = outputs(session(path, threads=2), ref.data.val)
    row = sizes(path, ref.path)
    row.update(accuracy(ref.names, ref.values, values, ref.data.val_labels))
    row["latency"] = {str(t): latency(ref.path, path, ref.batch1, t, timing)
                      for t in timing.threads}
    row["startup_ms"] = startup_ms(path, timing.startups)
    row.update(conv_kernels(path))
    row["macs"] = macs(path, ref.batch1)
    row["macs_ratio"] = row["macs"] / ref.macs if row["macs"] and ref.macs else None
    return row
