"""Allocation: which candidate each layer takes, greedy on bytes saved per unit of error.

Every layer starts at its float weights (choice ``float``: no bytes saved, no error).
Its options are the Pareto front of its measured (bytes, error) candidates: sorted by
bytes, decreasing, with error increasing. One step moves one layer to a cheaper option;
the greedy step with the best ratio

    (bytes saved) / (error added),   error = ||y - y_ref||^2 / ||y_ref||^2

goes first, where y is the network output with only that layer's change (sensitivity.py).
Relative output noise energy of independent layer errors adds up, so the path of
greedy steps is, to first order, the cheapest way to every error level. The search
(search.py) then walks this path against the real budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from .patches import Patch

EPS = 1e-12


@dataclass(frozen=True)
class Option:
    """One setting of one layer: its patch (None = float weights), bytes and error."""

    tag: str
    patch: Patch | None
    bytes: int
    error: float
    sqnr_db: float


def pareto(options: list[Option]) -> list[Option]:
    """Options by decreasing bytes, keeping only those with less error than every
    cheaper one would give (dominated options can never be the right choice)."""
    ordered = sorted(options, key=lambda o: (o.bytes, o.error))
    front: list[Option] = []
    for option in ordered:
        if not front or option.error < front[-1].error:
            front.append(option)
    return front[::-1]


State = dict[str, int]  # layer -> index into its Pareto front


def greedy_path(fronts: dict[str, list[Option]]) -> list[State]:
    """States from all-float to every layer at its cheapest option, one step each."""
    state = {layer: 0 for layer in fronts}
    path = [dict(state)]
    while True:
        step = _best_step(fronts, state)
        if step is None:
            return path
        state[step[0]] = step[1]
        path.append(dict(state))


def _best_step(fronts: dict[str, list[Option]], state: State) -> tuple[str, int] | None:
    best, best_score = None, -1.0
    for layer, front in fronts.items():
        current = front[state[layer]]
        for index in range(state[layer] + 1, len(front)):
            saved = current.bytes - front[index].bytes
            score = saved / max(front[index].error - current.error, EPS)
            if score > best_score:
                best, best_score = (layer, index), score
    return best


def size_of(fronts: dict[str, list[Option]], state: State, base_size: int) -> int:
    """Predicted file bytes of ``state`` (the float model's minus what layers save)."""
    return base_size - sum(fronts[k][0].bytes - fronts[k][i].bytes for k, i in state.items())


def predicted_error(fronts: dict[str, list[Option]], state: State) -> float:
    return sum(fronts[k][i].error for k, i in state.items())


def patches_of(fronts: dict[str, list[Option]], state: State) -> list[Patch]:
    return [fronts[k][i].patch for k, i in state.items() if fronts[k][i].patch is not None]


def back_off(fronts: dict[str, list[Option]], state: State) -> State | None:
    """``state`` with its worst layer (largest error) one option safer; None if all
    layers are at float already."""
    changed = [k for k, i in state.items() if i > 0]
    if not changed:
        return None
    worst = max(changed, key=lambda k: (fronts[k][state[k]].error, k))
    return state | {worst: state[worst] - 1}
