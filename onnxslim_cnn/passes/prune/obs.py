"""OBS pruning of one layer from its input Gram matrix (SparseGPT-style, no training).

Why: the per-row least-squares re-fit (gram.refit) solves one system per mask pattern,
i.e. per output row; Optimal Brain Surgeon needs one Cholesky factor per layer (per
group), chooses the mask by the error each weight would cost and updates the remaining
weights as it goes, so it is both faster and better (Frantar & Alistarh, "SparseGPT",
2023; "Optimal Brain Compression", 2022).

Rows w~ [G, R, K(+1)] share the Gram matrix H [G, K(+1), K(+1)] of their group
(gram.py: the bias is a last input that is always 1 and is never pruned). With
    U upper triangular, U^T U = (H + lambda I)^-1,  lambda = DAMP * mean(diag H)
the columns j = 0 .. K-1 are visited in order; removing w_j (the weight becomes q_j = 0,
or stays q_j = w_j when kept) and letting the later columns of the row absorb it costs
    (w_j - q_j)^2 / U_jj^2      (the OBS saliency)
and the optimal update of the later columns is
    w_{j+1:} -= (w_j - q_j) / U_jj * U_{j, j+1:}
(Cholesky form of the OBS update: the inverse Hessian of the columns not yet visited
is never formed). The mask is chosen per block of BLOCK columns, jointly over the
groups and rows of the layer: the fraction ``sparsity`` of the lowest saliencies
w_j^2 / U_jj^2 in the block (with the updates of the earlier blocks applied) is dropped,
so a layer ends at its sparsity to within one weight per block. The bias column comes
last, so it absorbs the mean of what every pruned weight removed. Updates within a
block are applied column by column, those to later blocks once per block (a matmul).

Dead inputs (H_jj = 0, e.g. padding-only positions or channels a ReLU never opens) get
H_jj = 1: their weights cost nothing and are pruned first. When the factor fails
(H not positive definite in float64) lambda grows tenfold, at most four times, then
only the diagonal of H is used (always positive definite: magnitude pruning weighted by
the input energy, with no update).
"""

from __future__ import annotations

import numpy as np

BLOCK = 128
DAMP = 0.01
REFINE_ITERATIONS = 20


def inverse_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U [G, K, K] upper triangular with U^T U = (H + lambda I)^-1, per group."""
    h = np.array(h, np.float64)
    idx = np.arange(h.shape[1])
    diag = h[:, idx, idx]
    live = diag > 0
    h[:, idx, idx] = np.where(live, diag, 1.0)
    scale = np.array([d[m].mean() if m.any() else 1.0 for d, m in zip(diag, live,
                                                                        strict=True)])
    for attempt in range(5):
        damped = h.copy()
        damped[:, idx, idx] += (damp * 10 ** attempt * scale)[:, None]
        try:
            inv_lower = np.linalg.inv(np.linalg.cholesky(damped))
            hinv = np.matmul(inv_lower.transpose(0, 2, 1), inv_lower)  # L^-T L^-1
            return np.linalg.cholesky(hinv).transpose(0, 2, 1)
        except np.linalg.LinAlgError:
            continue
    factor = np.zeros_like(h)
    factor[:, idx, idx] = 1 / np.sqrt(h[:, idx, idx] + (damp * scale)[:, None])
    return factor


def prune(h: np.ndarray, w: np.ndarray, width: int, sparsity: float | None = None,
          keep: np.ndarray | None = None, factor: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """OBS-prune rows ``w`` [G, R, K(+1)] whose first ``width`` columns are prunable.

    Args:
        h: [G, K(+1), K(+1)] Gram matrices (ignored when ``factor`` is given).
        sparsity: fraction of the G*R*width weights to drop, the mask chosen on the way.
        keep: bool [G, R, width], a fixed mask instead of ``sparsity``.
        factor: ``inverse_factor(h)``, when the caller reuses it for several levels.

    Returns:
        (w~' float64 with exact zeros where pruned, keep [G, R, width]).
    """
    u = inverse_factor(h) if factor is None else factor
    w = np.array(w, np.float64)
    chosen = np.ones((*w.shape[:2], width), bool) if keep is None else keep.copy()
    d = np.diagonal(u, axis1=1, axis2=2)
    for start in range(0, w.shape[2], BLOCK):
        end = min(start + BLOCK, w.shape[2])
        cols = max(min(end, width) - start, 0)
        if keep is None and cols:
            saliency = w[:, :, start:start + cols] ** 2 / d[:, None, start:start + cols] ** 2
            chosen[:, :, start:start + cols] = _block_keep(saliency, sparsity or 0.0)
        mask = np.ones((*w.shape[:2], end - start), bool)
        mask[:, :, :cols] = chosen[:, :, start:start + cols]
        err = _sweep_block(w, u, start, end, mask)
        if end < w.shape[2]:
            w[:, :, end:] -= np.matmul(err, u[:, start:end, end:])
    w[:, :, :width] = np.where(chosen, w[:, :, :width], 0.0)
    return w, chosen


def refine(h: np.ndarray, w: np.ndarray, start: np.ndarray, keep: np.ndarray,
           iterations: int = REFINE_ITERATIONS, damp: float = DAMP) -> np.ndarray:
    """The kept weights re-fitted jointly, from ``start`` (the sweep's result).

    The sweep never moves a column left of a removed one; the exact answer for the mask
    is every row's least squares over its kept columns (gram.refit, one solve per row).
    Here all rows at once run Jacobi-preconditioned conjugate gradients on
        min (x - w~)^T (H + lambda I) (x - w~)   over x with x = 0 where pruned
    (the same ridge as the sweep), one [R, K] x [K, K] product per iteration per group.

    Args:
        w: the original rows [G, R, K(+1)]; start: the sweep's rows, zero where pruned.
        keep: [G, R, width] (the columns beyond width are never pruned).
    """
    hd = _damped(h, damp)
    free = np.ones(w.shape, bool)
    free[:, :, :keep.shape[2]] = keep
    precond = np.where(free, 1 / np.diagonal(hd, axis1=1, axis2=2)[:, None, :], 0.0)
    x = np.where(free, start, 0.0)
    r = -np.where(free, np.matmul(x - w, hd), 0.0)
    z = precond * r
    p, rz = z, np.sum(r * z, axis=2, keepdims=True)
    for _ in range(iterations):
        ap = np.where(free, np.matmul(p, hd), 0.0)
        alpha = rz / np.maximum(np.sum(p * ap, axis=2, keepdims=True), 1e-300)
        x, r = x + alpha * p, r - alpha * ap
        z = precond * r
        rz, previous = np.sum(r * z, axis=2, keepdims=True), rz
        p = z + rz / np.maximum(previous, 1e-300) * p
    return x


def _damped(h: np.ndarray, damp: float) -> np.ndarray:
    """H + lambda I with dead inputs at H_jj = 1, as the sweep sees it."""
    h = np.array(h, np.float64)
    idx = np.arange(h.shape[1])
    diag = h[:, idx, idx]
    live = diag > 0
    scale = np.array([d[m].mean() if m.any() else 1.0 for d, m in zip(diag, live,
                                                                        strict=True)])
    h[:, idx, idx] = np.where(live, diag, 1.0) + (damp * scale)[:, None]
    return h


def _sweep_block(w: np.ndarray, u: np.ndarray, start: int, end: int,
                 mask: np.ndarray) -> np.ndarray:
    """Prune the columns start..end-1 of ``w`` in place; returns the scaled errors."""
    err = np.zeros((*w.shape[:2], end - start))
    for j in range(start, end):
        col = w[:, :, j]
        e = np.where(mask[:, :, j - start], 0.0, col) / u[:, None, j, j]
        w[:, :, j:end] -= e[:, :, None] * u[:, None, j, j:end]
        err[:, :, j - start] = e
    return err


def _block_keep(saliency: np.ndarray, sparsity: float) -> np.ndarray:
    """True for all but the round(sparsity * n) lowest saliencies of the block."""
    flat = saliency.reshape(-1)
    drop = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, bool)
    if drop:
        keep[np.argpartition(flat, drop - 1)[:drop]] = False
    return keep.reshape(saliency.shape)
