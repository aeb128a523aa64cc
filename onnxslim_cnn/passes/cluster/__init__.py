"""cluster-weights: weight sharing, k-means codebooks with data-aware centroids (lossy).

Every Conv/Gemm/MatMul weight is replaced by k = 2^b shared values (b = 1..8 per layer):
b-bit packed indices plus a codebook per tensor or per output channel, decoded by ops
onnxruntime folds at load (storage.encode_codebook), so the file shrinks ~32/b times
and inference speed is unchanged.

Before:  W[O, C, kh, kw] fp32 -> Conv
After:   packed idx (b bits) -> unpack -> Gather(codebook[k] or [O*k]) -> Conv

Steps per layer: exact 1-D k-means (kmeans.py; linear/density/k-means++ init, seeded;
a pruned layer keeps an exact 0 centroid so zeros stay zeros); with calibration data,
error-feedback assignment of the weights to those centroids (assign.py, GPTQ-style)
and least-squares centroids minimising the layer's output error on calibration patches
(refine.py: a k x k system per codebook), then a bias correction cancelling the mean
output error (b' = b - (w' - w) . mu). Bits per layer (select.py): fixed ``bits``, or the
cheapest bits meeting ``min_sqnr_db``, or a size budget ``avg_bits`` spread by marginal
output-SQNR gain per byte (candidates are scored after k-means + bias correction; the
chosen one is then refined). Output SQNR per layer, 10 log10(w^T G w / e^T S e) with G
the second moment of the layer's input patches (S: G, or their covariance when the bias
absorbs the mean), is reported for k-means (``sqnr_kmeans_db``) and the result
(``sqnr_db``); their mean difference is ``mean_refine_gain_db``.

Declines when: the weight is not a float32 constant, is shared by several nodes, the
Conv is not 2-D or uses auto_pad, a Gemm uses transA, or the encoding would not make
the file smaller (tiny tensors).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ... import storage
from ...errors import PreconditionError
from ..base import Pass, PassContext, PassResult, register, taken_names, unique_name
from . import kmeans, refine, select, sites

SMALL = 64 * 1024  # below this many dense bytes, encode in a scratch graph first


@dataclass(frozen=True)
class ClusterOptions:
    """Options of cluster-weights.

    Attributes:
        bits: index bits for every layer (1..8); None with no budget means 4.
        avg_bits: size budget: average bits per weight, codebooks included.
        min_sqnr_db: error budget: each layer's cheapest bits reaching this output SQNR.
        granularity: ``auto`` (chosen per layer), ``channel`` or ``tensor`` codebooks.
        kmeans_init: one of kmeans.INITS.
        data_aware: least-squares centroids on calibration data (else plain k-means).
    """

    bits: int | None = None
    avg_bits: float | None = None
    min_sqnr_db: float | None = None
    granularity: str = "auto"
    kmeans_init: str = "linear"
    data_aware: bool = True


@register
class ClusterWeights(Pass):
    name = "cluster-weights"
    summary = "k-means weight sharing, 1-8 bit codebooks with data-aware centroids (lossy)"
    lossless = False
    min_opset = 14  # uint8 Add of the 3/5/6/7-bit decode
    after = ("fold-bn", "remove-identity", "fold-constants")
    Options = ClusterOptions

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        if sum(x is not None for x in (o.bits, o.avg_bits, o.min_sqnr_db)) > 1:
            raise PreconditionError("give one of --bits, --avg-bits, --min-layer-sqnr")
        if o.bits is not None and not 1 <= o.bits <= 8:
            raise PreconditionError(f"--bits must be in 1..8, got {o.bits}")
        if o.avg_bits is not None and not o.avg_bits > 0:
            raise PreconditionError(f"--avg-bits must be positive, got {o.avg_bits}")
        if o.granularity not in ("auto", "channel", "tensor"):
            raise PreconditionError(f"unknown codebook granularity '{o.granularity}'")
        if o.kmeans_init not in kmeans.INITS:
            raise PreconditionError(f"unknown k-means init '{o.kmeans_init}' "
                                    f"(known: {', '.join(kmeans.INITS)})")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        found, declined = sites.find(graph)
        result = PassResult(changed=False)
        result.declined.update(declined)
        if not found:
            return result
        start = time.perf_counter()
        grams = self._grams(graph, found, ctx)
        chosen = self._choose(found, grams, ctx)
        taken = taken_names(graph)
        for site, clustered in zip(found, chosen, strict=True):
            self._encode(graph, site, clustered, grams, taken, result)
        self._stats(result, time.perf_counter() - start)
        return result

    # -- data ------------------------------------------------------------------------

    def _grams(self, graph, found, ctx) -> dict[str, refine.Moments]:
        """Input second moments per site (only sites small enough to refine)."""
        if not ctx.calib:
            return {}
        layers = {s.key: (s.node.inputs[0].name, s.geom) for s in found
                  if s.w2.shape[1] <= refine.MAX_PATCH}
        model = gs.export_onnx(graph, do_type_check=False)
        return refine.collect_grams(model, layers, ctx.calib, ctx.seed, ctx.progress)

    # -- choice ----------------------------------------------------------------------

    def _granularities(self) -> tuple[bool, ...]:
        return {"auto": (False, True), "channel": (True,), "tensor": (False,)}[
            self.options.granularity]

    def _cluster(self, site, bits, per_channel, quads, ctx, refine_it=True) -> sites.Clustered:
        return sites.cluster(site, bits, per_channel, quads[site.key], self.options.kmeans_init,
                             ctx.seed, self.options.data_aware and refine_it)

    def _choose(self, found, grams, ctx) -> list[sites.Clustered]:
        o = self.options
        widths = [o.bits or 4] if o.avg_bits is None and o.min_sqnr_db is None else \
            list(range(1, 9))
        options = [(b, pc) for b in widths for pc in self._granularities()]
        quads = {s.key: refine.Quadratic(s.w2, grams.get(s.key), s.bias is not None)
                 for s in found}
        # candidates are scored after k-means and bias correction; only the chosen one is
        # refined (refining costs O * P^2 per candidate, scoring one GEMM)
        refine_all = len(options) == 1
        table = []
        for i, site in enumerate(found):
            ctx.progress(f"cluster-weights: layer {i + 1}/{len(found)} {site.key}")
            table.append([self._candidate(site, b, pc, quads, ctx, refine_all)
                          for b, pc in options])
        if o.avg_bits is not None:
            picks = select.by_size(table, o.avg_bits / 8 * sum(s.size for s in found))
        elif o.min_sqnr_db is not None:
            picks = select.by_error(table, o.min_sqnr_db)
        else:
            picks = [select.fixed(cands, s.size) for cands, s in zip(table, found,
                                                                     strict=True)]
        # deterministic, so recomputing the picked one beats keeping every candidate
        return [self._cluster(s, c.bits, c.per_channel, quads, ctx)
                for s, c in zip(found, picks, strict=True)]

    def _candidate(self, site, bits, per_channel, quads, ctx, refine_it) -> select.Candidate:
        c = self._cluster(site, bits, per_channel, quads, ctx, refine_it)
        return select.Candidate(bits, per_channel, c.nbytes, c.sqnr_db)

    # -- storage ---------------------------------------------------------------------

    def _encode(self, graph, site, clustered, grams, taken, result: PassResult) -> None:
        idx, book = sites.stored_layout(site, clustered)
        axis = site.axis if clustered.per_channel else None
        dense = int(np.asarray(site.const.values).nbytes)
        if dense < SMALL:
            trial = storage.encode_codebook(gs.Graph(opset=graph.opset), site.key, idx, book,
                                            clustered.bits, taken=set(taken),
                                            per_channel_axis=axis)
            if trial.file_bytes >= dense:
                result.declined["encoding would not make the file smaller"] += 1
                return
        encoded = storage.encode_codebook(graph, site.const.name, idx, book, clustered.bits,
                                          taken=taken, per_channel_axis=axis)
        storage.replace_with(graph, site.const, encoded)
        moments = grams.get(site.key)
        if moments is not None and site.bias is not None:
            _correct_bias(site, clustered, moments, taken)
        result.changed = True
        result.layers.append(_record(site, clustered, encoded))

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


def _correct_bias(site: sites.Site, clustered: sites.Clustered, moments, taken) -> None:
    """b' = b - (w' - w) . mu per output channel, as a new constant (refine.py)."""
    decoded = sites.decode(clustered.idx, clustered.codebook, clustered.per_channel)
    shift = refine.bias_shift(site.w2, decoded, moments.mean)
    old = site.bias
    fresh = isinstance(old, str)
    value = np.zeros(shift.shape, np.float32) if fresh else np.asarray(old.values)
    base = site.const.name if fresh else old.name
    new = gs.Constant(unique_name(taken, f"{base}_cluster_bias"),
                      (value + shift.reshape(value.shape)).astype(np.float32))
    if len(site.node.inputs) < 3:
        site.node.inputs.append(new)
    else:
        site.node.inputs[2] = new


def _record(site: sites.Site, c: sites.Clustered, encoded: storage.Encoded) -> dict:
    return {"layer": site.key, "op": site.node.op, "bits": c.bits,
            "codebook": "channel" if c.per_channel else "tensor", "weights": site.size,
            "bytes_before": encoded.dense_bytes, "bytes_after": encoded.stored_bytes,
            "file_bytes": encoded.file_bytes, "sqnr_db": round(c.sqnr_db, 2),
            "sqnr_kmeans_db": round(c.sqnr_kmeans_db, 2), "refined": c.refined,
            "zeros_kept": site.pruned}
