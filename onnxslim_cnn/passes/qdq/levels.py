"""Activation levels against weight range: where to pay for the AVX2 int16 pair sums.

saturation.py keeps every pair sum a_j w_j + a_k w_k <= 32767 by lowering the weight
range q_n of an output channel; the activation side (uint8 levels 0..255) stays fixed.
The same bound can be met from the other side: an activation tensor quantized onto
L < 255 levels (a coarser scale) lets its consumers keep wider weight ranges. Which
side should pay depends on the layer: with X the layer's im2col rows (mean Hessian
H = E[x x^T]) and independent uniform rounding errors, the expected squared output
error per row is
    E_w = tr(H) * sum_n (m_n / q_n)^2 / 12            (weights: m_n = max |w_n|)
    E_a = ||W||_F^2 * (range / L)^2 / 12              (activations)
For every activation tensor read by a Conv/Gemm whose weights must avoid saturation,
``choose`` picks L from ``CANDIDATES`` minimising E_w(L) + E_a(L) summed over the
tensor's consumers (q_n(L) from saturation.py with the activation levels of that L).
Tensors tied together (Concat groups, MaxPool outputs) share one L.

A tensor written by a Clip keeps grids that onnxruntime can fold the Clip into: its
ClipQuantFusion drops Clip -> QuantizeLinear (and so fuses Conv -> Clip -> Q into one
QLinearConv) only when the Q grid lies inside the Clip's range, (255 - z) * scale <=
max. A coarser grid over the same range reaches past ReLU6's 6, keeps the Clip and
leaves the conv in float with its weights dequantized at every run (EfficientNet-Lite0:
9 depthwise convs in float, 1.7x the float model's time).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .calibrate import TensorStats
from .insert import QParams, weight_qmax
from .placement import Plan, WeightSite

CANDIDATES = (255, 223, 191, 159, 127)


def uint8_params(lo: float, hi: float, levels: int = 255) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of the asymmetric uint8 grid putting [lo, hi] on 0..levels."""
    if hi - lo < 1e-12:
        return np.float32(1.0), np.uint8(0)
    scale = np.float32((hi - lo) / levels)
    zero = np.uint8(np.clip(round(-lo / float(scale)), 0, levels))
    return scale, zero


def choose(plan: Plan, ranges: dict[str, tuple[float, float]], stats: dict[str, TensorStats],
           hess: dict[str, np.ndarray], dense: dict[int, np.ndarray]) -> dict[str, int]:
    """Levels per activation tensor name (255 where nothing is gained)."""
    root = _roots(plan, ranges)
    consumers: dict[str, list[WeightSite]] = {}
    for site in plan.weights:
        name = site.node.inputs[0].name
        if name in root and not site.depthwise and site.node.outputs[0].name in hess:
            consumers.setdefault(root[name], []).append(site)
    caps = _clip_caps(plan, root)
    chosen = {}
    for key, sites in consumers.items():
        allowed = [levels for levels in CANDIDATES
                   if levels == 255 or _inside(ranges[key], levels, caps.get(key))]
        costs = {levels: sum(_cost(site, dense[id(site.node)], ranges[key], levels,
                                   stats.get(site.node.inputs[0].name),
                                   hess[site.node.outputs[0].name]) for site in sites)
                 for levels in allowed}
        chosen[key] = min(costs, key=lambda levels: (costs[levels], -levels))
    return {name: chosen.get(key, 255) for name, key in root.items()}


def _clip_caps(plan: Plan, root: dict[str, str]) -> dict[str, float]:
    """Root tensor -> the smallest upper bound of a Clip writing one of its tensors."""
    caps: dict[str, float] = {}
    for name in plan.reads:
        producers = plan.tensor(name).inputs
        high = _clip_max(producers[0]) if producers else None
        if high is not None and name in root:
            caps[root[name]] = min(high, caps.get(root[name], high))
    return caps


def _clip_max(node: gs.Node) -> float | None:
    if node.op != "Clip":
        return None
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        high = float(np.asarray(node.inputs[2].values).reshape(-1)[0])
    else:
        high = node.attrs.get("max")  # opset < 11
    return None if high is None or not np.isfinite(high) else float(high)


def _inside(bounds: tuple[float, float], levels: int, cap: float | None) -> bool:
    """Whether the uint8 grid of ``levels`` over ``bounds`` ends at or below ``cap``."""
    if cap is None:
        return True
    scale, zero = uint8_params(*bounds, levels)
    # onnxruntime's own test, in float32 with float32's epsilon as the only slack
    upper = np.float32(255 - int(zero)) * scale
    return float(upper - np.float32(cap)) <= float(np.finfo(np.float32).eps)


def _roots(plan: Plan, ranges: dict) -> dict[str, str]:
    """Tensor name -> the name standing for every tensor that must share its grid."""
    parent = {name: name for name in ranges}

    def find(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    links = [(out, src) for out, src in plan.tie.items()]
    links += [(a, b) for group in plan.groups for a in group for b in group]
    for a, b in links:
        if a in parent and b in parent:
            parent[find(a)] = find(b)
    return {name: find(name) for name in parent}


def _cost(site: WeightSite, w: np.ndarray, bounds: tuple[float, float], levels: int,
          stats: TensorStats | None, hmean: np.ndarray) -> float:
    """E_w + E_a of the module doc for one consumer and one choice of levels."""
    scale, zero = uint8_params(*bounds, levels)
    qmax = weight_qmax(site, w, QParams(scale, zero), stats, 127, True).astype(np.float64)
    rows = np.moveaxis(w, site.axis, 0).reshape(w.shape[site.axis], -1).astype(np.float64)
    absmax = np.abs(rows).max(axis=1)
    weight_err = float(np.trace(hmean)) * float(np.sum((absmax / qmax) ** 2)) / 12
    act_err = float(np.sum(rows * rows)) * float(scale) ** 2 / 12
    return weight_err + act_err
