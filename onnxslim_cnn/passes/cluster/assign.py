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
    with error feedback under ``s`` [P, P] (one group: ``s`` is shared by every row).

    Args:
        zero: index of the exact-zero centroid; weights equal to 0 are pinned to it.
    """
    w = w.astype(np.float64).copy()
    pinned = (w == 0) if zero is not None else None
    upper = _inverse_cholesky(s)
    idx = np.empty(w.shape, np.int64)
    size = w.shape[1]
    for lo in range(0, size, BLOCK):
        hi = min(size, lo + BLOCK)
        err = np.empty((w.shape[0], hi - lo))
        for p in range(lo, hi):
            idx[:, p] = _nearest(w[:, p], cent)
            if pinned is not None:
                idx[pinned[:, p], p] = zero
            q = np.take_along_axis(cent, idx[:, p:p + 1], 1)[:, 0] if cent.shape[0] > 1 \
                else cent[0][idx[:, p]]
            err[:, p - lo] = (w[:, p] - q) / upper[p, p]
            w[:, p + 1:hi] -= np.outer(err[:, p - lo], upper[p, p + 1:hi])
        w[:, hi:] -= err @ upper[lo:hi, hi:]
    return idx


def _inverse_cholesky(s: np.ndarray) -> np.ndarray:
    h = s + DAMP * max(float(np.mean(np.diag(s))), 1e-12) * np.eye(s.shape[0])
    inv = np.linalg.inv(h)
    return np.linalg.cholesky((inv + inv.T) / 2).T


def _nearest(col: np.ndarray, cent: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of each row's codebook (or the shared one) for ``col``."""
    if cent.shape[0] == 1:
        order = np.argsort(cent[0])
        ranked = cent[0][order]
        pos = np.searchsorted((ranked[1:] + ranked[:-1]) / 2, col, side="right")
        return order[pos]
    return np.argmin(np.abs(cent - col[:, None]), axis=1)
