"""Distillation of a pass's new layers inside its graph (``distill_steps``).

The weight and bias constants of the layers a lossy pass produced (pruned, split) are
tuned together towards the model the pass started from (``distill``) and installed as
new constants; a masked weight's zeros stay zeros. Declined, with the reason counted,
when the graph has an op without a gradient here (e.g. the decode nodes of an earlier
pass) or when tuning does not lower the calibration loss.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..passes.base import PassContext, PassResult, unique_name
from .distill import distill


def tune_nodes(reference: onnx.ModelProto, graph: gs.Graph, nodes: list[gs.Node],
               keep_zeros: bool, ctx: PassContext, steps: int, result: PassResult,
               taken: set[str]) -> None:
    """Tune the weight (input 1) and bias (input 2) constants of ``nodes``; with
    ``keep_zeros`` the weights' zeros stay zeros. Stats and declines go to ``result``."""
    slots = [(node, i) for node in nodes for i in (1, 2)
             if i < len(node.inputs) and isinstance(node.inputs[i], gs.Constant)]
    params = {node.inputs[i].name: np.asarray(node.inputs[i].values) for node, i in slots}
    masks = {name: (params[name] != 0).astype(np.float32) for name in
             (node.inputs[1].name for node, i in slots if i == 1)} if keep_zeros else {}
    known = {t for node in reference.graph.node for t in node.output}
    features = [node.outputs[0].name for node in nodes if node.outputs[0].name in known]
    student = _sorted_copy(graph)
    ctx.progress(f"distillation of {len(nodes)} layers, {steps} steps")
    try:
        done = distill(reference, student, params, masks, features, ctx.calib, steps,
                       ctx.seed, ctx.progress)
    except ValueError as exc:
        result.declined[f"distillation: {exc}"] += 1
        return
    result.stats.update(distill_loss_before=round(done.loss_before, 6),
                        distill_loss_after=round(done.loss_after, 6))
    if not done.loss_after < done.loss_before:
        result.declined["distillation did not lower the calibration loss"] += 1
        return
    for node, i in slots:
        old = node.inputs[i]
        value = done.values[old.name].astype(np.asarray(old.values).dtype)
        node.inputs[i] = gs.Constant(unique_name(taken, f"{old.name}_tuned"), value)


def _sorted_copy(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model without the nodes a rewrite detached, in topological order
    (passes leave cleanup and sorting to the manager; the graph itself is untouched)."""
    copy = gs.import_onnx(gs.export_onnx(graph, do_type_check=False))
    copy.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(copy, do_type_check=False)
