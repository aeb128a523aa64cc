"""Rename internal tensors to short names and drop node names (lossless, opt-in).

Why: every tensor name is stored once per use (producer, each consumer, initializer).
On small models (a 79K-parameter ResNet-8 quantized to int8) names are ~8 % of the file.

Before:  Conv(conv2d_1.weight_dq, ...) -> batch_normalization_1
After:   Conv(a3, ...) -> a4
Graph inputs and outputs keep their names, so the model's interface is unchanged. New
names are base-36 counters in node order, so the result is deterministic.

Declines when: the graph has subgraphs (If/Loop bodies may capture outer names).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .. import model_io
from .base import Pass, PassContext, PassResult, register

DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def short_name(index: int) -> str:
    """'a0', 'a1', ... 'az', 'a10', ...: a letter first keeps names valid identifiers."""
    digits = ""
    while True:
        index, rest = divmod(index, len(DIGITS))
        digits = DIGITS[rest] + digits
        if index == 0:
            return "a" + digits


@register
class CompactNames(Pass):
    name = "compact-names"
    summary = "short internal tensor names, no node names; I/O names kept (lossless, opt-in)"
    lossless = True
    # These recognise weight-decode subgraphs by the storage tag in their node names,
    # which this pass drops: after it, fold-constants would fold a packed weight back to
    # dense and qdq-int8 / cluster-weights would not see codebooks or sparse weights.
    after = ("fold-constants", "prune-weights", "cluster-weights", "qdq-int8",
             "auto-compress", "half-constants")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if any(isinstance(v, gs.Graph) for n in graph.nodes for v in _attr_values(n)):
            return PassResult(changed=False, declined={"model has subgraphs": 1})
        keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
        tensors = _in_node_order(graph)
        new = short_names((t.name for t in tensors), keep)
        saved = 0
        for tensor in tensors:
            if tensor.name in new:
                saved += len(tensor.name) - len(new[tensor.name])
                tensor.name = new[tensor.name]
        for node in graph.nodes:
            saved += len(node.name or "")
            node.name = ""
        return PassResult(changed=saved > 0, stats={"name_bytes_saved": saved})


def short_names(names, keep: set[str]) -> dict[str, str]:
    """{name: short name} for ``names`` in order of first appearance, skipping empty
    names and those in ``keep`` (which no short name takes either)."""
    new: dict[str, str] = {}
    index = 0
    for name in names:
        if name and name not in keep and name not in new:
            while short_name(index) in keep:
                index += 1
            new[name] = short_name(index)
            index += 1
    return new


def compacted_bytes(model: onnx.ModelProto) -> int:
    """File bytes of ``model`` after this pass (the same renaming on a copy of the
    proto; a graph with subgraphs is measured as it is, as the pass leaves it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        return model_io.model_bytes(model)
    keep = {t.name for t in graph.input} | {t.name for t in graph.output}
    new = short_names((name for node in graph.node for name in (*node.input, *node.output)),
                      keep)
    for node in graph.node:
        node.ClearField("name")
        node.input[:] = [new.get(n, n) for n in node.input]
        node.output[:] = [new.get(n, n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = new.get(tensor.name, tensor.name)
    del graph.value_info[:]
    return model_io.model_bytes(copy)


def _attr_values(node: gs.Node):
    for value in node.attrs.values():
        yield from value if isinstance(value, list) else [value]


def _in_node_order(graph: gs.Graph) -> list[gs.Tensor]:
    seen: dict[int, gs.Tensor] = {}
    for node in graph.nodes:
        for tensor in list(node.inputs) + list(node.outputs):
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


