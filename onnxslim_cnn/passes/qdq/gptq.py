"""Hessian-aware weight rounding (GPTQ, Frantar et al. 2022) on calibration inputs.

Rounding each weight to its nearest grid point minimises ||W - Q||, not the layer's
output error ||(W - Q) X||. GPTQ rounds the columns of W (the reduction axis K) one at a
time and spreads each column's rounding error over the columns not yet rounded, weighted
by the inverse of H = X X^T (X: the layer's im2col'd calibration inputs), so that later
columns compensate:
    e_i = (w_i - q(w_i)) / [H^-1]_ii,   W[:, j] -= e_i [H^-1]_ij  for j > i
with the upper Cholesky factor of H^-1 (dampened by ``DAMP`` * mean diag H). The grid is
the per-output-channel symmetric int8 grid of ``insert.quantize_weight`` (scale fixed
from the float weights, values clipped to +-q_n).

Only plain convs (group 1) and Gemm/MatMul with K <= MAX_K are handled; others keep
nearest rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from ... import validate
from .placement import WeightSite

DAMP = 0.01
BLOCK = 128
# Rows of X sampled per layer over the whole calibration set: H is K x K (K <= a few
# thousand in CNNs), so tens of thousands of rows estimate it well; taking every
# output position of every image costs minutes and changes the rounding little.
ROWS_TOTAL = 65536
MIN_ROWS_PER_BATCH = 256
# H is K x K in float64 and inverted: VGG's first classifier (K = 25088) would need 5 GB
# and hours, so wider layers keep nearest rounding (ResNet-50's widest conv: 4608).
MAX_K = 8192


def supported(site: WeightSite) -> bool:
    """Plain convs and Gemm/MatMul with a reduction axis of at most ``MAX_K``."""
    w = site.node.inputs[site.index].values
    if int(np.prod(w.shape)) // w.shape[site.axis] > MAX_K:
        return False
    if site.node.op == "Conv":
        return int(site.node.attrs.get("group", 1)) == 1
    return site.node.op in ("Gemm", "MatMul")


def hessians(model: onnx.ModelProto, sites: list[WeightSite], batches: list[dict],
             seed: int = 0) -> dict[str, np.ndarray]:
    """H = mean of x x^T over (subsampled) im2col rows of every site's input, keyed by the
    site's output name (stable across copies of the graph)."""
    names = sorted({s.node.inputs[0].name for s in sites})
    runner = validate.Runner(validate.with_outputs(model, names, only=True), optimization="basic")
    rng = np.random.default_rng(seed)
    per_batch = max(MIN_ROWS_PER_BATCH, ROWS_TOTAL // max(len(batches), 1))
    found: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    try:
        for batch in batches:
            values = runner.run_batch(batch)
            for site in sites:
                try:
                    rows = _rows(site, values[site.node.inputs[0].name], rng, per_batch)
                except ValueError:  # a layout im2col does not handle: nearest rounding
                    continue
                update = (rows.T @ rows).astype(np.float64)
                key = site.node.outputs[0].name
                found[key] = found.get(key, 0) + update
                counts[key] = counts.get(key, 0) + rows.shape[0]
    finally:
        runner.close()
    return {key: h / max(counts[key], 1) for key, h in found.items()}


def _rows(site: WeightSite, x: np.ndarray, rng, limit: int) -> np.ndarray:
    """At most ``limit`` random input rows [M, K] (float32) in the flattening order of
    the weight's reduction axis."""
    if site.node.op == "Conv":
        return im2col(site.node, x, rng, limit).astype(np.float32)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > limit:
        rows = rows[np.sort(rng.choice(rows.shape[0], limit, replace=False))]
    return rows.astype(np.float32)


def im2col(conv, x: np.ndarray, rng=None, limit: int | None = None) -> np.ndarray:
    """[N*Ho*Wo, C*kh*kw] patches in (c, kh, kw) order, as W.reshape(C_out, -1); with
    ``limit``, only that many positions drawn by ``rng`` (patches gathered from the
    window view, so the full patch matrix is never built)."""
    w_shape = conv.inputs[1].values.shape
    kernel = w_shape[2:]
    strides = conv.attrs.get("strides", [1] * len(kernel))
    dil = conv.attrs.get("dilations", [1] * len(kernel))
    if x.ndim != 4:
        raise ValueError("im2col handles 2-D convs only")
    pads = _pads(conv, x.shape[2:], kernel, strides, dil)
    n = len(kernel)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + n]) for i in range(n)])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    win = sliding_window_view(x, span, axis=(2, 3))
    win = win[:, :, ::strides[0], ::strides[1], ::dil[0], ::dil[1]]
    k = int(np.prod(w_shape[1:]))
    positions = win.shape[0] * win.shape[2] * win.shape[3]
    if limit is None or positions <= limit:
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, k)
    pick = np.sort(rng.choice(positions, limit, replace=False))
    n, i, j = np.unravel_index(pick, (win.shape[0], win.shape[2], win.shape[3]))
    return win[n, :, i, j].reshape(limit, k)


def _pads(conv, size, kernel, strides, dil) -> list[int]:
    """Explicit [begin..., end...] pads, resolving auto_pad SAME_UPPER/SAME_LOWER."""
    mode = conv.attrs.get("auto_pad", "NOTSET")
    if mode in ("NOTSET", "VALID"):
        return list(conv.attrs.get("pads", [0] * (2 * len(kernel)))) if mode == "NOTSET" \
            else [0] * (2 * len(kernel))
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dil, strict=True):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        low = total // 2 if mode == "SAME_UPPER" else total - total // 2
        begin.append(low)
        end.append(total - low)
    return begin + end


def gptq_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: np.ndarray
               ) -> np.ndarray:
    """Integer weights [C_out, K] minimising the output error under H (see module doc).

    Columns are rounded in order of decreasing H_ii ("act order"): the inputs carrying
    the most energy are rounded first, while the most columns remain to absorb their
    error."""
    order = np.argsort(-np.diag(h), kind="stable")
    q = _round_in_order(w[:, order], h[np.ix_(order, order)], scale, qmax)
    out = np.empty_like(q)
    out[:, order] = q
    return out


def _round_in_order(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: np.ndarray
                    ) -> np.ndarray:
    w = w.astype(np.float64).copy()
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMP * np.mean(np.diag(h)) * np.eye(h.shape[0])
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    lo, hi = -qmax[:, None].astype(np.float64), qmax[:, None].astype(np.float64)
    for start in range(0, w.shape[1], BLOCK):
        stop = min(start + BLOCK, w.shape[1])
        err_block = np.zeros((w.shape[0], stop - start))
        for i in range(start, stop):
            qi = np.clip(np.round(w[:, i] / scale), lo[:, 0], hi[:, 0])
            q[:, i] = qi
            err = (w[:, i] - qi * scale) / hinv[i, i]
            w[:, i + 1:stop] -= np.outer(err, hinv[i, i + 1:stop])
            err_block[:, i - start] = err
        w[:, stop:] -= err_block @ hinv[start:stop, stop:]
    return q
