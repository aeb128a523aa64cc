"""qdq-int8: static int8 quantization in QDQ form that onnxruntime fuses into int8 kernels.

Before:  x -> Conv(W, b) -> Relu -> y
After:   x -> Q -> DQ -> Conv(DQ(W_int8), DQ(b_int32)) -> Relu -> Q -> DQ -> y
onnxruntime (graph optimisations on) turns this into QLinearConv; see placement.py for
the patterns, calibrate.py for the ranges, insert.py for the math, saturation.py for the
AVX2 int16 pair-sum trap and how per-channel weight ranges avoid it.

Declines when: a Conv/Gemm weight is not constant, an activation is not float32, a Gemm
uses transA or alpha != 1, an Add/Mul/Concat has a constant operand, a layer is listed
in ``fp32_layers``. Declined sites stay float; the rest is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import PreconditionError
from ..base import Pass, PassContext, PassResult, const_value, register, taken_names
from . import bias_correct, calibrate, insert
from .placement import Plan, plan_graph

METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class QdqOptions:
    """Options of qdq-int8.

    Attributes:
        calib_method: activation range method, one of METHODS.
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
    """

    calib_method: str = "mse"
    percentile: float = 99.99
    activation_type: str = "uint8"
    reduce_range: str = "auto"
    bias_correction: str = "empirical"
    share_concat_scales: bool = True
    fp32_layers: tuple[str, ...] = ()


@register
class QdqInt8(Pass):
    name = "qdq-int8"
    summary = "static int8 quantization (QDQ) with calibration, fused by onnxruntime (lossy)"
    lossless = False
    min_opset = 13
    after = ("fold-bn", "remove-identity", "fold-constants")
    Options = QdqOptions

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        if self.options.calib_method not in METHODS:
            raise PreconditionError(f"unknown calibration method '{self.options.calib_method}'"
                                    f" (known: {', '.join(METHODS)})")
        if not ctx.calib:
            raise PreconditionError("qdq-int8 needs calibration data")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan = plan_graph(graph, set(self.options.fp32_layers))
        result = PassResult(changed=bool(plan.reads or plan.weights), declined=plan.declined)
        if not result.changed:
            return result
        stats = self._calibrate(graph, plan, ctx)
        params = self._params(plan, stats)
        if self.options.bias_correction == "empirical":
            outputs = [s.node.outputs[0].name for s in plan.biases]
            reference = bias_correct.reference_means(graph, outputs, ctx.calib)
        mat = self._materialize(graph, plan, stats, params, result)
        if self.options.bias_correction == "empirical":
            shift = bias_correct.correct(graph, mat.biases, reference, ctx.calib, ctx.progress)
            result.stats["bias_shift_left"] = round(shift, 6)
        result.stats.update(quantized_layers=len(plan.layers), activations=len(plan.reads),
                            weights=len(plan.weights))
        return result

    def _calibrate(self, graph: gs.Graph, plan: Plan, ctx: PassContext):
        model = gs.export_onnx(graph, do_type_check=False)
        reads = sorted(plan.reads)
        hist = reads if self.options.calib_method != "minmax" else []
        return calibrate.collect(model, reads, ctx.calib, hist, ctx.progress)

    def _params(self, plan: Plan, stats) -> dict[str, insert.QParams]:
        opts = self.options
        ranges = {n: calibrate.choose_range(stats[n], opts.calib_method, opts.percentile)
                  for n in plan.reads}
        for group in plan.groups if opts.share_concat_scales else []:
            members = [n for n in group if n in ranges]
            if members:
                union = (min(ranges[n][0] for n in members), max(ranges[n][1] for n in members))
                ranges.update({n: union for n in members})
        for out, src in plan.tie.items():
            ranges[out] = ranges[src]
        make = calibrate.uint8_params if opts.activation_type == "uint8" else \
            calibrate.int8_params
        return {n: insert.QParams(*make(*r)) for n, r in ranges.items()}

    def _materialize(self, graph, plan: Plan, stats, params,
                     result: PassResult) -> insert.Materializer:
        mat = insert.Materializer(graph, taken_names(graph))
        dense = {id(s.node): const_value(s.node.inputs[s.index]) for s in plan.weights}
        act_of = {id(s.node): s.node.inputs[0].name for s in plan.weights}
        tensors = {name: reads[0][0].inputs[reads[0][1]] for name, reads in plan.reads.items()}
        quants = {}
        for site in plan.weights:
            act = act_of[id(site.node)]
            wq = self._quantize_weight(site, dense[id(site.node)], params.get(act),
                                       stats.get(act))
            mat.weight(site, wq)
            quants[id(site.node)] = wq
            result.layers.append(_layer_record(site, wq))
        for site in plan.biases:
            wq, bias = quants[id(site.node)], insert.bias_value(site)
            if self.options.bias_correction == "analytic":
                bias = insert.corrected_bias(site, bias, wq, dense[id(site.node)],
                                             stats.get(site.activation))
            mat.bias(site, bias, params[site.activation], wq)
        for name, reads in plan.reads.items():
            mat.activation(tensors[name], params[name], reads)
        return mat

    def _quantize_weight(self, site, w, act, stats) -> insert.WeightQuant:
        base = 63 if self.options.reduce_range == "on" else 127
        avoid = self.options.reduce_range == "auto" and self.options.activation_type == "uint8"
        qmax = insert.weight_qmax(site, w, act, stats, base, avoid)
        return insert.quantize_weight(w, site.axis, qmax)


def _layer_record(site, wq: insert.WeightQuant) -> dict:
    reduced = int(np.sum(wq.qmax < 127))
    return {"layer": site.node.name, "op": site.node.op, "weight_bits": 8,
            "channels": int(wq.qmax.size), "channels_reduced_range": reduced,
            "min_qmax": int(wq.qmax.min())}
