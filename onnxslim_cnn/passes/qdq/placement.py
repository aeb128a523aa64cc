"""Mark which tensors get QuantizeLinear/DequantizeLinear, before any is inserted.

Per-op handlers only *mark*: activation inputs to quantize, constant weights with their
channel axis, biases, and tensors whose quantization parameters must equal another's.
``insert.py`` materialises every mark in one sweep.

Placement follows what onnxruntime fuses into int8 kernels:
    DQ(x) -> Conv(DQ(W), DQ(b_int32)) -> [Relu|Clip] -> Q   =>  QLinearConv
    DQ(a), DQ(b) -> Add -> Q                              =>  QLinearAdd
    DQ -> Gemm(DQ(W)) [-> Q]                               =>  QGemm (float output allowed)
    DQ -> MaxPool/Flatten/Reshape/... -> Q, same scale     =>  runs on int8, Q/DQ dropped
    DQ(x_i) -> Concat -> Q, one scale for all              =>  QLinearConcat / plain copy
Relu/Clip between a Conv and its Q are left unmarked: onnxruntime removes them when the
Q range starts at 0 (post-activation ranges always include 0).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ... import storage
from ..base import const_value, not_constant

# Ops whose output has exactly the values of (a subset of) their input: same params.
SAME_PARAMS = {"MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze",
               "Unsqueeze", "Slice", "Gather"}
ELEMENTWISE = {"Add", "Mul"}
POOLS = {"AveragePool", "GlobalAveragePool"}
UNARY = {"Sigmoid", "HardSigmoid", "LeakyRelu", "HardSwish"}


@dataclass
class WeightSite:
    """A constant weight to store as int8, or (``codebook``) a float codebook decode of
    cluster-weights whose codebook becomes int8 (storage.find_codebook)."""

    node: gs.Node
    index: int
    axis: int
    depthwise: bool = False
    codebook: storage.CodebookDecode | None = None


@dataclass
class BiasSite:
    node: gs.Node
    index: int
    activation: str
    weight: WeightSite


@dataclass
class Plan:
    """Everything to quantize, by name.

    Attributes:
        reads: activation tensor name -> (node, input index) pairs that read its DQ.
        weights / biases: constant inputs quantized per channel / to int32.
        tie: tensor -> the tensor whose parameters it reuses (data-movement ops).
        groups: sets of tensors sharing one range (Concat inputs and output).
        layers: the compute nodes that run in int8.
        kept: nodes left in float because they were asked to be (``skip``).
        tails: tensors quantized only so that the conv before them runs in int8; their
            reader is a float averaging pool (see ``_prune_tails``).
        movers: data-movement nodes (MaxPool, Flatten...) whose output reuses the
            input's parameters.
    """

    reads: dict[str, list[tuple[gs.Node, int]]] = field(default_factory=dict)
    weights: list[WeightSite] = field(default_factory=list)
    biases: list[BiasSite] = field(default_factory=list)
    tie: dict[str, str] = field(default_factory=dict)
    groups: list[set[str]] = field(default_factory=list)
    layers: list[gs.Node] = field(default_factory=list)
    movers: list[gs.Node] = field(default_factory=list)
    kept: list[gs.Node] = field(default_factory=list)
    tails: set[str] = field(default_factory=set)
    declined: Counter = field(default_factory=Counter)

    def tensor(self, name: str) -> gs.Variable:
        """The activation tensor ``name`` of ``reads``, as its first reader sees it."""
        node, index = self.reads[name][0]
        return node.inputs[index]


def plan_graph(graph: gs.Graph, skip: set[str], weights_only: bool = False,
               int8_tails: bool = True) -> Plan:
    """Mark the quantization of ``graph``; nodes named in ``skip`` (by node name or by
    first output name, which unnamed nodes also have) stay float; ``int8_tails``: see
    ``_prune_tails``."""
    plan = Plan()
    tensors = graph.tensors()
    for node in graph.nodes:
        if storage.DECODE_TAG in (node.name or ""):  # integer weight decode, folded at load
            continue
        if (node.name and node.name in skip) or (node.outputs and node.outputs[0].name in skip):
            plan.kept.append(node)
            continue
        handler = _HANDLERS.get(node.op)
        if handler is None:
            continue
        if weights_only and node.op not in _WEIGHTED:
            continue
        reason = handler(node, plan, weights_only)
        if reason:
            plan.declined[reason] += 1
    _prune_tails(plan, int8_tails)
    if int8_tails:
        _float_read_convs(plan, {t.name for t in graph.outputs})
    _prune_ties(plan, tensors)
    return plan


def _read(plan: Plan, node: gs.Node, index: int) -> None:
    plan.reads.setdefault(node.inputs[index].name, []).append((node, index))


def _activation_ok(tensor: gs.Tensor) -> bool:
    """A float32 activation (unknown dtype counts as float32: CNN activations are)."""
    if isinstance(tensor, gs.Constant):
        return False
    try:
        return tensor.dtype is None or np.dtype(tensor.dtype) == np.float32
    except TypeError:
        return False


def _weight(tensor: gs.Tensor, weights_only: bool):
    """(shape, codebook decode or None) of a Conv/Gemm weight we can store as int8, or
    None: a constant, or (static int8 only) a cluster-weights codebook decode."""
    w = const_value(tensor)
    if w is not None:
        return w.shape, None
    found = None if weights_only else storage.find_codebook(tensor)
    if found is None or tensor.shape is None:
        return None
    return tuple(tensor.shape), found


def _conv(node: gs.Node, plan: Plan, weights_only: bool) -> str | None:
    weight = _weight(node.inputs[1], weights_only)
    if weight is None:
        return not_constant(node.inputs[1], "Conv weight")
    if not weights_only and not _activation_ok(node.inputs[0]):
        return "Conv input is not float32"
    group = int(node.attrs.get("group", 1))
    shape, codebook = weight
    site = WeightSite(node, 1, axis=0, depthwise=group > 1 and shape[1] == 1,
                      codebook=codebook)
    plan.weights.append(site)
    if weights_only:
        return None
    _read(plan, node, 0)
    if len(node.inputs) > 2 and const_value(node.inputs[2]) is not None:
        plan.biases.append(BiasSite(node, 2, node.inputs[0].name, site))
    plan.layers.append(node)
    return None


def _gemm(node: gs.Node, plan: Plan, weights_only: bool) -> str | None:
    weight = _weight(node.inputs[1], weights_only)
    if weight is None:
        return not_constant(node.inputs[1], f"{node.op} weight")
    if len(weight[0]) != 2:
        return f"{node.op} weight is not a matrix"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or
                              float(node.attrs.get("alpha", 1.0)) != 1.0):
        return "Gemm with transA or alpha != 1"
    axis = 0 if node.op == "Gemm" and node.attrs.get("transB", 0) else 1
    site = WeightSite(node, 1, axis=axis, codebook=weight[1])
    plan.weights.append(site)
    if weights_only:
        return None
    _read(plan, node, 0)
    if node.op == "Gemm" and len(node.inputs) > 2 and float(node.attrs.get("beta", 1.0)) == 1.0:
        bias = const_value(node.inputs[2])
        if bias is not None and bias.ndim == 1:
            plan.biases.append(BiasSite(node, 2, node.inputs[0].name, site))
    plan.layers.append(node)
    return None


def _elementwise(node: gs.Node, plan: Plan, weights_only: bool) -> str | None:
    if any(isinstance(t, gs.Constant) for t in node.inputs):
        return f"{node.op} with a constant operand"
    for index in range(len(node.inputs)):
        _read(plan, node, index)
    plan.layers.append(node)
    return None


def _same_params(node: gs.Node, plan: Plan, weights_only: bool) -> str | None:
    _read(plan, node, 0)
    plan.movers.append(node)
    plan.tie[node.outputs[0].name] = node.inputs[0].name
    return None


def _concat(node: gs.Node, plan: Plan, weights_only: bool) -> str | None:
    if any(isinstance(t, gs.Constant) for t in node.inputs):
        return "Concat with a constant operand"
    for index in range(len(node.inputs)):
        _read(plan, node, index)
    plan.groups.append({t.name for t in node.inputs} | {node.outputs[0].name})
    plan.layers.append(node)
    return None


def _single_input(node: gs.Node, plan: Plan, weights_only: bool) -> str | None:
    _read(plan, node, 0)
    plan.layers.append(node)
    return None


_HANDLERS = {"Conv": _conv, "Gemm": _gemm, "MatMul": _gemm, "Concat": _concat}
_HANDLERS.update({op: _elementwise for op in ELEMENTWISE})
_HANDLERS.update({op: _same_params for op in SAME_PARAMS})
_HANDLERS.update({op: _single_input for op in POOLS | UNARY})
_WEIGHTED = {"Conv", "Gemm", "MatMul"}


def _prune_tails(plan: Plan, int8_tails: bool = True) -> None:
    """Unmark pooling/data-movement ops whose output no quantized op reads.

    Such an op cannot run in int8 (onnxruntime needs a Q after it), so quantizing its
    input only adds error; e.g. SqueezeNet's GlobalAveragePool -> Softmax. One
    exception (``int8_tails``): an averaging pool right after a quantized Conv/Gemm
    (through Relu/Clip) keeps its input's Q/DQ, because without a Q on its output the
    conv cannot run as an int8 kernel, and the pool averages the rounding noise away
    (GAP over H*W positions divides its variance by H*W). The pool itself runs in
    float on the dequantized tensor. Repeats until nothing changes (GAP -> Flatten...).
    """
    changed = True
    while changed:
        changed = False
        for node in [n for n in plan.layers if n.op in POOLS | UNARY] + plan.movers:
            if node.outputs[0].name in plan.reads:
                continue
            if int8_tails and node.op in POOLS and _after_int8_layer(node.inputs[0], plan):
                plan.tails.add(node.inputs[0].name)
                continue
            name = node.inputs[0].name
            kept = [(n, i) for n, i in plan.reads.get(name, []) if n is not node]
            if len(kept) != len(plan.reads.get(name, [])):
                changed = True
                if kept:
                    plan.reads[name] = kept
                else:
                    plan.reads.pop(name, None)
    readers = {id(r) for reads in plan.reads.values() for r, _ in reads}
    float_tails = {id(n) for n in plan.layers
                   if n.op in POOLS and n.outputs[0].name not in plan.reads}
    plan.layers = [n for n in plan.layers if n.op in _WEIGHTED or (
        id(n) in readers and id(n) not in float_tails)]


def _float_read_convs(plan: Plan, graph_outputs: set[str]) -> None:
    """Quantize the output of a quantized Conv (through Relu/Clip) that only float ops
    read, e.g. Inception v1's LRN or a MaxPool before it: onnxruntime runs a conv as
    an int8 kernel only with a Q on its output, and left without one the conv runs in
    float (the light Inception v1: its two heaviest-but-one convs, 0.96x the fp32
    latency). The readers see the dequantized tensor, one more rounding of an
    activation. Not for a graph output, nor for Gemm/MatMul (their int8 kernels can
    write float), nor when a float Conv/Gemm/MatMul reads the tensor (through pools,
    reshapes...): that layer was kept float because of its input's quantization."""
    for node in [n for n in plan.layers if n.op == "Conv"]:
        tensor = node.outputs[0]
        while len(tensor.outputs) == 1 and tensor.outputs[0].op in ("Relu", "Clip"):
            tensor = tensor.outputs[0].outputs[0]
        if tensor.name in plan.reads or tensor.name in graph_outputs or \
                not tensor.outputs or not _activation_ok(tensor) or _reaches_float_layer(tensor):
            continue
        for reader in tensor.outputs:
            for index, value in enumerate(reader.inputs):
                if value is tensor:
                    plan.reads.setdefault(tensor.name, []).append((reader, index))


_PASS_THROUGH = {"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool", "Relu",
                 "Clip", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity",
                 "Pad"}


def _reaches_float_layer(tensor: gs.Tensor) -> bool:
    """A float Conv/Gemm/MatMul reads ``tensor``, directly or through ops that pass its
    values on: one kept float by ``skip`` or the SQNR fallback, which is float because
    quantizing its input costs too much (an outlier channel)."""
    todo, seen = [tensor], set()
    while todo:
        for reader in todo.pop().outputs:
            if reader.op in _WEIGHTED:
                return True
            if reader.op in _PASS_THROUGH and id(reader) not in seen:
                seen.add(id(reader))
                todo.extend(reader.outputs)
    return False


def _after_int8_layer(tensor: gs.Tensor, plan: Plan) -> bool:
    """``tensor`` is the output of a quantized Conv/Gemm, directly or through Relu/Clip."""
    producer = tensor.inputs[0] if tensor.inputs else None
    while producer is not None and producer.op in ("Relu", "Clip") and len(tensor.outputs) == 1:
        tensor = producer.inputs[0]
        producer = tensor.inputs[0] if tensor.inputs else None
    return producer is not None and producer.op in _WEIGHTED and any(
        producer is n for n in plan.layers) and len(tensor.outputs) == 1


def _prune_ties(plan: Plan, tensors: dict[str, gs.Tensor]) -> None:
    """A tie only matters when the tied output is itself quantized."""
    plan.tie = {out: src for out, src in plan.tie.items() if out in plan.reads}
