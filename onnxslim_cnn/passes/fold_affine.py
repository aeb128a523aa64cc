"""Fold per-channel constant Add/Mul after a Conv into it; MatMul + Add into Gemm.

Why: CNTK, TF and Keras exports often write a bias-less Conv followed by an Add of a
[C,1,1] constant (and scales as a Mul). Folding them removes nodes and, more
importantly, lets int8 runtimes fuse the Conv (QLinearConv needs the bias inside).

Before:  X -> Conv(W, b) -> Add(c) -> Mul(m) -> Y       X -> MatMul(W) -> Add(c) -> Y
After:   X -> Conv(W * m, (b + c) * m) -> Y            X -> Gemm(W, c) -> Y
Math: Conv(x) + c = Conv_{W, b + c}(x);  m * Conv(x) = Conv_{m W, m b}(x)  per channel.

Declines when: the constant does not broadcast per output channel (or is a scalar);
the Conv output has other consumers or is a graph output; the Conv weight is shared;
the MatMul input is not known to be 2-D or its weight is not a constant matrix.
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


@register
class FoldAffine(Pass):
    name = "fold-affine"
    summary = "fold constant per-channel Add/Mul into the preceding Conv; MatMul+Add -> Gemm"
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        taken, outputs = taken_names(graph), {t.name for t in graph.outputs}
        progress = True
        while progress:  # Conv -> Add -> Mul folds one node per sweep
            progress = False
            result.declined.clear()  # a site declined now may fold in the next sweep
            for node in [n for n in graph.nodes if n.op in ("Add", "Mul")]:
                reason = _fold(node, taken, outputs)
                if reason is None:
                    key = f"{node.op.lower()}_folded"
                    result.stats[key] = result.stats.get(key, 0) + 1
                    result.changed = progress = True
                elif reason:
                    result.declined[reason] += 1
        return result


def _fold(node: gs.Node, taken: set[str], outputs: set[str]) -> str | None:
    """None when folded, "" when the node is no candidate, else the decline reason."""
    if len(node.inputs) != 2:  # already folded and detached in an earlier sweep
        return ""
    pair = _layer_and_constant(node)
    if pair is None:
        return ""
    layer, value = pair
    if len(layer.outputs[0].outputs) != 1 or layer.outputs[0].name in outputs:
        return "layer output has other consumers"
    if len(layer.inputs[1].outputs) != 1:
        return "weight is shared with another node"
    if layer.op == "Conv":
        return _into_conv(layer, node, value, taken)
    return _into_gemm(layer, node, value, taken)


def _layer_and_constant(node: gs.Node) -> tuple[gs.Node, np.ndarray] | None:
    for var, const in ((0, 1), (1, 0)):
        value = const_value(node.inputs[const])
        tensor = node.inputs[var]
        producer = tensor.inputs[0] if tensor.inputs else None
        if value is None or producer is None:
            continue
        wanted = producer.op == "Conv" or (producer.op == "MatMul" and node.op == "Add")
        if wanted and const_value(producer.inputs[1]) is not None:
            return producer, value
    return None


def _channel_vector(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as [channels] if it broadcasts per channel of a rank-``rank`` output."""
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    shape = (1,) * (rank - value.ndim) + value.shape
    if len(shape) != rank or shape[1] != channels or any(d != 1 for i, d in
                                                         enumerate(shape) if i != 1):
        return None
    return value.reshape(-1).astype(np.float64)


def _into_conv(conv: gs.Node, node: gs.Node, value: np.ndarray, taken: set[str]):
    w = const_value(conv.inputs[1])
    vec = _channel_vector(value, w.shape[0], w.ndim)
    if vec is None:
        return f"{node.op} constant does not broadcast per output channel"
    has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
    bias = const_value(conv.inputs[2]) if has_bias else np.zeros(w.shape[0])
    if bias is None:
        return "Conv bias is not constant"
    bias = bias.astype(np.float64)
    if node.op == "Add":
        new_w, new_b = w, bias + vec
    else:
        new_w = (w.astype(np.float64) * vec.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        new_b = bias * vec
    old_b = conv.inputs[2] if has_bias else None
    b_name = take_over_name(old_b, f"{conv.name or conv.outputs[0].name}_bias", taken)
    if node.op == "Mul":
        conv.inputs[1] = gs.Constant(take_over_name(conv.inputs[1], conv.inputs[1].name, taken),
                                     new_w)
    conv.inputs = [conv.inputs[0], conv.inputs[1], gs.Constant(b_name, new_b.astype(w.dtype))]
    _bypass(conv, node)
    return None


def _into_gemm(matmul: gs.Node, node: gs.Node, value: np.ndarray, taken: set[str]):
    w = const_value(matmul.inputs[1])
    a = matmul.inputs[0]
    if w.ndim != 2 or a.shape is None or len(a.shape) != 2:
        return "MatMul is not known to be 2-D"
    if value.size not in (1, w.shape[1]) or (value.ndim == 2 and value.shape[0] != 1) \
            or value.ndim > 2:
        return "Add constant does not broadcast per output feature"
    bias = np.broadcast_to(value.reshape(-1), (w.shape[1],)).astype(w.dtype)
    matmul.op = "Gemm"
    matmul.inputs.append(gs.Constant(take_over_name(node.inputs[1] if isinstance(
        node.inputs[1], gs.Constant) else node.inputs[0], "gemm_bias", taken), bias))
    _bypass(matmul, node)
    return None


def _bypass(layer: gs.Node, node: gs.Node) -> None:
    """``layer`` now writes what ``node`` wrote; ``node`` is disconnected."""
    y = node.outputs[0]
    detach(node)
    layer.outputs = [y]
