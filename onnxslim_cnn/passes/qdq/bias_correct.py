"""Empirical bias correction of a quantized graph against the float model.

Quantization shifts the mean of every layer's output: weight rounding, activation
clipping and the errors of all upstream layers add up. For each quantized layer with
a bias, with m_f[c] the mean of output channel c in the float model and m_q[c] in the
quantized one over the calibration data (emulated in float: Q/DQ as written):
    b'[c] = b[c] + (m_f[c] - m_q[c])
Correcting one layer changes the inputs of the next, so a layer is measured only once
every layer upstream of it is corrected (updating all layers at once double-counts
upstream shifts and diverges); layers on parallel branches share one run. A subset of
the calibration data (``SAMPLES``) is enough for channel means.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ... import validate
from .calibrate import TensorStats

SAMPLES = 32


def output_means(graph: gs.Graph, names: list[str], batches: list[dict]) -> dict[str, np.ndarray]:
    """Per-channel means of tensors ``names`` of ``graph`` over ``batches``."""
    if not names:  # onnxruntime refuses a model without outputs
        return {}
    model = validate.with_outputs(gs.export_onnx(graph, do_type_check=False), names, only=True)
    runner = validate.Runner(model, optimization="disable")
    try:
        stats = {n: TensorStats() for n in names}
        for batch in batches:
            values = runner.run_batch(batch)
            for name in names:
                stats[name].update(values[name])
        return {n: s.channel_mean for n, s in stats.items()}
    finally:
        runner.close()


def reference_means(graph: gs.Graph, names: list[str], batches: list[dict]):
    """Float-model channel means of ``names`` on the subset ``correct`` will use."""
    return output_means(graph, names, subset(batches))


def correct(graph: gs.Graph, biases: dict[str, BiasHandle], reference: dict[str, np.ndarray],
            batches: list[dict], progress=lambda m: None) -> float:
    """Correct the int32 biases in ``biases`` (layer output name -> handle) against
    ``reference_means`` of the same batches; returns the mean |shift| removed.

    Layers are corrected in waves: a wave holds every layer whose upstream layers are
    all corrected, so its members cannot affect each other and one run measures them
    all (the result equals correcting one layer at a time; a chain needs one run per
    layer, a network with parallel branches fewer)."""
    batches = subset(batches)
    names = [n for n in biases if reference.get(n) is not None]
    shifts = []
    waves = _waves(graph, names)
    for i, wave in enumerate(waves):
        means = output_means(graph, wave, batches)
        for name in wave:
            delta = reference[name] - means[name]
            biases[name].add(delta)
            shifts.append(float(np.mean(np.abs(delta))))
        progress(f"bias correction: wave {i + 1}/{len(waves)}")
    return float(np.mean(shifts)) if shifts else 0.0


def _waves(graph: gs.Graph, names: list[str]) -> list[list[str]]:
    """``names`` grouped by depth: 1 + the deepest of the named tensors upstream."""
    tensors = graph.tensors()
    wanted = set(names)
    depth: dict[str, int] = {}
    for name in names:  # names are in topological order: upstream depths are known
        depth[name] = 1 + max((depth.get(u, 0) for u in _upstream(tensors[name], wanted)),
                              default=0)
    waves: dict[int, list[str]] = {}
    for name in names:
        waves.setdefault(depth[name], []).append(name)
    return [waves[d] for d in sorted(waves)]


def _upstream(tensor: gs.Tensor, wanted: set[str]) -> set[str]:
    """Tensors in ``wanted`` that ``tensor`` depends on (not itself)."""
    found, seen, stack = set(), set(), [tensor]
    while stack:
        current = stack.pop()
        for node in current.inputs:
            for source in node.inputs:
                if id(source) in seen:
                    continue
                seen.add(id(source))
                if source.name in wanted:
                    found.add(source.name)
                stack.append(source)
    return found


def subset(batches: list[dict], samples: int = SAMPLES) -> list[dict]:
    out, total = [], 0
    for batch in batches:
        if total >= samples:
            break
        out.append(batch)
        total += next(iter(batch.values())).shape[0]
    return out


class BiasHandle:
    """The int32 bias input of one DequantizeLinear, replaceable by a corrected copy."""

    def __init__(self, dq: gs.Node, scale: np.ndarray):
        self.dq = dq
        self.scale = scale.astype(np.float64)

    def add(self, delta: np.ndarray) -> None:
        old = self.dq.inputs[0]
        value = np.asarray(old.values).astype(np.float64) * self.scale + delta
        q = np.clip(np.round(value / self.scale), -(2**31) + 1, 2**31 - 1).astype(np.int32)
        self.dq.inputs[0] = gs.Constant(old.name, q)
