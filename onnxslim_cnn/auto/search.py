"""Walk the greedy allocation path against the real budget on the calibration data.

Budget mode: binary search for the last state on the path whose combined model meets
the (shared) budget on the calibration samples; error grows along the path, so the
first failing state bounds the search.

Size mode (``target_size``): the first state whose file reaches the target (measured:
the spliced model's bytes, after the compact-names pass when one follows);
if that combination exceeds the budget, back off layer by layer, worst error first,
until it fits (it then misses the target, which the report says); after a bounded
number of back-off steps, the budget mode's answer.

A state meets the budget when its metrics do on the held-out calibration samples and
also the mean cosine minus two standard errors,
since the search stops right at the budget's edge and the held-out set is small.

Top-1 on a hundred samples is one point per sample, so a top-1 drop over the budget
fails a state only when it is significant or the expected accuracy drops over the
budget too (validate.check_budget); the manager's validation on more samples, with its
back-off, has the last word on states that are lucky on the calibration samples.

Every judged state is kept in ``explored`` (size, metrics) for the report's plot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import model_io, validate
from ..config import Budget
from .allocate import Option, State, back_off, patches_of, size_of
from .patches import splice


def shared_budget(budget: Budget, share: float) -> Budget:
    """``budget`` with only ``share`` of each allowed loss (share 1 = the budget)."""
    agree = budget.min_top1_agreement
    return Budget(max_top1_drop=share * budget.max_top1_drop,
                  min_cosine=1 - share * (1 - budget.min_cosine),
                  min_top1_agreement=None if agree is None else 1 - share * (1 - agree),
                  top1_replaces_cosine=budget.top1_replaces_cosine)


@dataclass
class Judge:
    """Judges states on the calibration samples; remembers every verdict."""

    base: onnx.ModelProto
    fronts: dict[str, list[Option]]
    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    budget: Budget
    progress: Callable[[str], None]
    explored: list[dict] = field(default_factory=list)
    # bytes of a model as it will be written (compact_names.compacted_bytes when that
    # pass follows)
    file_bytes: Callable[[onnx.ModelProto], int] = model_io.model_bytes

    def __post_init__(self):
        self.ref = validate.run_model(self.base, self.batches)
        self.base_size = model_io.model_bytes(self.base)
        self.verdicts: dict[tuple, str | None] = {}
        self.files: dict[tuple, int] = {}

    def model(self, state: State) -> onnx.ModelProto:
        return splice(self.base, patches_of(self.fronts, state))

    def size(self, state: State) -> int:
        """Predicted bytes: the float model's minus what the patches save."""
        return size_of(self.fronts, state, self.base_size)

    def file_size(self, state: State, model: onnx.ModelProto | None = None) -> int:
        """Bytes of ``state``'s model (``model``, when already spliced) as the run will
        write it."""
        key = tuple(sorted(state.items()))
        if key not in self.files:
            self.files[key] = self.file_bytes(model or self.model(state))
        return self.files[key]

    def fails(self, state: State) -> str | None:
        """None when ``state``'s combined model meets the budget, else the reason."""
        key = tuple(sorted(state.items()))
        if key not in self.verdicts:
            model = self.model(state)
            out = validate.run_model(model, self.batches)
            metrics = validate.compare(self.ref, out, self.labels)
            reason = validate.check_budget(metrics, self._resolvable(metrics.samples)) \
                or self._unsure(out)
            self.verdicts[key] = reason
            self._note(state, metrics, reason, self.file_size(state, model))
        return self.verdicts[key]

    def _resolvable(self, samples: int) -> Budget:
        """The budget, with a top-1 drop of at least one sample: a held-out set of a few
        dozen samples cannot resolve less, and the manager's validation on more
        samples (with its back-off) has the last word."""
        least = 100.0 / max(samples, 1)
        return dataclasses.replace(self.budget, max_top1_drop=max(self.budget.max_top1_drop,
                                                                  least))

    def _unsure(self, out: dict[str, np.ndarray]) -> str | None:
        """Why the cosine budget might fail on unseen samples: the mean cosine minus
        ``Z`` standard errors must meet it too (the held-out set is small). Top-1 gets
        no such bound: on a few dozen samples one flip already exceeds any budget."""
        for name, ref in self.ref.items():
            low = _bound(_cosines(ref, out[name]), -Z)
            floor = self.budget.cosine_floor(labelled=self.labels is not None)
            if low < floor:
                return f"cosine lower bound {low:.5f} < {floor}"
        return None

    def _note(self, state: State, metrics: validate.Metrics, reason: str | None,
              size: int) -> None:
        self.explored.append({"kind": "measured", "bytes": size, "cosine": metrics.cosine,
                              "sqnr_db": metrics.sqnr_db, "top1_drop": metrics.top1_drop,
                              "top1_agreement": metrics.top1_agreement,
                              "within_budget": reason is None})
        self.progress(f"[auto-compress] tried {size / 1e3:.1f} KB: "
                      + ("within budget" if reason is None else reason))


Z = validate.Z


def _bound(values: np.ndarray, z: float) -> float:
    """Mean of ``values`` plus ``z`` standard errors."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean() + z * values.std() / np.sqrt(max(len(values), 1)))


def _cosines(r: np.ndarray, y: np.ndarray) -> np.ndarray:
    r2 = r.reshape(len(r), -1).astype(np.float64)
    y2 = y.reshape(len(y), -1).astype(np.float64)
    norms = np.linalg.norm(r2, axis=1) * np.linalg.norm(y2, axis=1)
    return np.where(norms > 0, np.sum(r2 * y2, axis=1) / np.where(norms > 0, norms, 1), 1.0)


def by_budget(judge: Judge, path: list[State]) -> State:
    """The last state of ``path`` within the budget (path[0], all float, always is)."""
    low, high = 0, len(path) - 1
    if not judge.fails(path[high]):
        return path[high]
    while high - low > 1:
        mid = (low + high) // 2
        if judge.fails(path[mid]):
            high = mid
        else:
            low = mid
    return path[low]


def by_size(judge: Judge, path: list[State], target: int, max_steps: int = 16) -> State:
    """The first state reaching ``target`` bytes, backed off (worst layer first, at
    most ``max_steps`` times) until within budget; failing that, ``by_budget``."""
    state = _first_reaching(judge, path, target)
    for _ in range(max_steps):
        if not judge.fails(state):
            return state
        state = back_off(judge.fronts, state)
        if state is None:
            break
    return by_budget(judge, path)


def _first_reaching(judge: Judge, path: list[State], target: int) -> State:
    """The first state of ``path`` whose file has at most ``target`` bytes (files shrink
    along the path: binary search), else the last one."""
    if judge.file_size(path[0]) <= target:
        return path[0]
    if judge.file_size(path[-1]) > target:
        return path[-1]
    low, high = 0, len(path) - 1  # path[low] above the target, path[high] within it
    while high - low > 1:
        mid = (low + high) // 2
        if judge.file_size(path[mid]) <= target:
            high = mid
        else:
            low = mid
    return path[high]
