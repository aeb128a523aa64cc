"""cluster-weights: weight sharing, k-means codebooks with data-aware centroids (lossy).

Every Conv/Gemm/MatMul weight is replaced by k = 2^b shared values (b = 1..8 per layer):
b-bit packed indices plus a codebook per tensor, per output channel, or one per tensor
times a scale per output channel (``scaled``: O + k floats; BN-folded weights differ in
scale from channel to channel, which a shared codebook wastes its levels on), decoded
by ops onnxruntime folds at load (storage.encode_codebook), so the file shrinks ~32/b
times and inference speed is unchanged.

Before:  W[O, C, kh, kw] fp32 -> Conv
After:   packed idx (b bits) -> unpack -> Gather(codebook[k] or [O*k]) [-> Mul(scale[O])]
         -> Conv

Steps per layer: exact 1-D k-means (kmeans.py; linear/density/k-means++ init, seeded;
a pruned layer keeps an exact 0 centroid so zeros stay zeros); with calibration data,
error-feedback assignment of the weights to those centroids (assign.py, GPTQ-style)
and least-squares centroids minimising the layer's output error on calibration patches
(refine.py: a k x k system per codebook), then a bias correction cancelling the mean
output error (b' = b - (w' - w) . mu). With data the layers go in sequential order
(sequence.py): each is fitted on its input in the model whose earlier layers are already
clustered, towards its original output. Bits per layer (select.py): fixed ``bits``, or
the cheapest bits meeting ``min_sqnr_db``, or a size budget ``avg_bits`` spread by
marginal network-noise drop per byte: candidates are scored after k-means + bias
correction, plus the refinement gain measured at ``PROBE_BITS``, and weighted by each
layer's measured network sensitivity (sensitivity.py). Output SQNR per layer,
10 log10(w^T G w / e^T S e) with G the second moment of the layer's input patches
(S: G, or their covariance when the bias absorbs the mean), is reported for k-means
(``sqnr_kmeans_db``) and the result (``sqnr_db``); their mean difference is
``mean_refine_gain_db``.

With ``distill_steps`` (and data) the clustered layers are first installed as dense
decoded weights; their codebooks, scales and biases, and each weight's latent value
(re-assigned to its nearest centroid every step: a straight-through estimate), are then
tuned together towards the pass's input model (tune.py, recover/distill.py), and the
result is encoded as above. Declined, the clustering kept, when that does not lower
the loss on held-out calibration samples (recover/distill.py).

After prune-weights: a weight it stored sparse is decoded to a dense constant again
(sites.densify_sparse), clustered with an exact 0 centroid for its zeros, and a
per-tensor codebook is then stored sparse too (storage.encode_sparse with the codebook
indices of the nonzeros as its values: n/8 + nnz * b/8 bytes instead of n * b/8, e.g.
3 bits per weight at 50 % sparsity and 4 bits); a weight left unclustered is stored
sparse again as prune-weights left it.

float16 models stay float16: a float16 weight's codebook holds float16 entries and its
Gather decodes float16 (a ``scaled`` one multiplies in float32 and casts at the end:
onnxruntime has no float16 Mul on CPU to fold), a corrected bias keeps its dtype.

Declines when: the weight is not a float32 or float16 constant, is shared by several
nodes, the Conv is not 2-D or uses auto_pad, a Gemm uses transA, or the encoding would
not make the file smaller (tiny tensors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ... import storage
from ...errors import UsageError
from ...recover import layers as tuning  # a module: recover.layers imports passes.base
from ..base import Pass, PassContext, PassResult, register, replace_uses, taken_names, unique_name
from . import kmeans, refine, select, sensitivity, sequence, sites, tune

SMALL = 64 * 1024  # below this many dense bytes, encode in a scratch graph first
PROBE_BITS = 3  # width at which each layer's network sensitivity is measured
# widths a budget chooses from: 1 bit is never worth it and 7 rarely beats 6 or 8, and
# every candidate costs a k-means per layer
BUDGET_WIDTHS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class ClusterOptions:
    """Options of cluster-weights.

    Attributes:
        bits: index bits for every layer (1..8); None with no budget means 4.
        avg_bits: size budget: average bits per weight, codebooks and (for tensors
            below SMALL) decode nodes included.
        min_sqnr_db: error budget: each layer's cheapest bits reaching this output SQNR.
        granularity: ``auto`` (chosen per layer), ``channel``, ``scaled`` (one codebook
            times a scale per channel) or ``tensor`` codebooks.
        kmeans_init: one of kmeans.INITS.
        data_aware: least-squares centroids on calibration data (else plain k-means).
        sequential_fit: fit each layer on the inputs of the model whose earlier layers
            are already clustered (sequence.py), with calibration data.
        distill_steps: then tune the codebooks, scales, biases and centroid choices of
            all clustered layers together towards the pass's input model for this many
            steps on the calibration data (tune.py); 0: off.
    """

    bits: int | None = None
    avg_bits: float | None = None
    min_sqnr_db: float | None = None
    granularity: str = "auto"
    kmeans_init: str = "linear"
    data_aware: bool = True
    sequential_fit: bool = True
    distill_steps: int = 0


@register
class ClusterWeights(Pass):
    name = "cluster-weights"
    summary = "k-means weight sharing, 1-8 bit codebooks with data-aware centroids (lossy)"
    lossless = False
    min_opset = 14  # uint8 Add of the 3/5/6/7-bit decode
    after = ("fold-bn", "remove-identity", "fold-constants")
    Options = ClusterOptions

    def check_options(self) -> None:
        o = self.options
        if sum(x is not None for x in (o.bits, o.avg_bits, o.min_sqnr_db)) > 1:
            raise UsageError("give one of --bits, --avg-bits, --min-layer-sqnr")
        if o.bits is not None and not 1 <= o.bits <= 8:
            raise UsageError(f"--bits must be in 1..8, got {o.bits}")
        if o.avg_bits is not None and not o.avg_bits > 0:
            raise UsageError(f"--avg-bits must be positive, got {o.avg_bits}")
        if o.granularity not in ("auto", *sites.GRANULARITIES):
            raise UsageError(f"unknown codebook granularity '{o.granularity}'")
        if o.distill_steps < 0:
            raise UsageError(f"--distill-steps must be 0 or more, got {o.distill_steps}")
        if o.kmeans_init not in kmeans.INITS:
            raise UsageError(f"unknown k-means init '{o.kmeans_init}' "
                             f"(known: {', '.join(kmeans.INITS)})")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        taken = taken_names(graph)
        dense = sites.densify_sparse(graph, taken)
        found, declined = sites.find(graph)
        result = PassResult(changed=False)
        result.declined.update(declined)
        # the unclustered model, exported once: input statistics, sensitivities, the
        # sequential fit and distillation read it (all need data)
        original = gs.export_onnx(graph, do_type_check=False) if found and ctx.calib \
            else None
        # with distillation the layers are installed dense first (pending), encoded after
        pending = [] if original is not None and self.options.distill_steps else None
        if found:
            start = time.perf_counter()
            self._run(graph, original, found, ctx, taken, result, pending)
            if pending:
                self._distill(graph, original, pending, ctx, taken, result)
            self._stats(result, time.perf_counter() - start)
        _sparse_again(graph, dense, taken)
        return result

    def _run(self, graph, original, found, ctx, taken, result: PassResult, pending) -> None:
        grams = self._grams(original, found, ctx)
        picks = self._choose(original, found, grams, ctx)
        later = {}
        if self.options.sequential_fit and self.options.data_aware and grams:
            later = {s.key: p for s, p in zip(found, picks, strict=True) if s.key in grams}
        for i, (site, pick) in enumerate(zip(found, picks, strict=True)):
            if site.key not in later:
                ctx.progress(f"cluster-weights: fitting layer {i + 1}/{len(found)} {site.key}")
                reuse = pick.clustering is not None and not (
                    self.options.data_aware and site.key in grams)
                clustered = pick.clustering if reuse else self._cluster(
                    site, pick.bits, pick.granularity, self._quads([site], grams), ctx)
                self._encode(graph, site, clustered, _plain_shift(site, clustered, grams),
                             taken, result, pending)
        if later:
            self._sequential(graph, [s for s in found if s.key in later], later, original,
                             ctx, taken, result, pending)

    def _sequential(self, graph, found, picks, reference, ctx, taken, result, pending
                    ) -> None:
        """Cluster wave by wave on the partly clustered model's inputs (sequence.py)."""
        order = sequence.waves(graph, found)
        for n, wave in enumerate(order):
            ctx.progress(f"cluster-weights: sequential wave {n + 1}/{len(order)} "
                         f"({len(wave)} layers)")
            working = gs.export_onnx(graph, do_type_check=False)
            shifted = sequence.collect(reference, working, wave, ctx.calib, ctx.seed)
            for site in wave:
                stats, centred = shifted[site.key], site.bias is not None
                target = stats.target(site.w2, centred)
                if site.pruned:
                    target = np.where(site.w2 == 0, 0.0, target)
                fitted = dataclasses.replace(site, w2=target)
                quad = refine.Quadratic(target, stats.moments, centred)
                pick = picks[site.key]
                clustered = sites.cluster(fitted, pick.bits, pick.granularity, quad,
                                          self.options.kmeans_init, ctx.seed, True)
                decoded = clustered.decoded()
                shift = stats.bias_shift(site.w2, decoded) if centred else None
                self._encode(graph, fitted, clustered, shift, taken, result, pending)

    # -- data ------------------------------------------------------------------------

    def _grams(self, original, found, ctx) -> dict[str, refine.Moments]:
        """Input second moments per site (only sites small enough to refine) in the
        unclustered model ``original`` (None without data)."""
        if original is None:
            return {}
        layers = {s.key: (s.node.inputs[0].name, s.geom) for s in found
                  if s.w2.shape[1] <= refine.MAX_PATCH}
        key = None
        if ctx.memo is not None:  # the same model, layers, samples and seed
            model = hashlib.sha256(original.SerializeToString()).hexdigest()
            key = (self.name, model, repr(sorted(layers.items())), id(ctx.calib), ctx.seed)
            if key in ctx.memo:
                return ctx.memo[key]
        grams = refine.collect_grams(original, layers, ctx.calib, ctx.seed, ctx.progress)
        if key is not None:
            ctx.memo[key] = grams
        return grams

    # -- choice ----------------------------------------------------------------------

    def _granularities(self) -> tuple[str, ...]:
        o = self.options.granularity
        return sites.GRANULARITIES if o == "auto" else (o,)

    def _cluster(self, site, bits, granularity, quads, ctx, refine_it=True) -> sites.Clustered:
        return sites.cluster(site, bits, granularity, quads[site.key], self.options.kmeans_init,
                             ctx.seed, self.options.data_aware and refine_it)

    @staticmethod
    def _quads(found, grams) -> dict[str, refine.Quadratic]:
        return {s.key: refine.Quadratic(s.w2, grams.get(s.key), s.bias is not None)
                for s in found}

    def _choose(self, original, found, grams, ctx) -> list[select.Candidate]:
        o = self.options
        widths = [o.bits or 4] if o.avg_bits is None and o.min_sqnr_db is None else \
            list(BUDGET_WIDTHS)
        options = [(b, g) for b in widths for g in self._granularities()]
        if len(options) == 1:  # nothing to choose
            return [select.Candidate(*options[0], 0, 0.0) for _ in found]
        quads = self._quads(found, grams)
        # candidates are scored after k-means and bias correction; only the chosen one is
        # refined (refining costs O * P^2 per candidate, scoring one GEMM)
        table = []
        for i, site in enumerate(found):
            ctx.progress(f"cluster-weights: layer {i + 1}/{len(found)} {site.key}")
            # keeping every candidate's indices would cost memory; three are cheap
            table.append([self._candidate(site, b, g, quads, ctx, len(options) <= 3)
                          for b, g in options])
        if o.avg_bits is not None:
            scale = None
            if original is not None:
                scale, table = self._sensitivities(original, found, table, quads, grams, ctx)
            picks = select.by_size(table, o.avg_bits / 8 * sum(s.size for s in found), scale)
        elif o.min_sqnr_db is not None:
            picks = select.by_error(table, o.min_sqnr_db)
        else:
            picks = [select.fixed(cands, s.size) for cands, s in zip(table, found,
                                                                     strict=True)]
        return picks

    def _sensitivities(self, original, found, table, quads, grams, ctx):
        """(per layer network output noise per unit of layer noise, the table with each
        layer's refinement gain added to its k-means scores), probed with the layer's
        refined best ``PROBE_BITS`` candidate (sensitivity.py)."""
        probes, own, adjusted = {}, {}, []
        for site, cands in zip(found, table, strict=True):
            pick = select.fixed([c for c in cands if c.bits == PROBE_BITS], site.size)
            c = self._cluster(site, pick.bits, pick.granularity, quads, ctx)
            probes[site.key] = _probe_values(site, c, _plain_shift(site, c, grams))
            own[site.key] = 10 ** (-c.sqnr_db / 10)
            # refinement gains about the same dB at every width (measured on SqueezeNet:
            # 4.4 / 5.4 dB at 3 / 4 bits for a 3x3 conv, 1.7 / 1.9 dB for a 1x1 one)
            gain = c.sqnr_db - c.sqnr_kmeans_db
            adjusted.append([dataclasses.replace(x, sqnr_db=x.sqnr_db + gain) for x in cands])
        ctx.progress(f"cluster-weights: network sensitivity of {len(found)} layers")
        net = sensitivity.network_noise(original, probes, ctx.calib)
        return [net[s.key] / max(own[s.key], 1e-30) for s in found], adjusted

    def _candidate(self, site, bits, granularity, quads, ctx, keep) -> select.Candidate:
        """A scored k-means candidate (not refined); ``keep``: with its clustering."""
        c = self._cluster(site, bits, granularity, quads, ctx, False)
        cost = self._file_cost(site, c)
        if cost is None:  # _encode keeps this one dense: no bytes saved, no error
            return select.Candidate(bits, granularity, _dense_bytes(site), refine.CAP_DB,
                                    dense=True)
        return select.Candidate(bits, granularity, cost, c.sqnr_db, c if keep else None)

    @staticmethod
    def _file_cost(site, clustered) -> int | None:
        """Bytes the encoding adds to the file, decode nodes included (they are ~1-2 kB,
        which decides for small tensors); None when that is not below the dense bytes.
        Encoded named "w": the cost once compact-names runs, as every preset does (the
        weight's long name repeated in every decode node would add ~2 kB)."""
        dense = _dense_bytes(site)
        if dense >= SMALL:
            return clustered.nbytes
        trial = sites.encode(gs.Graph(opset=ClusterWeights.min_opset), "w", site,
                             clustered, set())
        return trial.file_bytes if trial.file_bytes < dense else None

    # -- storage ---------------------------------------------------------------------

    def _encode(self, graph, site, clustered, shift, taken, result: PassResult,
                pending: list | None = None) -> None:
        """Store ``clustered`` in place of the weight; ``shift``: bias change or None.
        With ``pending`` (a list) the decoded weight is installed as a dense constant
        and (site, clustered, that constant) appended, for ``_distill`` to encode."""
        if self._file_cost(site, clustered) is None:
            result.declined["encoding would not make the file smaller"] += 1
            return
        if pending is None:
            encoded = sites.encode(graph, site.const.name, site, clustered, taken)
            storage.replace_with(graph, site.const, encoded)
            result.layers.append(_record(site, clustered, encoded))
        else:
            dense = gs.Constant(unique_name(taken, f"{site.const.name}_clustered"),
                                tune.stored_layout(site, clustered.decoded()))
            replace_uses(site.const, dense)
            pending.append((site, clustered, dense))
        if shift is not None and site.bias is not None:
            _correct_bias(site, shift, taken)
        result.changed = True

    def _distill(self, graph, reference, pending, ctx, taken, result: PassResult) -> None:
        """Tune the pending layers' codebooks, scales and biases together (tune.py), then
        encode them (as clustered when the distillation declines)."""
        ties = {dense.name: tune.codebook_tie(site, c, dense.name)
                for site, c, dense in pending}
        values = tuning.tune_nodes(reference, graph, [site.node for site, _, _ in pending],
                                   False, ctx, self.options.distill_steps, result, taken,
                                   ties)
        for site, clustered, dense in pending:
            if values is not None:
                clustered = tune.tuned(clustered, dense.name, values)
            encoded = sites.encode(graph, site.const.name, site, clustered, taken)
            storage.replace_with(graph, dense, encoded)
            result.layers.append({**_record(site, clustered, encoded),
                                  "distilled": values is not None})

    @staticmethod
    def _stats(result: PassResult, seconds: float) -> None:
        layers = result.layers
        before = sum(r["bytes_before"] for r in layers)
        after = sum(r["bytes_after"] for r in layers)
        gains = [r["sqnr_db"] - r["sqnr_kmeans_db"] for r in layers]
        weights = sum(r["weights"] for r in layers)
        result.stats.update(
            layers_clustered=len(layers), weight_bytes_before=before, weight_bytes_after=after,
            avg_bits=round(8 * after / max(weights, 1), 3),
            mean_refine_gain_db=round(float(np.mean(gains)) if gains else 0.0, 3),
            seconds=round(seconds, 3))


def _sparse_again(graph: gs.Graph, dense: dict[str, np.ndarray], taken) -> None:
    """The weights ``sites.densify_sparse`` made dense and nothing clustered: stored
    sparse again, as prune-weights left them."""
    for node in list(graph.nodes):
        const = node.inputs[1] if len(node.inputs) > 1 else None
        if isinstance(const, gs.Constant) and const.name in dense:
            encoded = storage.encode_sparse(graph, const.name, dense[const.name], taken)
            storage.replace_with(graph, const, encoded)


def _dense_bytes(site: sites.Site) -> int:
    return int(np.asarray(site.const.values).nbytes)


def _plain_shift(site: sites.Site, clustered: sites.Clustered, grams) -> np.ndarray | None:
    """b' - b = -(w' - w) . mu per output channel (refine.py), when there is data."""
    moments = grams.get(site.key)
    if moments is None or site.bias is None:
        return None
    return refine.bias_shift(site.w2, clustered.decoded(), moments.mean)


def _probe_values(site: sites.Site, clustered: sites.Clustered, shift) -> dict:
    """{initializer name: value} of the site's decoded weight (and shifted bias), each
    in its initializer's dtype (they are fed for it)."""
    out = {site.const.name: tune.stored_layout(site, clustered.decoded())}
    if shift is not None and isinstance(site.bias, gs.Constant):
        bias = np.asarray(site.bias.values)
        out[site.bias.name] = (bias + shift.reshape(bias.shape)).astype(bias.dtype)
    return out


def _correct_bias(site: sites.Site, shift: np.ndarray, taken) -> None:
    """b' = b + shift, as a new constant of the bias's dtype (a new one: the weight's)."""
    old = site.bias
    fresh = isinstance(old, str)
    value = np.zeros(shift.shape, site.dtype) if fresh else np.asarray(old.values)
    base = site.const.name if fresh else old.name
    new = gs.Constant(unique_name(taken, f"{base}_cluster_bias"),
                      (value + shift.reshape(value.shape)).astype(value.dtype))
    if len(site.node.inputs) < 3:
        site.node.inputs.append(new)
    else:
        site.node.inputs[2] = new


def _record(site: sites.Site, c: sites.Clustered, encoded: storage.Encoded) -> dict:
    return {"layer": site.key, "op": site.node.op, "bits": c.bits,
            "codebook": c.granularity, "weights": site.size,
            "bytes_before": encoded.dense_bytes, "bytes_after": encoded.stored_bytes,
            "file_bytes": encoded.file_bytes, "sqnr_db": round(c.sqnr_db, 2),
            "sqnr_kmeans_db": round(c.sqnr_kmeans_db, 2), "refined": c.refined,
            "zeros_kept": site.pruned}
