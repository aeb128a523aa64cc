"""Distillation of a pass's new layers inside its graph (``distill_steps``).

The weight and bias constants of the layers a lossy pass produced (pruned, split) are
tuned together towards the model the pass started from (``distill``) and installed as
new constants; a masked weight's zeros stay zeros. Declined, with the reason counted,
when the graph has an op without a gradient here (e.g. the decode nodes of an earlier
pass) or when tuning does not lower the loss on held-out calibration samples.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import storage
from ..passes.base import PassContext, PassResult, replace_uses, unique_name
from .distill import Tie, distill


def tune_nodes(reference: onnx.ModelProto, graph: gs.Graph, nodes: list[gs.Node],
               keep_zeros: bool, ctx: PassContext, steps: int, result: PassResult,
               taken: set[str], ties: dict[str, Tie] | None = None,
               features: list[str] | None = None) -> dict | None:
    """Tune the weight (input 1) and bias (input 2) constants of ``nodes``; with
    ``keep_zeros`` the weights' zeros stay zeros. A weight named in ``ties`` is tuned
    through its tie's parameters and left in place (the caller encodes them). The loss
    matches the logits and ``features`` (default: the outputs of ``nodes`` that the
    reference has; a pass that changes their shapes names the ones it keeps). Stats and
    declines go to ``result``; returns the tuned values by name, None when declined."""
    ties = ties or {}
    slots = [(node, i) for node in nodes for i in (1, 2)
             if i < len(node.inputs) and isinstance(node.inputs[i], gs.Constant)
             and node.inputs[i].name not in ties]
    params = {node.inputs[i].name: np.asarray(node.inputs[i].values) for node, i in slots}
    masks = {name: (params[name] != 0).astype(np.float32) for name in
             (node.inputs[1].name for node, i in slots if i == 1)} if keep_zeros else {}
    for tie in ties.values():
        params.update(tie.init)
        masks.update(tie.masks)
    if features is None:
        known = {t for node in reference.graph.node for t in node.output}
        features = [node.outputs[0].name for node in nodes if node.outputs[0].name in known]
    student = _sorted_copy(graph)
    ctx.progress(f"distillation of {len(nodes)} layers, {steps} steps")
    try:
        done = distill(reference, student, params, masks, features, ctx.calib, steps,
                       ctx.seed, ctx.progress, ties)
    except ValueError as exc:
        result.declined[f"distillation: {exc}"] += 1
        return None
    result.stats.update(distill_loss_before=round(done.loss_before, 6),
                        distill_loss_after=round(done.loss_after, 6),
                        distill_step_size=float(f"{done.rate:.3g}"))
    if not done.loss_after < done.loss_before:
        result.declined["distillation did not lower the held-out calibration loss"] += 1
        return None
    for node, i in slots:
        old = node.inputs[i]
        value = done.values[old.name].astype(np.asarray(old.values).dtype)
        node.inputs[i] = gs.Constant(unique_name(taken, f"{old.name}_tuned"), value)
    return done.values


def _sorted_copy(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model without the nodes a rewrite detached, in topological order,
    and with every tensor computed from constants alone (the decode nodes of an earlier
    pass's storage) as a constant: the student computes only what depends on its input
    (passes leave cleanup and sorting to the manager; the graph itself is untouched)."""
    copy = gs.import_onnx(gs.export_onnx(graph, do_type_check=False))
    copy.cleanup(remove_unused_graph_inputs=False).toposort()
    frontier = _constant_frontier(copy)
    for tensor, value in zip(frontier, storage.decoded_values(frontier, copy.opset),
                             strict=True):
        replace_uses(tensor, gs.Constant(tensor.name, value))
        tensor.name = f"{tensor.name}/folded"
    copy.cleanup(remove_unused_graph_inputs=False)
    return gs.export_onnx(copy, do_type_check=False)


def _constant_frontier(graph: gs.Graph) -> list[gs.Variable]:
    """Tensors computed from constants alone that a node depending on an input reads."""
    fixed: set[str] = set()
    for node in graph.nodes:  # topological order
        if (node.inputs or node.op == "Constant") and all(
                isinstance(t, gs.Constant) or t.name in fixed or not t.name
                for t in node.inputs):
            fixed.update(t.name for t in node.outputs)
    outputs = {t.name for t in graph.outputs}
    return [t for t in graph.tensors().values() if t.name in fixed and t.name not in outputs
            and any(n.outputs and n.outputs[0].name not in fixed for n in t.outputs)]
