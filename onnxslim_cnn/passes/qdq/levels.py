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
"""

from __future__ import annotations

import numpy as np

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
    chosen = {}
    for key, sites in consumers.items():
        costs = {levels: sum(_cost(site, dense[id(site.node)], ranges[key], levels,
                                   stats.get(site.node.inputs[0].name),
                                   hess[site.node.outputs[0].name]) for site in sites)
                 for levels in CANDIDATES}
        chosen[key] = min(costs, key=lambda levels: (costs[levels], -levels))
    return {name: chosen.get(key, 255) for name, key in root.items()}


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
