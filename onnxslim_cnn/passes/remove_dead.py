"""Remove graph inputs nothing live reads, and count dead nodes and initializers (lossless).

Dead nodes (no path to a graph output) and the initializers only they read are
deleted by the manager's graph cleanup, which runs after every pass that changed the
graph; this pass makes that removal explicit and visible in the report, and also drops
graph inputs that no node consumes (which the cleanup keeps, as they are interface).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassContext, PassResult, register


@register
class RemoveDead(Pass):
    name = "remove-dead"
    summary = "remove dead nodes, unused initializers and unused graph inputs (lossless)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        live_nodes, live_tensors = _live(graph)
        dead_nodes = [n for n in graph.nodes if id(n) not in live_nodes]
        dead_consts = {t.name for n in dead_nodes for t in n.inputs
                       if isinstance(t, gs.Constant) and t.name not in live_tensors}
        # An input read only by dead nodes is unused too: the cleanup that follows
        # removes those nodes, so keeping the input would leave a second run work.
        unused = [t for t in graph.inputs if t.name not in live_tensors]
        graph.inputs[:] = [t for t in graph.inputs if t not in unused]
        stats = {"dead_nodes": len(dead_nodes), "dead_initializers": len(dead_consts),
                 "unused_inputs_removed": len(unused)}
        return PassResult(changed=any(stats.values()), stats=stats)


def _live(graph: gs.Graph) -> tuple[set[int], set[str]]:
    """Ids of nodes and names of tensors from which a graph output is reachable."""
    live_nodes: set[int] = set()
    live_tensors: set[str] = set()
    stack = list(graph.outputs)
    while stack:
        tensor = stack.pop()
        if tensor.name in live_tensors:
            continue
        live_tensors.add(tensor.name)
        for producer in tensor.inputs:
            if id(producer) not in live_nodes:
                live_nodes.add(id(producer))
                stack.extend(producer.inputs)
                stack.extend(_captured(producer))
    return live_nodes, live_tensors


def _captured(node: gs.Node) -> list[gs.Tensor]:
    """Outer tensors that a node's subgraphs (at any depth) read.

    Over-approximates: a tensor of an enclosing subgraph read by a nested one is
    listed too, which only keeps more alive.
    """
    found = []
    for sub in node.subgraphs(recursive=True):
        inner = {t.name for n in sub.nodes for t in n.outputs} | {t.name for t in sub.inputs}
        found += [t for n in sub.nodes for t in n.inputs if t.name not in inner]
    return found
