"""Fold inference BatchNormalization into the Conv, Gemm or MatMul that feeds it.

Why: a BN after a linear layer is an affine map per output channel; merging it into
the layer's weights removes a node and its four parameter vectors at no accuracy cost.

Before:                       After:
    X -> Conv(W, b) -> t          X -> Conv(W', b') -> Y
    t -> BN(g, beta, m, v) -> Y

Math, with s = g / sqrt(v + eps) per output channel c:
    W'[c] = W[c] * s[c]            (Conv: axis 0; Gemm/MatMul: the output-feature axis)
    b'[c] = (b[c] - m[c]) * s[c] + beta[c]
Gemm (Y = alpha A B + beta_g C): B' = alpha B s, C' = s (beta_g C - m) + beta, beta_g' = 1.

Declines when: the layer output has other consumers or is a graph output; the weight is
shared with another node or is a graph output (folding would duplicate it); a parameter
is not constant; BN is in training mode, uses spatial=0, or has its extra outputs used
(consumed or graph outputs); the MatMul output is not known to be 2-D; a Gemm bias C
differs per row.
The arithmetic is done in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .base import (
    Pass,
    PassContext,
    PassResult,
    const_value,
    detach,
    register,
    take_over_name,
    taken_names,
)

LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@register
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "fold BatchNormalization into the preceding Conv/Gemm/MatMul (lossless)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        taken = taken_names(graph)
        outputs = {t.name for t in graph.outputs}
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            reason = self._fold(bn, taken, outputs)
            if reason:
                result.declined[reason] += 1
            else:
                result.stats["bn_folded"] = result.stats.get("bn_folded", 0) + 1
                result.changed = True
        return result

    def _fold(self, bn: gs.Node, taken: set[str], outputs: set[str]) -> str | None:
        reason = _bn_reason(bn, outputs)
        if reason:
            return reason
        layer = bn.inputs[0].inputs[0] if bn.inputs[0].inputs else None
        if layer is None or layer.op not in LINEAR_OPS:
            return "BN input is not produced by Conv/Gemm/MatMul"
        if len(bn.inputs[0].outputs) != 1:
            return "layer output has other consumers"
        if bn.inputs[0].name in outputs:
            return "layer output is a graph output"
        weight = layer.inputs[1]
        if const_value(weight) is None:
            return "layer weight is not constant"
        if len(weight.outputs) != 1 or weight.name in outputs:
            return "weight is shared with another node (folding would duplicate it)"
        scale, shift = _bn_affine(bn)
        folded = _FOLDERS[layer.op](layer, scale, shift)
        if isinstance(folded, str):
            return folded
        _install(layer, bn, folded, taken)
        return None


def _bn_reason(bn: gs.Node, outputs: set[str]) -> str | None:
    if bn.attrs.get("training_mode", 0):
        return "BatchNormalization in training mode"
    if bn.attrs.get("spatial", 1) != 1:
        return "BatchNormalization with spatial=0"
    if any(out.outputs or out.name in outputs for out in bn.outputs[1:]):
        return "BatchNormalization statistics outputs are used"
    if any(const_value(t) is None for t in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constant"
    return None


def _bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = s * x + t per channel, in float64."""
    gamma, beta, mean, var = (const_value(t).astype(np.float64) for t in bn.inputs[1:5])
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def _fold_conv(conv: gs.Node, scale: np.ndarray, shift: np.ndarray):
    w = const_value(conv.inputs[1])
    if w.shape[0] != scale.shape[0]:
        return "BN channels do not match the Conv output channels"
    bias = _bias(conv, 2, w.shape[0])
    if isinstance(bias, str):
        return bias
    new_w = w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))
    return new_w.astype(w.dtype), (bias * scale + shift).astype(w.dtype), {}


def _fold_gemm(gemm: gs.Node, scale: np.ndarray, shift: np.ndarray):
    w = const_value(gemm.inputs[1])
    alpha = float(gemm.attrs.get("alpha", 1.0))
    beta = float(gemm.attrs.get("beta", 1.0))
    out_axis = 0 if gemm.attrs.get("transB", 0) else 1
    if w.ndim != 2 or w.shape[out_axis] != scale.shape[0]:
        return "BN channels do not match the Gemm output features"
    bias = _bias(gemm, 2, w.shape[out_axis])
    if isinstance(bias, str):
        return bias
    shape = (-1, 1) if out_axis == 0 else (1, -1)
    new_w = w.astype(np.float64) * alpha * scale.reshape(shape)
    new_b = scale * beta * bias + shift
    return new_w.astype(w.dtype), new_b.astype(w.dtype), {"alpha": 1.0, "beta": 1.0}


def _fold_matmul(matmul: gs.Node, scale: np.ndarray, shift: np.ndarray):
    w = const_value(matmul.inputs[1])
    out = matmul.outputs[0]
    if w.ndim != 2 or w.shape[1] != scale.shape[0]:
        return "BN channels do not match the MatMul output features"
    if out.shape is None or len(out.shape) != 2:
        return "MatMul output is not known to be 2-D"
    new_w = w.astype(np.float64) * scale.reshape(1, -1)
    return new_w.astype(w.dtype), shift.astype(w.dtype), {"to_gemm": True}


def _bias(layer: gs.Node, index: int, channels: int) -> np.ndarray | str:
    """The layer's bias as float64 [channels] (zeros when absent)."""
    if len(layer.inputs) <= index or layer.inputs[index].name == "":
        return np.zeros(channels)
    value = const_value(layer.inputs[index])
    if value is None:
        return "layer bias is not constant"
    if value.size not in (1, channels) or (value.ndim == 2 and value.shape[0] != 1):
        return "layer bias does not broadcast per output channel"
    return np.broadcast_to(value.astype(np.float64).reshape(-1), (channels,)).copy()


_FOLDERS = {"Conv": _fold_conv, "Gemm": _fold_gemm, "MatMul": _fold_matmul}


def _install(layer: gs.Node, bn: gs.Node, folded, taken: set[str]) -> None:
    new_w, new_b, attrs = folded
    w_name = take_over_name(layer.inputs[1], f"{layer.inputs[1].name}_bnfold", taken)
    old_bias = layer.inputs[2] if len(layer.inputs) > 2 and layer.inputs[2].name else None
    b_name = take_over_name(old_bias, f"{layer.name or layer.outputs[0].name}_bias", taken)
    weight, bias = gs.Constant(w_name, new_w), gs.Constant(b_name, new_b)
    if attrs.pop("to_gemm", False):
        layer.op = "Gemm"
    layer.attrs.update(attrs)
    layer.inputs = [layer.inputs[0], weight, bias]
    y = bn.outputs[0]
    detach(bn)
    layer.outputs = [y]
