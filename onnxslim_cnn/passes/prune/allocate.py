"""Layer-wise sparsity from measured sensitivity, meeting a global target.

For every layer l with n_l prunable weights, e_l(s) is the relative output error of
masking the fraction s of its lowest-scored weights, measured on the calibration data
through its input Gram matrix (``gram.mask_error / gram.energy``) on the grid GRID.
We want levels s_l minimising sum_l e_l(s_l) subject to
    sum_l n_l s_l >= target * sum_l n_l        (the parameter-weighted average)
Greedy on marginal cost: start at s_l = 0 and repeatedly raise the one layer whose next
grid step costs the least error per weight pruned,
    (e_l(s_next) - e_l(s)) / (n_l (s_next - s)),
until the target is met. The result overshoots the target by less than one grid step
of one layer; it is a target that cannot be met (every layer at GRID[-1]) that stops
short, and ``allocate`` says so.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

GRID = np.round(np.arange(0.0, 0.951, 0.05), 2)


def allocate(errors: list[np.ndarray], sizes: list[int], target: float
             ) -> tuple[list[float], bool]:
    """Per-layer sparsity levels (values of GRID) and whether ``target`` was met.

    Args:
        errors: per layer, e_l at every GRID level (e_l(0) = 0).
        sizes: n_l per layer.
        target: wanted fraction of all sum(n_l) weights pruned, in [0, 1).
    """
    level = [0] * len(sizes)
    need, pruned = target * sum(sizes), 0.0
    while pruned < need - 1e-9:
        best, best_cost = None, np.inf
        for i, size in enumerate(sizes):
            if level[i] + 1 >= GRID.size or size == 0:
                continue
            step = GRID[level[i] + 1] - GRID[level[i]]
            cost = (errors[i][level[i] + 1] - errors[i][level[i]]) / (size * step)
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            return [float(GRID[v]) for v in level], False
        pruned += sizes[best] * (GRID[level[best] + 1] - GRID[level[best]])
        level[best] += 1
    return [float(GRID[v]) for v in level], True


def keep_mask(score: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the weights kept when the fraction ``sparsity`` with the lowest
    ``score`` is dropped (ties broken by position, so the count is exact)."""
    return next(keep_masks(score, [sparsity]))


def keep_masks(score: np.ndarray, levels) -> Iterator[np.ndarray]:
    """keep_mask at each of ``levels``, from one sort (VGG-19's fc6: 103 M weights,
    ~10 s a sort)."""
    flat = score.reshape(-1)
    order = np.argsort(flat, kind="stable")
    for sparsity in levels:
        keep = np.ones(flat.size, bool)
        keep[order[:int(round(sparsity * flat.size))]] = False
        yield keep.reshape(score.shape)
