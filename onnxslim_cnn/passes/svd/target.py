"""Ranks for a MAC target: the least output error that removes a given share of MACs.

``svd_target_macs = T`` asks for the splittable layers (the sites) to cost at most
(1 - T) of their MACs. Per layer the options are: kept (its MACs, no error) and, per
mode, the ranks of a grid of ``GRID_POINTS`` from 1 to the largest rank that still saves
``svd_min_saving`` (finer ranks move a layer's MACs by less than the grid step's share;
multiples of svd.ALIGN for a conv whose channels are), each with its MACs m_l(r) and
its cost

    c_l(r) = g_l * e_l(r)^2

where e_l is the layer's relative output error (factor.py: fitted to the calibration
data when there is any, the plain SVD's without) and g_l how much of a layer's error
reaches the model output (``reach``: one forward per layer, with calibration data;
1 without). Only each layer's Pareto front is kept (fewer MACs must cost more error).
Every layer starts kept; the step with the least added cost per MAC removed goes
first (one layer to a cheaper option) until the target is met, so the result
overshoots by less than one step of one layer. When every layer at its cheapest option
still misses the target, that is the answer and ``allocate`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID_POINTS = 24


@dataclass(frozen=True)
class Option:
    """One setting of one layer: ``mode`` ``kept`` (rank 0) or a split of ``rank``."""

    mode: str
    rank: int
    macs: int
    cost: float


def grid(high: int, multiple: int = 1) -> list[int]:
    """Up to GRID_POINTS multiples of ``multiple`` from ``multiple`` to ``high``, spaced
    evenly (both ends kept when ``high`` is a multiple)."""
    count = high // multiple
    if count < 1:
        return []
    steps = np.round(np.linspace(1, count, min(GRID_POINTS, count)))
    return sorted({int(r) * multiple for r in steps})


def front(options: list[Option]) -> list[Option]:
    """The Pareto front by decreasing MACs: an option stays when every option with
    fewer MACs costs more (a split of cost 0 may so replace ``kept`` at the front)."""
    found: list[Option] = []
    for option in sorted(options, key=lambda o: (o.macs, o.cost)):
        if not found or option.cost < found[-1].cost:
            found.append(option)
    return found[::-1]


def allocate(fronts: list[list[Option]], kept: list[int], target: float
             ) -> tuple[list[Option], bool]:
    """The option per layer (greedy, module docstring) and whether the MACs left are at
    most (1 - ``target``) of the layers' ``kept`` MACs."""
    at = [0] * len(fronts)
    left, goal = sum(f[0].macs for f in fronts), (1 - target) * sum(kept)
    while left > goal:
        best, best_rate = None, np.inf
        for i, f in enumerate(fronts):
            for j in range(at[i] + 1, len(f)):
                saved = f[at[i]].macs - f[j].macs
                rate = (f[j].cost - f[at[i]].cost) / max(saved, 1)
                if rate < best_rate:
                    best, best_rate = (i, j), rate
        if best is None:
            return [f[a] for f, a in zip(fronts, at, strict=True)], False
        i, j = best
        left -= fronts[i][at[i]].macs - fronts[i][j].macs
        at[i] = j
    return [f[a] for f, a in zip(fronts, at, strict=True)], True
