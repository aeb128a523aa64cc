"""svd-split: replace a Conv/Gemm/MatMul by two thinner ones from a truncated SVD (lossy).

Why: a k x k conv C_in -> C_out whose responses live in a low-dimensional subspace costs
C_out*C_in*k^2 per position; split at rank r it costs r*(C_in*k^2 + C_out) (channel) or
about r*k*(C_in + C_out) (spatial), fewer parameters and FLOPs.

Before:   x -> Conv(W: C_out x C_in x k x k, b) -> y
After (channel):  x -> Conv(k x k, C_in -> r) -> Conv(1 x 1, r -> C_out, b') -> y
After (spatial):  x -> Conv(k x 1, C_in -> r) -> Conv(1 x k, r -> C_out, b') -> y
Gemm/MatMul: x -> Gemm(A) -> Gemm(B, b')   (W ~ B A)

Rank choice, per layer (factor.py holds the math, stats.py the data, site.py the costs):
- ``rank_ratio``: r = ceil(ratio * full rank), from the plain SVD of W;
- ``energy``: the smallest r keeping that fraction of sum(s_i^2), plain SVD;
- ``svd_target_macs``: the ranks (and modes) removing that share of the split-able
  layers' MACs with the least output error, chosen across layers (target.py);
- default, data-aware: SVD of W Sigma^{1/2} (Sigma the covariance of the layer's im2col
  inputs on the calibration data), the smallest r whose relative output error stays
  within ``svd_error``. If the split model's top-1 agreement with the original on the
  calibration data falls below 1 - 2 max_top1_drop/100 (or its cosine loss exceeds half
  the budget's), the per-layer budget is halved and the choice repeated (at most ``BACKOFF`` times).
Each layer gets the mode (channel, spatial, none) with the fewest MACs among those
saving at least ``svd_min_saving`` of both its parameters and its MACs. A Conv whose
channel counts are multiples of ALIGN gets a rank that is one too (``aligned``: rounded
up), so both halves keep onnxruntime's blocked kernels.

``distill_steps`` > 0 then tunes the factors of all split layers together towards the
unsplit model's outputs by gradient descent on the calibration data (onnxslim_cnn/recover):
the rank choice fits each layer alone, this repairs what their errors build together.

Declines when: see site.py (depthwise/grouped conv, non-constant weight, ...); no rank
within the budget saves enough ("no saving").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ... import validate
from ...errors import UsageError
from ...recover import layers as tuning  # a module: recover.layers imports passes.base
from ..base import Pass, PassContext, PassResult, register, taken_names
from ..qdq.bias_correct import subset
from . import rewrite, stats, target
from .factor import Channel, Factors, Spatial, build, smallest_rank
from .site import Site, find_site

MODES = ("auto", "channel", "spatial")
SPLIT_OPS = ("Conv", "Gemm", "MatMul")
BACKOFF = 3


@dataclass(frozen=True)
class SvdOptions:
    """Options of svd-split.

    Attributes:
        rank_ratio: force r = ceil(ratio * full rank) (data-free).
        energy: force the smallest r keeping this fraction of the squared singular
            values (data-free).
        svd_error: data-aware per-layer budget: relative output error on calibration data.
        svd_target_macs: remove this share of the split-able layers' MACs, ranks chosen
            across layers for the least output error (target.py).
        svd_mode: ``auto`` (pick per layer), ``channel`` or ``spatial`` only.
        svd_min_saving: a split must save at least this fraction of the layer's
            parameters and MACs (the extra node costs latency).
        distill_steps: tune the factors of every split layer together towards the
            unsplit model on the calibration data (onnxslim_cnn/recover); 0: off.
    """

    rank_ratio: float | None = None
    energy: float | None = None
    svd_error: float = 0.1
    svd_target_macs: float | None = None
    svd_mode: str = "auto"
    svd_min_saving: float = 0.2
    distill_steps: int = 0


@dataclass
class Choice:
    site: Site
    factors: Factors | None
    record: dict


@register
class SvdSplit(Pass):
    name = "svd-split"
    summary = "low-rank split of Conv/Gemm/MatMul into two layers, fitted to data (lossy)"
    lossless = False
    after = ("fold-bn",)
    Options = SvdOptions

    def check_options(self) -> None:
        o = self.options
        for flag, value in (("rank-ratio", o.rank_ratio), ("energy", o.energy)):
            if value is not None and not 0 < value <= 1:
                raise UsageError(f"--{flag} must be in (0, 1], not {value}")
        if sum(v is not None for v in (o.rank_ratio, o.energy, o.svd_target_macs)) > 1:
            raise UsageError("give one of --rank-ratio, --energy, --svd-target-macs")
        if o.svd_target_macs is not None and not 0 < o.svd_target_macs < 1:
            raise UsageError(f"--svd-target-macs must be in (0, 1), not {o.svd_target_macs}")
        if not o.svd_error > 0 or not 0 <= o.svd_min_saving < 1:
            raise UsageError("--svd-error must be > 0 and --svd-min-saving in [0, 1)")
        if o.svd_mode not in MODES:
            raise UsageError(f"--svd-mode takes {', '.join(MODES)}, not {o.svd_mode}")
        if o.distill_steps < 0:
            raise UsageError(f"--distill-steps must be 0 or more, got {o.distill_steps}")

    @property
    def data_free(self) -> bool:
        return self.options.rank_ratio is not None or self.options.energy is not None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        sites = self._sites(graph, result)
        if not sites:
            return result
        # the unsplit model, exported once: statistics, back-off and distillation read it
        original = gs.export_onnx(graph, do_type_check=False) if ctx.calib and (
            not self.data_free or self.options.distill_steps) else None
        moments = {} if self.data_free or original is None else stats.collect(
            original, sites, ctx.calib, ctx.seed, progress=ctx.progress)
        factorisers = {s.key: self._factorisers(s, moments.get(s.key)) for s in sites}
        budget = self.options.svd_error
        if self.options.svd_target_macs is not None:
            choices = self._choose_target(original, sites, factorisers, moments, ctx, result)
        else:
            choices = self._choose_all(sites, factorisers, moments, budget)
        if moments and ctx.evaluate is not None and self.options.svd_target_macs is None:
            choices, budget = self._backoff(original, sites, factorisers, moments, ctx,
                                            choices)
        taken = taken_names(graph)
        before = set(map(id, graph.nodes))
        for c in choices:
            if c.factors is None:
                result.declined[c.record["why"]] += 1
            else:
                rewrite.install(graph, c.site, c.factors, taken)
            result.layers.append(c.record)
        result.changed = any(c.factors is not None for c in choices)
        if self.options.distill_steps and original is not None and result.changed:
            new = [n for n in graph.nodes if id(n) not in before and n.op in SPLIT_OPS]
            tuning.tune_nodes(original, graph, new, False, ctx, self.options.distill_steps,
                              result, taken)
        result.stats.update(_totals(choices), data_aware=int(bool(moments)))
        if moments and self.options.svd_target_macs is None:
            result.stats["layer_error_budget"] = budget
        return result

    @staticmethod
    def _sites(graph: gs.Graph, result: PassResult) -> list[Site]:
        sites = []
        for node in [n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")]:
            site = find_site(node)
            if isinstance(site, str):
                result.declined[site] += 1
            else:
                sites.append(site)
        return sites

    def _factorisers(self, site: Site, moments) -> list:
        sigma = moments[1] if moments else None
        out = []
        if self.options.svd_mode in ("auto", "channel"):
            out.append(Channel(site.matrix, sigma))
        if self.options.svd_mode in ("auto", "spatial") and site.node.op == "Conv" \
                and site.kernel[0] * site.kernel[1] > 1:
            out.append(Spatial(site.matrix, site.c_in, site.kernel, sigma))
        return out

    def _choose_all(self, sites, factorisers, moments, budget: float) -> list[Choice]:
        return [self._choose(s, factorisers[s.key], moments.get(s.key), budget) for s in sites]

    def _choose(self, site: Site, factorisers: list, moments, budget: float) -> Choice:
        params, macs = site.cost("none")
        record = {"layer": site.name, "op": site.node.op, "params": params, "macs": macs}
        best = None
        for fz in factorisers:
            rank = self._rank(site, fz, budget)
            if rank is None:
                continue
            p, m = site.cost(fz.mode, rank)
            if self._saves(p, m, params, macs) and (best is None or m < best[0]):
                best = (m, p, fz, rank)
        if best is None:
            record.update(mode="kept", why=self._why_kept(site, factorisers, budget))
            return Choice(site, None, record)
        _, _, fz, rank = best
        return _split(site, fz, rank, moments, record)

    def _choose_target(self, original, sites, factorisers, moments, ctx: PassContext,
                       result: PassResult) -> list[Choice]:
        """Per layer the option target.allocate picks (module docstring of target.py)."""
        gains = _reach(original, sites, factorisers, moments, ctx) if moments else \
            [1.0] * len(sites)
        fronts, kept, splittable = [], [], []
        for site, gain in zip(sites, gains, strict=True):
            params, macs = site.cost("none")
            options = [target.Option("kept", 0, macs, 0.0)]
            for fz in factorisers[site.key]:
                high = min(self._max_saving_rank(site, fz.mode), fz.max_rank)
                for rank in target.grid(high, rank_step(site)):
                    p, m = site.cost(fz.mode, rank)
                    if self._saves(p, m, params, macs):
                        options.append(target.Option(fz.mode, rank, m,
                                                     gain * fz.error(rank) ** 2))
            fronts.append(target.front(options))
            kept.append(macs)
            splittable.append(len(options) > 1)
        picked, met = target.allocate(fronts, kept, self.options.svd_target_macs)
        if not met:
            result.declined["MAC target above what the layers allow"] += 1
        choices = []
        for site, option, gain, can in zip(sites, picked, gains, splittable, strict=True):
            params, macs = site.cost("none")
            record = {"layer": site.name, "op": site.node.op, "params": params,
                      "macs": macs, "reach": round(gain, 4)}
            if option.mode == "kept":
                record.update(mode="kept", why="kept: the MAC target is met without it"
                              if can else self._why_kept(site, factorisers[site.key]))
                choices.append(Choice(site, None, record))
                continue
            fz = next(f for f in factorisers[site.key] if f.mode == option.mode)
            choices.append(_split(site, fz, option.rank, moments.get(site.key), record))
        return choices

    def _rank(self, site: Site, fz, budget: float) -> int | None:
        o = self.options
        if o.rank_ratio is not None:
            rank = max(1, math.ceil(o.rank_ratio * fz.max_rank))
        elif o.energy is not None:
            rank = min(fz.energy_rank(o.energy), fz.max_rank)
        else:
            rank = smallest_rank(fz.error, budget, min(self._max_saving_rank(site, fz.mode),
                                                       fz.max_rank))
        return None if rank is None else min(aligned(site, rank), fz.max_rank)

    def _max_saving_rank(self, site: Site, mode: str) -> int:
        """Largest rank that still saves ``svd_min_saving`` of params and MACs."""
        keep = 1 - max(self.options.svd_min_saving, 1e-9)
        p1, m1 = site.cost(mode, 1)
        p0, m0 = site.cost("none")
        return math.floor(min(keep * p0 / p1, keep * m0 / m1))

    def _saves(self, p: int, m: int, p0: int, m0: int) -> bool:
        keep = 1 - self.options.svd_min_saving
        return p < p0 and m < m0 and p <= keep * p0 and m <= keep * m0

    def _why_kept(self, site: Site, factorisers: list, budget: float | None = None) -> str:
        """Why no split of ``site`` was taken (``budget``: the per-layer error budget;
        None under the MAC target, where every saving rank was a candidate)."""
        share = f"{self.options.svd_min_saving:.0%}"
        if self.data_free:
            return f"the chosen rank saves less than {share} of params and FLOPs"
        highs = [min(self._max_saving_rank(site, fz.mode), fz.max_rank) for fz in factorisers]
        if all(high < 1 for high in highs):
            return f"no rank saves {share} of params and FLOPs"
        blocked = f"a multiple of {rank_step(site)} (blocked kernels)"
        if budget is None:
            return f"no rank that is {blocked} saves {share} of params and FLOPs"
        if any(smallest_rank(fz.error, budget, high)
               for fz, high in zip(factorisers, highs, strict=True)):
            return f"the rank meeting the error budget, rounded up to {blocked}, saves " \
                   f"less than {share}"
        return f"no rank saving {share} of params and FLOPs meets the error budget"

    def _backoff(self, original, sites, factorisers, moments, ctx, choices):
        """Halve the per-layer budget until the split model agrees with ``original`` (the
        unsplit model) on the calibration data (see the module docstring)."""
        reference = ctx.evaluate(original)
        budget = self.options.svd_error
        for attempt in range(BACKOFF + 1):
            if attempt:
                budget /= 2
                choices = self._choose_all(sites, factorisers, moments, budget)
            metrics = validate.compare(reference, ctx.evaluate(_trial(original, choices)))
            ctx.progress(f"svd-split: layer budget {budget:g}: calibration top-1 agreement "
                         f"{metrics.top1_agreement}, cosine {metrics.cosine:.5f}")
            if _acceptable(metrics, ctx):
                break
        return choices, budget


REACH_SAMPLES = 32
# onnxruntime runs a conv in its blocked layout (NCHWc: channels in blocks of 8 on AVX2,
# 16 on AVX-512) only when its channel counts are multiples of the block; a split of such
# a layer at another rank puts layout reorders and plain kernels around both halves
# (SqueezeNet at 25 % fewer MACs: 8 reorders, 1.11x slower at 2 threads; see aligned)
ALIGN = 16


def rank_step(site: Site) -> int:
    """ALIGN for a Conv whose input and output channels are multiples of it (its ranks
    must be too, so both halves keep the blocked kernels), else 1."""
    blocked = site.node.op == "Conv" and site.c_in % ALIGN == 0 and site.c_out % ALIGN == 0
    return ALIGN if blocked else 1


def aligned(site: Site, rank: int) -> int:
    """``rank`` rounded up to a multiple of the layer's ``rank_step``."""
    step = rank_step(site)
    return -(-rank // step) * step


def _split(site: Site, fz, rank: int, moments, record: dict) -> Choice:
    """The choice splitting ``site`` with ``fz`` at ``rank`` (``moments``: the site's
    (mean, covariance) or None), its figures added to ``record``."""
    f = build(fz, rank, site.bias, moments[0] if moments else None)
    p, m = site.cost(fz.mode, rank)
    record.update(mode=fz.mode, rank=rank, full_rank=fz.max_rank,
                  rel_error=round(f.error, 5), params_after=p, macs_after=m)
    return Choice(site, f, record)


def _reach(original, sites, factorisers, moments, ctx: PassContext) -> list[float]:
    """g_l of target.py per site: the model-output noise energy with only that layer
    split at the rank the default budget would give it (error <= svd_error's default),
    over the layer's own e_l^2 there, on REACH_SAMPLES calibration samples."""
    batches = subset(ctx.calib, REACH_SAMPLES)
    reference = validate.run_model(original, batches)
    gains = []
    for i, site in enumerate(sites):
        ctx.progress(f"svd-split: reach of layer {i + 1}/{len(sites)} {site.name}")
        if not factorisers[site.key]:  # no mode applies (a 1x1 conv, spatial only)
            gains.append(1.0)
            continue
        fz = factorisers[site.key][0]
        rank = smallest_rank(fz.error, SvdOptions.svd_error, fz.max_rank) or fz.max_rank
        f = build(fz, rank, site.bias, moments[site.key][0])
        if f.error <= 0:
            gains.append(1.0)
            continue
        probe = _trial(original, [Choice(site, f, {})])
        metrics = validate.compare(reference, validate.run_model(probe, batches))
        gains.append(10 ** (-metrics.sqnr_db / 10) / f.error ** 2)
    return gains


def _acceptable(metrics: validate.Metrics, ctx: PassContext) -> bool:
    """The calibration outputs keep half the budget's cosine loss and top-1 agreement of
    at least 1 - 2 * max_top1_drop / 100 (or the budget's own agreement floor). The
    calibration data has no labels, so agreement stands in for the top-1 drop: samples
    flip both ways, the drop is a fraction of the disagreement."""
    agree = metrics.top1_agreement
    floor = ctx.budget.min_top1_agreement
    if floor is None:
        floor = 1 - 2 * ctx.budget.max_top1_drop / 100
    cosine = (1 + ctx.budget.cosine_floor(labelled=agree is not None)) / 2
    return metrics.cosine >= cosine and (agree is None or agree >= floor)


def _trial(original, choices: list[Choice]):
    """``original`` with ``choices`` installed, as a ModelProto (the graph is untouched)."""
    graph = gs.import_onnx(original)
    nodes = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
    taken = taken_names(graph)
    for c in choices:
        if c.factors is not None:
            site = dataclasses.replace(c.site, node=nodes[c.site.key])
            rewrite.install(graph, site, c.factors, taken)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(graph, do_type_check=False)


def _totals(choices: list[Choice]) -> dict[str, float]:
    split = [c.record for c in choices if c.factors is not None]
    kept = [c.record for c in choices if c.factors is None]
    before_p = sum(r["params"] for r in split + kept)
    before_m = sum(r["macs"] for r in split + kept)
    after_p = sum(r["params_after"] for r in split) + sum(r["params"] for r in kept)
    after_m = sum(r["macs_after"] for r in split) + sum(r["macs"] for r in kept)
    return {"layers_split": len(split), "layers_kept": len(kept),
            "site_params_before": before_p, "site_params_after": after_p,
            "site_macs_before": before_m, "site_macs_after": after_m,
            "macs_saved_fraction": round(1 - after_m / before_m, 4) if before_m else 0.0}
