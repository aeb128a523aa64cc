"""Remove Identity nodes and inference-mode Dropout (lossless).

Before:  X -> Conv -> t -> Identity -> u -> Relu      After:  X -> Conv -> t -> Relu
When the removed node's output is a graph output, the producer writes that name
directly, so the model's interface keeps its output names.

Declines when: the Dropout is in training mode or its mask output is used; the node
connects a graph input (or constant) straight to a graph output, or two graph outputs;
the output name is referenced from inside a subgraph (If/Loop bodies capture outer names).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import (
    Pass,
    PassContext,
    PassResult,
    const_value,
    detach,
    register,
    replace_output,
    replace_uses,
)


@register
class RemoveIdentity(Pass):
    name = "remove-identity"
    summary = "remove Identity and inference-mode Dropout nodes (lossless)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        captured = _subgraph_references(graph)
        for node in [n for n in graph.nodes if n.op in ("Identity", "Dropout")]:
            reason = _reason(node, graph, captured) or _bypass(node, graph)
            if reason:
                result.declined[reason] += 1
                continue
            key = f"{node.op.lower()}_removed"
            result.stats[key] = result.stats.get(key, 0) + 1
            result.changed = True
        return result


def _subgraph_references(graph: gs.Graph) -> set[str]:
    """Names read by nodes inside any subgraph (they may capture outer tensors)."""
    names: set[str] = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    names |= {t.name for n in sub.nodes for t in n.inputs}
                    names |= _subgraph_references(sub)
    return names


def _reason(node: gs.Node, graph: gs.Graph, captured: set[str]) -> str | None:
    if node.op == "Dropout":
        if len(node.outputs) > 1 and (node.outputs[1].outputs or node.outputs[1] in graph.outputs):
            return "Dropout mask output is used"
        if len(node.inputs) > 2 and node.inputs[2].name:
            mode = const_value(node.inputs[2])
            if mode is None or bool(mode):
                return "Dropout may run in training mode"
    if node.outputs[0].name in captured:
        return "output is referenced inside a subgraph"
    return None


def _bypass(node: gs.Node, graph: gs.Graph) -> str | None:
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        producer = src.inputs[0] if src.inputs else None
        if producer is None or src in graph.inputs:
            return "connects a graph input or constant directly to a graph output"
        if src in graph.outputs:
            return "input and output are both graph outputs"
        # The producer takes over the graph output's name.
        detach(node)
        replace_uses(src, dst)
        replace_output(producer, src, dst)
        return None
    replace_uses(dst, src)
    detach(node)
    return None
