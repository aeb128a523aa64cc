"""Codebook distillation for cluster-weights (``distill_steps``): the centroids of every
clustered layer, their per-channel scales, the layers' biases and which centroid each
weight takes, tuned together towards the model the pass started from (Deep
Compression's centroid fine-tuning, here without labels: recover/distill.py).

Why: each layer's centroids and indices are fitted to its own output (refine.py,
sequence.py); the error the clustered layers build together reaches the network output
uncorrected.

Gradients through the decode: with W2 = s_o * c[idx_{o,p}] (s = 1 without scales; a
channel codebook has a row c_o per output channel),
    dL/dc_j = sum_{o,p: idx_{o,p} = j} s_o dL/dW2_{o,p}           (segment sums)
    dL/ds_o = sum_p c[idx_{o,p}] dL/dW2_{o,p}
The indices have no gradient: each weight keeps a latent value v (in codebook units,
starting at its centroid), moved by the straight-through estimate dL/dv = s_o dL/dW2,
and idx = the nearest centroid of v, re-taken every step. Measured on ResNet-8 at 3
bits (1000 unseen images): -2.8 -> -1.4 points with the indices free, -2.3 with them
fixed (both tuned on all 100 calibration images). A pruned layer's exact-0 centroid
(index 0) and its zeros stay 0.

Before:  W' = decode(idx, c, s) -> Conv          (clustered, weights installed dense)
After:   W'' = decode(idx', c', s') -> Conv      (idx', c', s', bias' tuned), then encoded
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...recover.distill import Tie
from . import kmeans
from .sites import Clustered, Site, stored


def stored_layout(site: Site, w2: np.ndarray) -> np.ndarray:
    """W2 [O, P] in the layout of the site's weight constant, in its dtype."""
    w = w2.T if site.transposed else w2
    return w.reshape(np.asarray(site.const.values).shape).astype(site.dtype)


def codebook_tie(site: Site, clustered: Clustered, key: str, reassign: bool = True) -> Tie:
    """The Tie of a weight decoded from ``clustered``; its parameters are named
    ``key/codebook`` (and ``key/scale`` for a scaled codebook). With ``reassign`` each
    weight also has a latent value ``key/latent`` (in codebook units, starting at its
    centroid) that moves by the straight-through gradient, and is re-assigned to its
    nearest centroid at every step."""
    shape = np.asarray(site.const.values).shape
    book, scale, latent = f"{key}/codebook", f"{key}/scale", f"{key}/latent"
    init = {book: clustered.codebook.astype(np.float32)}
    if clustered.scale is not None:
        init[scale] = clustered.scale.astype(np.float32)
    rows, k = clustered.codebook.shape
    masks = {}
    if clustered.zeros:
        masks[book] = np.ones_like(init[book])
        masks[book][:, 0] = 0
    if reassign:
        init[latent] = _values(init[book], clustered.idx)
        if clustered.zeros:
            masks[latent] = (clustered.idx != 0).astype(np.float32)
    state = {"idx": clustered.idx}

    def expand(params) -> np.ndarray:
        if reassign:
            state["idx"] = nearest(params[latent], params[book], clustered.zeros)
        w2 = _values(params[book], state["idx"])
        if scale in params:
            w2 = w2 * params[scale][:, None]
        return (w2.T if site.transposed else w2).reshape(shape)

    def reduce(grad, params) -> dict[str, np.ndarray]:
        idx = state["idx"]
        g2 = grad.T if site.transposed else grad.reshape(idx.shape)
        out = {}
        if scale in params:
            out[scale] = np.einsum("op,op->o", g2, _values(params[book], idx))
            g2 = g2 * params[scale][:, None]
        # one flat segment id per weight: entry j of codebook row o is o * k + j
        segments = idx + np.arange(idx.shape[0])[:, None] * k if rows > 1 else idx
        sums = np.bincount(segments.ravel(), weights=g2.ravel(), minlength=rows * k)
        out[book] = sums.reshape(rows, k).astype(np.float32)
        if reassign:
            out[latent] = g2.astype(np.float32)
        return out

    return Tie(init, expand, reduce, masks)


def _values(book: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """book[idx] per row ([O, k] codebook) or of its one row."""
    return np.take_along_axis(book, idx, axis=1) if book.shape[0] > 1 else book[0][idx]


def nearest(values: np.ndarray, book: np.ndarray, zeros: bool) -> np.ndarray:
    """Index [O, P] of each value's nearest codebook entry (its row's for an [O, k]
    codebook); with ``zeros`` a value 0 takes entry 0 (the exact zero) and no other
    value does."""
    first = 1 if zeros else 0
    entries = book[:, first:].astype(np.float64)
    order = np.argsort(entries, axis=1)
    ranked = np.take_along_axis(entries, order, axis=1)
    rows = values if book.shape[0] > 1 else values.reshape(1, -1)
    pos = kmeans.assign(rows.astype(np.float64), ranked)
    idx = (np.take_along_axis(order, pos.astype(np.int64), axis=1) + first).reshape(
        values.shape)
    return np.where(values == 0, 0, idx) if zeros else idx


def tuned(clustered: Clustered, key: str, values: dict[str, np.ndarray]) -> Clustered:
    """``clustered`` with the tuned codebook (and scale, and indices) of
    ``codebook_tie(.., key)``, the codebook rounded to what its table stores."""
    book = stored(values[f"{key}/codebook"].astype(np.float64), clustered.granularity,
                  clustered.dtype)
    idx = clustered.idx
    if f"{key}/latent" in values:
        idx = nearest(values[f"{key}/latent"], values[f"{key}/codebook"],
                      clustered.zeros).astype(clustered.idx.dtype)
    scale = values.get(f"{key}/scale")
    return dataclasses.replace(
        clustered, codebook=book, idx=idx,
        scale=None if scale is None else scale.astype(np.float32).astype(np.float64))
