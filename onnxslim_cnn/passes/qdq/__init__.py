"""qdq-int8: static int8 quantization in QDQ form that onnxruntime fuses into int8 kernels.

Before:  x -> Conv(W, b) -> Relu -> y
After:   x -> Q -> DQ -> Conv(DQ(W_int8), DQ(b_int32)) -> Relu -> Q -> DQ -> y
onnxruntime (graph optimisations on) turns this into QLinearConv; see placement.py for
the patterns, calibrate.py for the ranges, insert.py for the math, saturation.py for the
AVX2 int16 pair-sum trap and how per-channel weight ranges avoid it.

A BatchNormalization after a Conv/Gemm is folded into it first (as fold-bn does).

Declines when: a Conv/Gemm weight is not constant, an activation is not float32, a Gemm
uses transA or alpha != 1, an Add/Mul/Concat has a constant operand, a layer is listed
in ``fp32_layers``. Declined sites stay float; the rest is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ... import storage
from ...errors import PreconditionError, UsageError
from .. import float16
from ..base import Pass, PassContext, PassResult, const_value, register, taken_names
from ..fold_bn import FoldBatchNorm
from . import bias_correct, calibrate, gptq, insert, latency, levels, saturation, sensitivity
from .placement import Plan, plan_graph

METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class QdqOptions:
    """Options of qdq-int8.

    Attributes:
        calib_method: activation range method, one of METHODS. ``percentile`` by
            default: top-1 agreement with fp32 on images not calibrated on (preset
            int8, 100 calibration images per draw) SqueezeNet 96.8/96.8/96.8 % against
            ``mse``'s 96.0/95.5/95.5 % (400 images, 3 draws), ResNet-8 level (2000
            images, 4 draws, within 0.3), EfficientNet-Lite0 98.2/98.0 % against
            98.0/98.5 % (400 images, 2 draws); output cosine higher in 7 of those 9.
        percentile: the percentile of the ``percentile`` method.
        activation_type: ``uint8`` (asymmetric; the fast x86 path) or ``int8``.
        reduce_range: ``auto`` lowers weight ranges only in output channels whose
            int16 pair sums could saturate on AVX2; ``on`` uses 7-bit weights
            everywhere; ``off`` full 8-bit everywhere.
        bias_correction: ``empirical`` matches every layer's output mean to the float
            model's on the calibration data (weight rounding, clipping and upstream
            error together); ``analytic`` removes only the shift of weight rounding;
            ``off``.
        share_concat_scales: one range for all inputs and the output of a Concat (the
            concat becomes a plain int8 copy); off lets each input keep its own range.
        fp32_layers: node names kept in float.
        fallback_sqnr_db: compute layers whose output SQNR (quantized vs float, on the
            calibration data) falls below this stay in float (0 disables) ...
        fallback_max_fraction: ... at most this fraction of them, worst first.
        weight_rounding: ``gptq`` rounds plain Conv/Gemm weights to minimise the layer's
            output error on the calibration inputs (gptq.py); ``nearest`` rounds each
            weight to its nearest grid point.
        int8_tails: an averaging pool after the last conv (SqueezeNet's conv10 -> Relu
            -> GlobalAveragePool -> Softmax) gets a Q/DQ on its input so the conv runs
            as an int8 kernel; the pool stays float and averages the rounding noise.
            Likewise a conv whose output only float ops read (Inception v1's LRN:
            light Inception v1 int8 latency 0.96x -> 0.84x of fp32). Off: such a
            conv's output stays float, so the conv runs in float.
        activation_levels: ``auto`` lets an activation tensor use fewer than 256 uint8
            levels where that lets its consumers keep wider weight ranges under the
            AVX2 bound and lowers the expected output error (levels.py); ``full``
            always uses 256 levels.
        latency_guard: time the int8 model against the float one (latency.py); when
            the int8 kernels are slower, keep float compute with int8 weight storage.
        weights_only: ``int8`` or ``int4``: only the Conv/Gemm/MatMul weights are
            stored as per-channel integers (no calibration data needed); activations
            stay float. Decoded with Cast+Mul, which onnxruntime folds at load, so the
            file shrinks and speed is unchanged (a lone DequantizeLinear is never folded
            by onnxruntime and would cost ~30 % latency).
    """

    calib_method: str = "percentile"
    percentile: float = 99.999
    activation_type: str = "uint8"
    reduce_range: str = "auto"
    bias_correction: str = "empirical"
    share_concat_scales: bool = True
    fp32_layers: tuple[str, ...] = ()
    fallback_sqnr_db: float = 15.0
    fallback_max_fraction: float = 0.1
    weights_only: str | None = None
    weight_rounding: str = "gptq"
    int8_tails: bool = True
    latency_guard: bool = True
    activation_levels: str = "auto"


@register
class QdqInt8(Pass):
    name = "qdq-int8"
    summary = "static int8 quantization (QDQ) with calibration, fused by onnxruntime (lossy)"
    lossless = False
    min_opset = 13
    after = ("fold-bn", "remove-identity", "fold-constants")
    Options = QdqOptions

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.weights_only == "int4":
            self.min_opset = 21  # INT4 tensors

    def check_options(self) -> None:
        if self.options.weights_only not in (None, "int8", "int4"):
            raise UsageError(f"--weights-only takes int8 or int4, not "
                             f"'{self.options.weights_only}'")
        if not self.options.weights_only and self.options.calib_method not in METHODS:
            raise UsageError(f"unknown calibration method '{self.options.calib_method}'"
                             f" (known: {', '.join(METHODS)})")

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        if not self.options.weights_only and not ctx.calib:
            raise PreconditionError("qdq-int8 needs calibration data")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.options.weights_only:
            return self._weights_only(graph)
        # int8 kernels exist around float32 tensors only: a float16 model computes in
        # float32 inside and keeps its float16 inputs and outputs.
        upcast = float16.upcast(graph)
        # A BatchNormalization left between a Conv and its Relu keeps the pair out of
        # the fused int8 kernel (ResNet-8 with --passes qdq-int8 alone ran 2.45x slower
        # than float and fell back to int8 storage): fold it first, losslessly.
        folded = FoldBatchNorm().run(graph, ctx)
        if folded.changed:
            graph.nodes = [n for n in graph.nodes if n.inputs or n.outputs]
        float_model = gs.export_onnx(graph, do_type_check=False)
        result = self._static(graph, float_model, ctx)
        if self.options.latency_guard and result.changed:
            result = self._guard(graph, float_model, result, ctx)
        result.stats.update(folded.stats)
        return self._finish(result, upcast)

    def _guard(self, graph: gs.Graph, float_model, result: PassResult,
               ctx: PassContext) -> PassResult:
        """Float compute with int8 weight storage when the int8 kernels are slower here."""
        quant = gs.export_onnx(graph, do_type_check=False)
        slower = latency.ratio(float_model, quant, latency.first_sample(float_model, ctx.calib))
        result.stats["int8_latency_ratio"] = round(slower, 3)
        if slower <= latency.SLOWER:
            return result
        fallback = gs.import_onnx(float_model)
        stored = self._weights_only(fallback, bits=8)
        stored.stats["int8_latency_ratio"] = round(slower, 3)
        stored.stats["int8_declined"] = (f"int8 kernels {slower:.2f}x the float time here: "
                                         "weights stored as int8, compute in float")
        return self._adopt(graph, fallback, stored)

    def _static(self, graph: gs.Graph, float_model, ctx: PassContext) -> PassResult:
        skip = set(self.options.fp32_layers)
        # Statistics of the float model serve every quantization attempt below.
        facts = self._measure(graph, float_model, self._plan(graph, skip), ctx)
        if self.options.fallback_sqnr_db > 0:
            trial = gs.import_onnx(float_model)
            trial_result = self._quantize(trial, ctx, skip, facts)
            sqnr = self._sqnr(float_model, trial, trial_result, ctx)
            limit = int(self.options.fallback_max_fraction * len(sqnr))
            fallback = sensitivity.choose_fallback(sqnr, self.options.fallback_sqnr_db, limit)
            if not fallback:
                return self._adopt(graph, trial, trial_result)
            skip |= set(fallback)
        result = self._quantize(graph, ctx, skip, facts)
        if self.options.fallback_sqnr_db > 0:
            self._sqnr(float_model, graph, result, ctx)
        return result

    def _finish(self, result: PassResult, upcast: int) -> PassResult:
        if upcast:
            result.stats["float16_tensors_upcast"] = upcast
        # The file is portable either way (reduce_range auto keeps every pair below the
        # int16 bound); this says whether validation here ran saturating kernels.
        result.stats["host_int8_pairs_saturate"] = saturation.host_kernel_saturates()
        return result

    def _plan(self, graph: gs.Graph, skip: set[str]) -> Plan:
        return plan_graph(graph, skip, int8_tails=self.options.int8_tails)

    def _measure(self, graph: gs.Graph, float_model, plan: Plan, ctx: PassContext) -> dict:
        """Activation statistics, float output means and Hessians, from the float graph."""
        facts = {"stats": self._calibrate(float_model, plan, ctx), "reference": {}, "hess": {}}
        if self.options.bias_correction == "empirical":
            outputs = [s.node.outputs[0].name for s in plan.biases]
            facts["reference"] = bias_correct.reference_means(graph, outputs, ctx.calib)
        if self.options.weight_rounding == "gptq":
            sites = [s for s in plan.weights if s.codebook is None and gptq.supported(s)]
            if sites:
                facts["hess"] = gptq.hessians(float_model, sites, ctx.calib, ctx.seed)
        return facts

    def _quantize(self, graph: gs.Graph, ctx: PassContext, skip: set[str],
                  facts: dict) -> PassResult:
        plan = self._plan(graph, skip)
        result = PassResult(changed=bool(plan.reads or plan.weights), declined=plan.declined)
        if not result.changed:
            return result
        stats, hess = facts["stats"], facts["hess"]
        coded = [s for s in plan.weights if s.codebook is not None]
        dense = {id(s.node): const_value(s.node.inputs[s.index]) for s in plan.weights
                 if s.codebook is None}
        dense.update(zip((id(s.node) for s in coded), storage.decoded_values(
            [s.node.inputs[s.index] for s in coded], graph.opset), strict=True))
        params = self._params(plan, stats, hess, dense)
        mat = self._materialize(graph, plan, stats, params, result, hess, dense)
        if self.options.bias_correction == "empirical":
            shift = bias_correct.correct(graph, mat.biases, facts["reference"], ctx.calib,
                                         ctx.progress)
            result.stats["bias_shift_left"] = round(shift, 6)
        result.stats.update(quantized_layers=len(plan.layers), activations=len(plan.reads),
                            weights=len(plan.weights), kept_float=len(plan.kept))
        taken = taken_names(graph)
        for node in plan.kept:
            name = node.name or node.outputs[0].name
            asked = {node.name, node.outputs[0].name} & set(self.options.fp32_layers)
            record = {"layer": name, "op": node.op, "kept_float": True,
                      "why": "listed in fp32_layers" if asked else
                      f"output SQNR < {self.options.fallback_sqnr_db} dB"}
            if not asked:  # computes in float, but its weight is still stored as int8
                record["weight_storage"] = self._store_int8(graph, node, taken)
            result.layers.append(record)
        return result

    @staticmethod
    def _store_int8(graph: gs.Graph, node: gs.Node, taken: set[str]) -> str:
        """Per-channel int8 weight decoded by Cast+Mul (folded at load): float compute,
        int8 file bytes."""
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if node.op not in ("Conv", "Gemm", "MatMul") or not isinstance(weight, gs.Constant) \
                or len(weight.outputs) != 1 or weight.values.ndim < 2:
            return "float"
        axis = 1 if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get(
            "transB", 0)) else 0
        encoded = storage.encode_int(graph, weight, 8, axis, taken, decode="float")
        storage.replace_with(graph, weight, encoded)
        return "int8 (Cast+Mul, folded at load)"

    def _sqnr(self, float_model, graph, result: PassResult, ctx) -> dict[str, float]:
        """Per-layer output SQNR, also written into the layer records of ``result``."""
        records = {r["output"]: r for r in result.layers if "output" in r}
        quant = gs.export_onnx(graph, do_type_check=False)
        sqnr = sensitivity.layer_sqnr(float_model, quant, sorted(records),
                                      bias_correct.subset(ctx.calib))
        for name, value in sqnr.items():
            records[name]["sqnr_db"] = round(value, 2)
        return sqnr

    def _weights_only(self, graph: gs.Graph, bits: int | None = None) -> PassResult:
        bits = bits or (4 if self.options.weights_only == "int4" else 8)
        plan = plan_graph(graph, set(self.options.fp32_layers), weights_only=True)
        result = PassResult(changed=False, declined=plan.declined)
        taken = taken_names(graph)
        for site in plan.weights:
            const = site.node.inputs[site.index]
            if not isinstance(const, gs.Constant) or len(const.outputs) != 1:
                result.declined["weight is shared or already encoded"] += 1
                continue
            encoded = storage.encode_int(graph, const, bits, site.axis, taken, decode="float")
            storage.replace_with(graph, const, encoded)
            result.changed = True
            result.layers.append({
                "layer": site.node.name or site.node.outputs[0].name, "op": site.node.op,
                "weight_bits": bits, "bytes_before": encoded.dense_bytes,
                "bytes_after": encoded.stored_bytes})
        result.stats["weights"] = len(result.layers)
        return result

    @staticmethod
    def _adopt(graph: gs.Graph, trial: gs.Graph, result: PassResult) -> PassResult:
        """Make ``graph`` the trial graph (the pass contract mutates the given graph)."""
        graph.nodes, graph.inputs, graph.outputs = trial.nodes, trial.inputs, trial.outputs
        graph.opset = trial.opset
        return result

    def _calibrate(self, model, plan: Plan, ctx: PassContext):
        reads = sorted(plan.reads)
        hist = reads if self.options.calib_method != "minmax" else []
        return calibrate.collect(model, reads, ctx.calib, hist, ctx.progress)

    def _params(self, plan: Plan, stats, hess: dict, dense: dict
                ) -> dict[str, insert.QParams]:
        opts = self.options
        # A tail tensor is averaged by the pool that reads it: rounding noise averages
        # away, clipping bias does not, so it keeps its whole range.
        symmetric = opts.activation_type != "uint8"
        ranges = {n: calibrate.choose_range(stats[n], "minmax" if n in plan.tails else
                                            opts.calib_method, opts.percentile, symmetric)
                  for n in plan.reads}
        for group in plan.groups if opts.share_concat_scales else []:
            members = [n for n in group if n in ranges]
            if members:
                union = (min(ranges[n][0] for n in members), max(ranges[n][1] for n in members))
                ranges.update({n: union for n in members})
        for out, src in plan.tie.items():
            ranges[out] = ranges[src]
        if opts.activation_type != "uint8":
            return {n: insert.QParams(*calibrate.int8_params(*r)) for n, r in ranges.items()}
        counts = {n: 255 for n in ranges}
        if opts.reduce_range == "auto" and opts.activation_levels == "auto" and hess:
            counts = levels.choose(plan, ranges, stats, hess, dense)
        return {n: insert.QParams(*levels.uint8_params(*r, counts[n]), counts[n])
                for n, r in ranges.items()}

    def _materialize(self, graph, plan: Plan, stats, params, result: PassResult,
                     hess: dict, dense: dict) -> insert.Materializer:
        """Q/DQ, int8 weights and int32 biases of ``plan``; ``dense``: each weight's
        float value (a codebook's decoded)."""
        mat = insert.Materializer(graph, taken_names(graph))
        act_of = {id(s.node): s.node.inputs[0].name for s in plan.weights}
        quants = {}
        for site in plan.weights:
            act = act_of[id(site.node)]
            wq = self._quantize_weight(site, dense[id(site.node)], params.get(act),
                                       stats.get(act), hess.get(site.node.outputs[0].name))
            mat.weight(site, wq)
            quants[id(site.node)] = wq
            result.layers.append(_layer_record(site, wq, params.get(act)))
        for site in plan.biases:
            wq, bias = quants[id(site.node)], insert.bias_value(site)
            if self.options.bias_correction == "analytic":
                bias = insert.corrected_bias(site, bias, wq, dense[id(site.node)],
                                             stats.get(site.activation))
            mat.bias(site, bias, params[site.activation], wq)
        for name, reads in plan.reads.items():
            mat.activation(plan.tensor(name), params[name], reads)
        return mat

    def _quantize_weight(self, site, w, act, stats, hess) -> insert.WeightQuant:
        base = 63 if self.options.reduce_range == "on" else 127
        avoid = self.options.reduce_range == "auto" and self.options.activation_type == "uint8"
        qmax = insert.weight_qmax(site, w, act, stats, base, avoid)
        if site.codebook is not None:
            return insert.quantize_codebook(site, w, qmax, act, stats, avoid)
        nearest = insert.quantize_weight(w, site.axis, qmax)
        if hess is None:
            return nearest
        rows = np.moveaxis(w, site.axis, 0).reshape(w.shape[site.axis], -1)
        q = gptq.gptq_round(rows, hess, nearest.scale.astype(np.float64), qmax)
        wq = insert.weight_quant_from(w, site.axis, q, nearest.scale, qmax)
        if avoid:  # GPTQ moves weights: keep nearest rounding where pairs could saturate
            bad = insert.saturating_rows(site, wq, act, stats)
            if bad.any():
                q[bad] = np.moveaxis(nearest.q, site.axis, 0).reshape(q.shape)[bad]
                wq = insert.weight_quant_from(w, site.axis, q, nearest.scale, qmax)
        return wq


def _layer_record(site, wq: insert.WeightQuant, act: insert.QParams | None) -> dict:
    reduced = int(np.sum(wq.qmax < 127))
    output = site.node.outputs[0].name
    record = {"layer": site.node.name or output, "op": site.node.op, "output": output,
              "weight_bits": 8,
              "channels": int(wq.qmax.size), "channels_reduced_range": reduced,
              "min_qmax": int(wq.qmax.min()),
              "input_levels": None if act is None else act.levels}
    if site.codebook is not None:  # cluster-weights' packed indices kept, codebook int8
        record["weight_codebook"] = "int8 per channel" if site.codebook.channels else \
            "int8 per tensor" if site.codebook.scale is None else "int8 scaled per channel"
    return record
