"""auto-compress: the smallest mix of per-layer weight encodings within the budget.

Composes the weight-storage passes layer by layer instead of applying one setting to
the whole model:

1. variants (variants.py): each candidate (``int8``, ``c6`` .. ``c2`` = cluster-weights
   at that many bits) is run once on the whole float model through the pass registry;
2. patches (patches.py): each layer's decode subgraph is cut out of every variant;
3. sensitivity (sensitivity.py): the network output error with only that one patch,
   measured once per (layer, candidate) on a subset of the calibration samples;
4. allocation (allocate.py): greedy steps on bytes saved per unit of added error give a
   path from all-float to all-cheapest;
5. search (search.py): the last state of the path whose combined model meets the budget
   on the calibration samples (binary search), or the first reaching ``target_size``,
   backed off worst layer first while it exceeds the budget.

The candidate passes fit on the first two thirds of the calibration batches; steps 3
and 5 measure on the last third, which they did not see (sensitivity.hold_out).

Before:  W1 fp32 -> Conv1 ... W9 fp32 -> Conv9
After:   W1 int8 (Cast, Mul) -> Conv1 ... W9 3-bit codebook -> Conv9 ... (per layer)

Declines when (per layer, kept float): no candidate's pass accepted the layer, or
every candidate would take the combined model outside the budget.
The manager still validates the result against the original on the validation samples;
when that fails it calls ``back_off``, which moves the worst layer one setting safer
(a size search, or one judged on labels, whose choice lies on the allocation path
steps back along the path).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from .. import model_io
from ..errors import PreconditionError, UsageError
from ..passes.base import Pass, PassContext, PassResult, register
from ..passes.compact_names import compacted_bytes
from . import allocate, search, sensitivity, variants
from .patches import compute_nodes, extract


@dataclass(frozen=True)
class AutoOptions:
    """Options of auto-compress.

    Attributes:
        auto_candidates: candidate tags (variants.candidate), e.g. ``int8,c4,c3``.
        auto_budget_share: fraction of the accuracy budget the search may spend on the
            calibration data (the rest is margin for unseen data).
        auto_samples: calibration samples used per sensitivity measurement.
        target_size: stop at the first allocation whose file is at most this many bytes.
    """

    auto_candidates: tuple[str, ...] = ("f16", "int8", "c6", "c5", "c4", "c3")
    auto_budget_share: float = 1.0
    auto_samples: int = 32
    target_size: int | None = None


def _top1_only(judge: search.Judge) -> bool:
    """Whether ``judge`` decides by top-1 alone (no cosine floor in force)."""
    return judge.labels is not None and judge.budget.top1_replaces_cosine


@register
class AutoCompress(Pass):
    name = "auto-compress"
    summary = "per-layer mix of int8 / codebook weights chosen by sensitivity within the " \
              "budget or --target-size (lossy)"
    lossless = False
    min_opset = 14  # the highest of the candidate passes (cluster-weights)
    after = ("fold-bn", "remove-identity", "fold-constants")
    Options = AutoOptions

    def __init__(self, options: dict[str, Any] | None = None):
        super().__init__(options)
        self.flat = dict(options or {})  # forwarded to the candidate passes
        self.explored: list[dict] = []
        self._last = None  # (fronts, measured options, judge, chosen state) of run()
        self._steps = 0  # back-offs since run()
        self._path: list | None = None  # greedy path of a search that backs off along it,
        self._at = 0  # and the index of its choice on it (path back-off)
        self._doubling = False  # back-off s goes 2^(s-1) states back along the path
        self._floor = None  # (judge with the cosine floor, index of its choice on the path)

    def check_options(self) -> None:
        o = self.options
        if not 0 < o.auto_budget_share <= 1:
            raise UsageError(f"--auto-budget-share must be in (0, 1], got "
                             f"{o.auto_budget_share}")
        if o.auto_samples < 1:
            raise UsageError("auto_samples must be at least 1")
        for tag in o.auto_candidates:
            variants.candidate(tag)  # UsageError for an unknown one

    def reads(self) -> set[str]:
        return super().reads() | variants.forwarded(self.options.auto_candidates)

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        if not ctx.calib:
            raise PreconditionError("auto-compress needs calibration (or random) samples")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        base = gs.export_onnx(graph, do_type_check=False)
        del base.graph.value_info[:]
        fit, held, labels = sensitivity.hold_out(ctx.calib, ctx.calib_labels)
        # one memo: the cluster candidates share their input statistics
        by_layer = self._patches(base, dataclasses.replace(ctx, calib=fit, calib_labels=None,
                                                           memo={}))
        result = PassResult(changed=False)
        if not by_layer:
            result.declined["no candidate pass accepted any layer"] += 1
            return result
        fronts, every = self._fronts(base, by_layer, held, ctx.progress)
        budget = search.shared_budget(ctx.budget, self.options.auto_budget_share)
        if budget.top1_replaces_cosine and ctx.calib_labels is not None:
            # top-1 alone: on the held-out third one flip is ~3 points, so the search
            # would take nearly anything (ResNet-8: its all-2-bit mix, cosine 0.77).
            # Every calibration sample resolves 1 point; the candidates fitted only
            # per-layer weights on two thirds of them, not the top-1 decisions.
            held, labels = ctx.calib, ctx.calib_labels
        judge = search.Judge(base, fronts, held, labels, budget, ctx.progress,
                             file_bytes=compacted_bytes if "compact-names" in ctx.later
                             else model_io.model_bytes)
        path = allocate.greedy_path(fronts)
        target = self.options.target_size
        state = search.by_budget(judge, path) if target is None else \
            search.by_size(judge, path, target)
        self.explored = [_predicted(fronts, s, judge) for s in path] + judge.explored
        self._last = (fronts, every, judge, state)
        self._steps = 0
        top1 = _top1_only(judge) and target is None and state in path
        # a size search, and one whose top-1 verdicts came from the held-out third (a
        # flip is ~3 points there) under a cosine floor too weak to hold it (SqueezeNet,
        # --min-cosine 0 --max-top1-drop 1: 12 layer steps did not reach the budget and
        # nothing was compressed), step back along the path, 1, 2, 4, ... states
        self._doubling = state in path and not top1 and (
            target is not None or judge.labels is not None)
        self._path, self._at = (path, path.index(state)) if top1 or self._doubling else \
            (None, 0)
        self._floor = None
        self._describe(result, fronts, every, state, judge)
        if result.changed:
            _replace(graph, judge.model(state))
        return result

    def back_off(self, graph: gs.Graph) -> PassResult | None:
        """After the manager's validation failed: make ``graph`` the last result with
        its worst layer (largest measured error) one setting safer (a search judged by
        top-1 alone first steps back along its path, ``_path_step``; a size search,
        or one judged on labels under a cosine floor, whose choice lies on the path
        goes 1, 2, 4, ... states back along it); None when every layer is float
        already or ``run`` has not run."""
        if self._last is None:
            return None
        fronts, every, judge, state = self._last
        self._steps += 1
        if self._doubling:
            # undo the path's last steps, the least bytes per error first (a layer step
            # may give back the most bytes for its error)
            self._at -= 1 << (self._steps - 1)
            safer = self._path[self._at] if self._at > 0 else None
        elif self._path is not None:
            judge, safer = self._path_step(judge, fronts, state)
        else:
            safer = allocate.back_off(fronts, state)
        if safer is None or not any(safer.values()):
            return None
        state = safer
        self._last = (fronts, every, judge, state)
        result = PassResult(changed=True)
        self._describe(result, fronts, every, state, judge)
        _replace(graph, judge.model(state))
        return result

    def _path_step(self, judge: search.Judge, fronts, state) -> tuple:
        """(judge, safer state) for a search judged by top-1 alone.

        Such a search (``Budget.top1_replaces_cosine``) sees a few dozen held-out
        samples, where one flip is several points, so it can overshoot far (ResNet-8:
        its cheapest mix, 11.5 points on validation; EfficientNet-Lite0: 13). Single
        layer steps walk back too slowly, so back-off s goes 2^(s-1) states back along
        the allocation's own path (largest error per byte saved undone first); once
        that passes the state the same search picks with the cosine floor back (a far
        smoother signal on few samples), it retreats there and layer steps go on."""
        if self._floor is None:
            floored = dataclasses.replace(
                judge, budget=dataclasses.replace(judge.budget, top1_replaces_cosine=False),
                explored=[])
            self._floor = (floored, self._path.index(search.by_budget(floored, self._path)))
            judge.explored.extend(floored.explored)
        floored, floor = self._floor
        self._at -= 1 << (self._steps - 1)
        if self._at > floor:
            return judge, self._path[self._at]
        retreat, self._path = self._path[floor], None  # layer steps from here on
        return floored, retreat if retreat != state else allocate.back_off(fronts, state)

    def _patches(self, base: onnx.ModelProto, ctx: PassContext) -> dict[str, list]:
        by_layer: dict[str, list] = {}
        for tag in self.options.auto_candidates:
            cand = variants.candidate(tag)
            ctx.progress(f"[auto-compress] candidate {tag}: {cand.summary}")
            variant = variants.make_variant(base, cand, self.flat, ctx)
            if variant is None:
                continue
            for layer, patch in extract(base, variant, tag).items():
                by_layer.setdefault(layer, []).append(patch)
        return by_layer

    def _fronts(self, base, by_layer, batches, progress):
        inits = {t.name: t.ByteSize() for t in base.graph.initializer}
        nodes = compute_nodes(base)
        own = {k: sum(inits.get(i, 0) for i in nodes[k].input) for k in by_layer}
        sens = sensitivity.Sensitivity(
            base, sensitivity.subset(batches, self.options.auto_samples), progress)
        every = sens.measure_all(by_layer, own)
        return {k: allocate.pareto(v) for k, v in every.items()}, every

    def _describe(self, result: PassResult, fronts, every, state, judge) -> None:
        declined = Counter()
        for layer, index in sorted(state.items()):
            record = _layer_record(layer, fronts[layer], index, every[layer])
            result.layers.append(record)
            if index == 0:
                declined["kept float: every candidate exceeds the budget"] += 1
        result.declined.update(declined)
        result.changed = any(state.values())
        chosen = Counter(fronts[k][i].tag for k, i in state.items())
        result.stats.update({f"layers_{tag}": n for tag, n in sorted(chosen.items())})
        result.stats.update(predicted_bytes=judge.size(state), states_tried=len(judge.explored),
                            sensitivity_runs=sum(len(v) - 1 for v in every.values()))
        if self.options.target_size is not None:
            result.stats["target_reached"] = int(judge.file_size(state)
                                                 <= self.options.target_size)


def _layer_record(layer: str, front: list, index: int, measured: list) -> dict:
    chosen = front[index]
    cheaper = {o.tag: "exceeds the budget with the other layers' choices"
               for o in front[index + 1:]}
    dominated = {o.tag: "dominated (another candidate is smaller with less error)"
                 for o in measured if all(o is not f for f in front)}
    return {"layer": layer, "applied": chosen.tag, "bytes_before": front[0].bytes,
            "bytes_after": chosen.bytes, "sqnr_db": round(chosen.sqnr_db, 2),
            "candidates_sqnr_db": {o.tag: round(o.sqnr_db, 2) for o in measured[1:]},
            "declined": cheaper | dominated}


def _predicted(fronts, state, judge: search.Judge) -> dict:
    """A point of the greedy path as the sensitivities predict it (errors add up)."""
    error = allocate.predicted_error(fronts, state)
    return {"kind": "predicted", "bytes": judge.size(state),
            "sqnr_db": sensitivity.to_db(error), "within_budget": None}


def _replace(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Make ``graph`` the graph of ``model`` (the pass contract: mutate the graph)."""
    new = gs.import_onnx(model)
    graph.nodes, graph.inputs, graph.outputs = new.nodes, new.inputs, new.outputs
