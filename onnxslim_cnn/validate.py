"""onnxruntime sessions, output comparison and the accuracy checks of the manager.

Metrics per output, all against the original model's outputs on the same inputs:
- ``max_abs`` = max |y - r|, ``max_rel`` = max_abs / max |r|;
- ``cosine``: mean over samples of the cosine similarity of y and r (``cosine_min``
  the worst sample);
- ``sqnr_db`` = 20 log10(||r|| / ||y - r||), the signal-to-quantization-noise ratio
  (capped at ``SQNR_CAP`` for identical outputs);
- ``top1_agreement``: fraction of samples whose argmax agrees (classifier-shaped
  outputs only: ``[N, C]`` or ``[N, C, 1, 1]`` with C >= 2).
With labels, top-1 accuracy of both models and the drop in points.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from . import model_io
from .config import Budget, Tolerance
from .errors import UnsupportedModelError

SQNR_CAP = 200.0
Batch = Mapping[str, np.ndarray]


class Runner:
    """An onnxruntime CPU session over an in-memory model.

    Args:
        model: the model to run.
        optimization: onnxruntime graph optimisation level name (``"all"`` runs the
            fused int8 kernels that deployment will run; ``"disable"`` runs the graph
            as written).
        threads: intra-op threads (None = onnxruntime's default).

    Raises:
        UnsupportedModelError: onnxruntime cannot create a session for the model.
    """

    LEVELS = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }

    def __init__(self, model: onnx.ModelProto, optimization: str = "all",
                 threads: int | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = self.LEVELS[optimization]
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self._stack = contextlib.ExitStack()
        try:
            source = self._source(model)
            self.session = ort.InferenceSession(
                source, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            self._stack.close()
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
            raise UnsupportedModelError(f"onnxruntime cannot load the model: {first}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _source(self, model: onnx.ModelProto) -> str | bytes:
        if model_io.needs_external_data(model):
            return str(self._stack.enter_context(model_io.temp_model_path(model)))
        return model.SerializeToString()

    def run_batch(self, batch: Batch) -> dict[str, np.ndarray]:
        feed = {name: batch[name] for name in self.input_names}
        values = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, values, strict=True))

    def run(self, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
        """Run every batch; outputs are concatenated along the batch axis."""
        collected: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for batch in batches:
            for name, value in self.run_batch(batch).items():
                collected[name].append(value)
        return {n: _concat(v) for n, v in collected.items()}

    def close(self) -> None:
        self.session = None
        self._stack.close()


def _concat(values: list[np.ndarray]) -> np.ndarray:
    if len(values) == 1 or values[0].ndim == 0:
        return values[0]
    return np.concatenate(values, axis=0)


def run_model(model: onnx.ModelProto, batches: list[Batch], optimization: str = "all"):
    """Outputs of ``model`` on ``batches`` (one session, closed afterwards)."""
    runner = Runner(model, optimization)
    try:
        return runner.run(batches)
    finally:
        runner.close()


@dataclass
class OutputMetrics:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    cosine_min: float
    sqnr_db: float
    top1_agreement: float | None


@dataclass
class Metrics:
    """Comparison of a candidate with the original on the validation samples."""

    outputs: list[OutputMetrics]
    samples: int
    top1_ref: float | None = None
    top1: float | None = None

    @property
    def top1_drop(self) -> float | None:
        """Top-1 accuracy lost, in points (None without labels)."""
        if self.top1_ref is None or self.top1 is None:
            return None
        return 100.0 * (self.top1_ref - self.top1)

    @property
    def cosine(self) -> float:
        return min(o.cosine for o in self.outputs)

    @property
    def sqnr_db(self) -> float:
        return min(o.sqnr_db for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max(o.max_abs for o in self.outputs)

    @property
    def top1_agreement(self) -> float | None:
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values) if values else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(top1_drop=self.top1_drop, max_abs=self.max_abs, cosine=self.cosine,
                   sqnr_db=self.sqnr_db, top1_agreement=self.top1_agreement)
        return out


def classifier_scores(value: np.ndarray) -> np.ndarray | None:
    """``value`` as [N, C] scores if it is classifier-shaped, else None."""
    if value.ndim < 2 or any(d != 1 for d in value.shape[2:]) or value.shape[1] < 2:
        return None
    return value.reshape(value.shape[0], value.shape[1])


def compare(ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray],
            labels: np.ndarray | None = None) -> Metrics:
    """Metrics of ``cand`` against ``ref`` (same output names), optionally with labels."""
    outputs = [_output_metrics(name, ref[name], cand[name]) for name in ref]
    samples = next(iter(ref.values())).shape[0] if ref else 0
    metrics = Metrics(outputs=outputs, samples=int(samples))
    if labels is not None:
        metrics.top1_ref, metrics.top1 = _accuracies(ref, cand, labels)
    return metrics


def _output_metrics(name: str, r: np.ndarray, y: np.ndarray) -> OutputMetrics:
    r64, y64 = r.astype(np.float64), y.astype(np.float64)
    diff = np.abs(y64 - r64)
    max_abs = float(np.max(diff)) if diff.size else 0.0
    if not np.all(np.isfinite(y64[np.isfinite(r64)])):
        max_abs = float("inf")
    scale = float(np.max(np.abs(r64))) if r64.size else 0.0
    cos = _per_sample_cosine(r64, y64)
    noise = float(np.linalg.norm(y64 - r64))
    signal = float(np.linalg.norm(r64))
    sqnr = SQNR_CAP if noise == 0 else min(SQNR_CAP, 20 * np.log10(max(signal, 1e-30) / noise))
    scores_r, scores_y = classifier_scores(r), classifier_scores(y)
    agree = None
    if scores_r is not None and scores_y is not None:
        agree = float(np.mean(scores_r.argmax(1) == scores_y.argmax(1)))
    return OutputMetrics(
        name=name, max_abs=max_abs, max_rel=max_abs / scale if scale else max_abs,
        cosine=float(np.mean(cos)), cosine_min=float(np.min(cos)),
        sqnr_db=float(sqnr) if np.isfinite(sqnr) else -SQNR_CAP, top1_agreement=agree,
    )


def _per_sample_cosine(r: np.ndarray, y: np.ndarray) -> np.ndarray:
    if r.ndim == 0:
        r, y = r.reshape(1, 1), y.reshape(1, 1)
    r2, y2 = r.reshape(r.shape[0], -1), y.reshape(y.shape[0], -1)
    if not np.all(np.isfinite(y2)):
        return np.full(r2.shape[0], -1.0)
    dot = np.sum(r2 * y2, axis=1)
    norms = np.linalg.norm(r2, axis=1) * np.linalg.norm(y2, axis=1)
    both_zero = (np.linalg.norm(r2, axis=1) == 0) & (np.linalg.norm(y2, axis=1) == 0)
    cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 0.0)
    return np.where(both_zero, 1.0, cos)


def _accuracies(ref, cand, labels: np.ndarray) -> tuple[float | None, float | None]:
    for name, value in ref.items():
        scores_r = classifier_scores(value)
        if scores_r is None or scores_r.shape[1] <= int(labels.max()):
            continue
        scores_y = classifier_scores(cand[name])
        acc_r = float(np.mean(scores_r.argmax(1) == labels))
        acc_y = float(np.mean(scores_y.argmax(1) == labels))
        return acc_r, acc_y
    return None, None


def check_lossless(ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray],
                   tolerance: Tolerance | None = None) -> str | None:
    """None when every output matches within the tolerance, else the reason."""
    for name, r in ref.items():
        tol = tolerance or Tolerance.for_dtype(r.dtype)
        y = cand[name]
        if y.shape != r.shape:
            return f"output '{name}' changed shape {r.shape} -> {y.shape}"
        r64, y64 = r.astype(np.float64), y.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(r64)))) if r64.size else 1.0
        bound = tol.atol * scale + tol.rtol * np.abs(r64)
        excess = np.abs(y64 - r64) - bound
        if excess.size and not np.all(excess <= 0):
            worst = float(np.nanmax(np.abs(y64 - r64))) if np.all(np.isfinite(y64)) else np.inf
            return (f"output '{name}' differs by up to {worst:.3g} "
                    f"(tolerance rtol={tol.rtol:g}, atol={tol.atol:g}*max(1,|ref|max={scale:.3g}))")
    return None


def check_budget(metrics: Metrics, budget: Budget) -> str | None:
    """None when ``metrics`` meet ``budget``, else the first violated criterion."""
    if not np.isfinite(metrics.max_abs):
        return "outputs contain NaN or Inf"
    if metrics.cosine < budget.min_cosine:
        return f"cosine {metrics.cosine:.5f} < {budget.min_cosine}"
    drop = metrics.top1_drop
    if drop is not None and drop > budget.max_top1_drop:
        return f"top-1 drop {drop:.2f} points > {budget.max_top1_drop}"
    agree = metrics.top1_agreement
    if budget.min_top1_agreement is not None and agree is not None \
            and agree < budget.min_top1_agreement:
        return f"top-1 agreement {agree:.4f} < {budget.min_top1_agreement}"
    return None
