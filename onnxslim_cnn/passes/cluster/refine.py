"""Data-aware centroid refinement: least squares on calibration activations, no training.

A layer computes, per output channel o, y_o = w_o . x (x: an im2col patch of the input,
P = C/groups * kh * kw values; for Gemm/MatMul the input row). Clustering replaces w_o
by w'_o = M_o c (M_o [P, k] the 0/1 mask of each weight's cluster, c the codebook).
The output error over calibration patches X is

    E = sum_o ||(w'_o - w_o)^T X||^2 = sum_o (M_o c - w_o)^T G (M_o c - w_o),
    G = X X^T (uncentred second moment of the patches, one per conv group).

E is quadratic in the k centroid values, so its minimiser solves the k x k system

    (sum_o M_o^T G M_o + lam I) c = sum_o M_o^T G w_o + lam c_kmeans

(sum over the channels sharing the codebook: all of them per tensor, one per channel).
``lam`` (1e-6 of the mean diagonal) only pins clusters the data cannot see (empty, or
weights that meet all-zero inputs) to their k-means value. A centroid fixed at 0 (pruned
zeros) is left out of the unknowns. Indices stay as k-means chose them.

The same G gives each layer's output SQNR without running the model:
    SQNR = 10 log10( sum_o w_o^T G w_o / sum_o (w'_o - w_o)^T G (w'_o - w_o) )   (dB)

G is streamed: per batch a seeded random subset of output positions is gathered
straight from the padded input (no full im2col).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ... import validate
from ..qdq.calibrate import with_outputs

SAMPLES = 16384  # patches per layer over the whole calibration set
MAX_PATCH = 4608  # larger P -> G would be > 80 MB: refinement is skipped
CAP_DB = 200.0


@dataclass
class ConvGeom:
    """How a layer reads its input: a 2-D Conv's patch geometry, or a dense layer."""

    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1
    dense: bool = False


def collect_grams(model: onnx.ModelProto, layers: dict[str, tuple[str, ConvGeom]],
                  batches: list[dict], seed: int = 0,
                  progress=lambda m: None) -> dict[str, np.ndarray]:
    """G [groups, P, P] (float64, divided by the patch count) per layer.

    Args:
        layers: layer key -> (input tensor name, geometry).
    """
    names = sorted({name for name, _ in layers.values()})
    runner = validate.Runner(with_outputs(model, names, only=True), optimization="basic")
    rng = np.random.default_rng(seed)
    grams: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(layers, 0)
    per_batch = max(1, -(-SAMPLES // max(len(batches), 1)))
    try:
        for i, batch in enumerate(batches):
            values = runner.run_batch(batch)
            for key, (name, geom) in layers.items():
                patches = _patches(values[name], geom, per_batch, rng)
                g = np.einsum("sgp,sgq->gpq", patches, patches, dtype=np.float64)
                grams[key] = g if key not in grams else grams[key] + g
                counts[key] += patches.shape[0]
            progress(f"cluster-weights: activations of batch {i + 1}/{len(batches)}")
    finally:
        runner.close()
    return {k: g / max(counts[k], 1) for k, g in grams.items()}


def _patches(x: np.ndarray, geom: ConvGeom, count: int, rng) -> np.ndarray:
    """[S, groups, P] float64 input patches at ``count`` random output positions."""
    if geom.dense:
        rows = x.reshape(-1, x.shape[-1])
        pick = rng.choice(rows.shape[0], min(count, rows.shape[0]), replace=False)
        return rows[np.sort(pick)][:, None, :].astype(np.float64)
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.strides, geom.dilations
    t, left, b, r = geom.pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    n, c, hp, wp = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    pick = rng.choice(n * ho * wo, min(count, n * ho * wo), replace=False)
    bi, rest = np.divmod(np.sort(pick), ho * wo)
    oy, ox = np.divmod(rest, wo)
    rows = oy[:, None] * sh + np.arange(kh)[None, :] * dh  # [S, kh]
    cols = ox[:, None] * sw + np.arange(kw)[None, :] * dw  # [S, kw]
    patch = xp[bi[:, None, None, None], np.arange(c)[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]  # [S, C, kh, kw]
    return patch.reshape(patch.shape[0], geom.groups, -1).astype(np.float64)


def channel_grams(gram: np.ndarray | None, channels: int, size: int) -> np.ndarray:
    """[O, P, P] view: output channel o reads group o // (O / groups); identity if None."""
    if gram is None:
        return np.broadcast_to(np.eye(size), (channels, size, size))
    per = channels // gram.shape[0]
    return np.repeat(gram, per, axis=0) if per > 1 else gram


def refine(w: np.ndarray, idx: np.ndarray, cent: np.ndarray, gram: np.ndarray,
           zero: int | None = None) -> np.ndarray:
    """Least-squares centroids (module docstring).

    Args:
        w: [O, P] weights; idx: [O, P] cluster of each weight; cent: [R, k] k-means
            codebook (R = 1 per tensor, R = O per channel); gram: [O, P, P] per channel.
        zero: index of a centroid fixed at 0, or None.

    Returns:
        [R, k] refined codebook.
    """
    rows, k = cent.shape
    onehot = np.zeros(idx.shape + (k,))
    np.put_along_axis(onehot, idx[..., None], 1.0, axis=2)  # M_o [O, P, k]
    gm = np.einsum("opq,oqk->opk", gram, onehot)
    a = np.einsum("opj,opk->ojk", onehot, gm)
    rhs = np.einsum("opk,op->ok", gm, w)
    if rows == 1:
        a, rhs = a.sum(axis=0, keepdims=True), rhs.sum(axis=0, keepdims=True)
    free = [j for j in range(k) if j != zero]
    a, rhs, base = a[:, free][:, :, free], rhs[:, free], cent[:, free]
    lam = 1e-6 * np.maximum(np.einsum("rjj->r", a) / len(free), 1e-30)[:, None]
    a = a + lam[:, :, None] * np.eye(len(free))[None]
    out = cent.astype(np.float64).copy()
    out[:, free] = np.linalg.solve(a, (rhs + lam * base)[..., None])[..., 0]
    return out


def sqnr_db(w: np.ndarray, wq: np.ndarray, gram: np.ndarray) -> float:
    """Output SQNR in dB of weights ``wq`` against ``w`` ([O, P]) under ``gram`` [O, P, P]."""
    err = wq - w
    signal = float(np.einsum("op,opq,oq->", w, gram, w))
    noise = float(np.einsum("op,opq,oq->", err, gram, err))
    if noise <= 0:
        return CAP_DB
    return float(min(CAP_DB, 10 * np.log10(max(signal, 1e-30) / noise)))
