"""Error-feedback assignment of weights to codebook entries (GPTQ with a codebook grid).

Nearest-centroid assignment minimises the weight error, not the layer's output error
e^T S e (refine.py). Going through the P inputs of a layer in order, each column of W2
[O, P] is assigned to its nearest centroids, and its error is pushed onto the columns
not yet assigned, weighted so the output error stays smallest (the Optimal Brain
Surgeon update, as in GPTQ; here the grid is the k-means codebook, not a uniform one):

    H = S + damp * mean(diag S) * I,   U = chol(H^-1)^T (upper triangular)
    for p = 0 .. P-1:   q_p = nearest(w_p),   e_p = (w_p - q_p) / U[p, p]
                        w_{p+1:} -= e_p U[p, p+1:]

In blocks of ``BLOCK`` columns the update of later blocks is one GEMM. Weights that were
exactly zero (pruned) are forced to the zero centroid. Centroids are then re-fitted by
least squares for the new indices (refine.solve).
"""

from __future__ import annotations

import numpy as np

BLOCK = 128
DAMP = 0.01


def gptq_assign(w: np.ndarray, s: np.ndarray, cent: np.ndarray, zero: int | None = None
                ) -> np.ndarray:
    """Indices [O, P] of ``w`` [O, P] into codebooks ``cent`` [R, k] (R = 1 or O),
    with error feedback under ``s`` [g, P, P] (or [P, P]: g = 1), the S of each of g
    groups of O / g rows (conv groups; a depthwise conv has one row per group). The
    groups are independent and go through the columns together.

    Args:
        zero: index of the exact-zero centroid; weights equal to 0 are pinned to it.
    """
    s = s[None] if s.ndim == 2 else s
    groups, size = s.shape[0], w.shape[1]
    w = w.astype(np.float64).reshape(groups, -1, size)  # copies
    book = cent if cent.shape[0] == 1 else cent.reshape(groups, -1, cent.shape[1])
    pinned = (w == 0) if zero is not None else None
    upper = _inverse_cholesky(s)  # [g, P, P]
    idx = np.empty(w.shape, np.int64)
    for lo in range(0, size, BLOCK):
        hi = min(size, lo + BLOCK)
        err = np.empty(w.shape[:2] + (hi - lo,))
        for p in range(lo, hi):
            idx[:, :, p] = _nearest(w[:, :, p], book)
            if pinned is not None:
                idx[:, :, p][pinned[:, :, p]] = zero
            q = book[0][idx[:, :, p]] if book.ndim == 2 else \
                np.take_along_axis(book, idx[:, :, p, None], 2)[:, :, 0]
            err[:, :, p - lo] = (w[:, :, p] - q) / upper[:, p, p, None]
            w[:, :, p + 1:hi] -= err[:, :, p - lo, None] * upper[:, None, p, p + 1:hi]
        w[:, :, hi:] -= np.matmul(err, upper[:, lo:hi, hi:])
    return idx.reshape(-1, size)


def _inverse_cholesky(s: np.ndarray) -> np.ndarray:
    """Upper Cholesky factors [g, P, P] of the damped inverses of ``s`` [g, P, P]."""
    mean = np.maximum(np.einsum("gii->g", s) / s.shape[1], 1e-12)
    h = s + DAMP * mean[:, None, None] * np.eye(s.shape[1])
    inv = np.linalg.inv(h)
    return np.linalg.cholesky((inv + inv.transpose(0, 2, 1)) / 2).transpose(0, 2, 1)


def _nearest(col: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry for each value of ``col`` [g, r]: one shared
    codebook ``book`` [1, k], or one per row [g, r, k]."""
    if book.ndim == 2:
        order = np.argsort(book[0])
        ranked = book[0][order]
        pos = np.searchsorted((ranked[1:] + ranked[:-1]) / 2, col, side="right")
        return order[pos]
    return np.argmin(np.abs(book - col[:, :, None]), axis=2)
