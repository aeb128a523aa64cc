"""Shared test helpers: tiny graphs from ONNX text with seeded weights, onnxruntime runs.

Every comparison helper takes its tolerance explicitly: there is no default tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxslim_cnn import validate
from onnxslim_cnn.manager import export_graph, import_graph

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"


def make_model(text: str, weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Parse an ONNX text model and attach ``weights`` as initializers; checker-valid."""
    model = onnx.parser.parse_model(text)
    for name, value in (weights or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model)
    return model


def make_float16(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``make_model`` of the float16 twin of a float32 text model: ``float[`` tensors
    become ``float16[`` and float32 weights float16."""
    return make_model(text.replace("float[", "float16["), {
        k: v.astype(np.float16) if np.asarray(v).dtype == np.float32 else v
        for k, v in weights.items()})


def rand(shape, seed: int, scale: float = 1.0, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def positive(shape, seed: int, low: float = 0.5, high: float = 1.5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Seeded normal inputs for every real input (dynamic dims -> ``batch``)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in inp.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        out[inp.name] = rng.standard_normal(dims).astype(dtype)
    return out


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray],
        optimization: str = "disable") -> dict[str, np.ndarray]:
    runner = validate.Runner(model, optimization)
    try:
        return runner.run_batch(feed)
    finally:
        runner.close()


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, *, rtol: float,
                        atol: float, seed: int = 0) -> None:
    """Both models give the same outputs on seeded inputs within rtol/atol."""
    feed = feeds(before, seed)
    ref, got = run(before, feed), run(after, feed)
    assert set(ref) <= set(got), f"outputs lost: {set(ref) - set(got)}"
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=name)


def apply_pass(pass_cls, model: onnx.ModelProto, options: dict | None = None, ctx=None):
    """Run one pass the way the manager does (import, run, cleanup, export).

    Returns (new_model, PassResult).
    """
    from onnxslim_cnn.passes.base import PassContext

    graph = import_graph(model)
    result = pass_cls(options).run(graph, ctx or PassContext())
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return export_graph(graph, model), result


def layer_params(model: onnx.ModelProto, feed: dict[str, np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """Every weight and bias a Conv/Gemm/MatMul reads, as onnxruntime computes it (a
    decode subgraph's output, or the initializer), by tensor name."""
    names = {i for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
             for i in n.input[1:] if i}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n)
                              for n in sorted(names - set(inits) - known))
    out = run(probe, feeds(model) if feed is None else feed)
    return {n: inits[n] if n in inits else out[n] for n in names}


def io_types(model: onnx.ModelProto) -> set[int]:
    """Element types (onnx.TensorProto enums) of the graph's real inputs and outputs."""
    inits = {i.name for i in model.graph.initializer}
    return {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
            if v.name not in inits}


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs: the one it writes to
    ``optimized_model_filepath`` with every optimisation on (as deployed), after it
    folded what it could at session creation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(options.optimized_model_filepath))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def shared_model(name: str) -> Path:
    """Path of ``../shared/models/<name>/model.onnx``; skips the test when absent."""
    import pytest

    path = SHARED_MODELS / name / "model.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/models/datasets/<name>``; skips the test when absent."""
    import pytest

    path = SHARED_MODELS / "datasets" / name
    if not path.is_dir():
        pytest.skip(f"{path} not available")
    return path


def run_pipeline(model: onnx.ModelProto, passes, **config_fields):
    """Run ``passes`` through the Manager on seeded random inputs, as ``compress`` does.

    Returns (result_model, report).
    """
    from onnxslim_cnn.calibration import load_dataset
    from onnxslim_cnn.config import Config
    from onnxslim_cnn.manager import Manager
    from onnxslim_cnn.report import Report

    config = Config(passes=tuple(passes), **config_fields)
    report = Report(input="<memory>", output="<memory>")
    result = Manager(config).run(model, load_dataset(config.data, model), report)
    return result, report


__all__ = ["gs"]
