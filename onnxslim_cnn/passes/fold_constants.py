"""Fold nodes whose inputs are all constant, but only where the file does not grow.

Why: exported graphs carry shape arithmetic (Shape -> Gather -> Concat -> Reshape) and
weight preprocessing (Transpose, Cast, Mul of constants) that runtimes redo at load.

Before:  W -> Transpose -> Conv       After:  W_T -> Conv
Uses onnx-graphsurgeon's ``fold_constants`` (evaluated by onnxruntime) with a veto:
a node is folded only if the bytes it adds to the file are at most the bytes it frees,
or under ``SMALL_BYTES``:
    added = bytes of its outputs
    freed = bytes of its inputs that nothing else reads (constants, and intermediate
            results of folded producers, which are then no longer stored)
Output sizes come from the shapes onnx shape inference put on the graph
(``manager.import_graph``); when a size is unknown it is bounded from the inputs for
ops whose output cannot outgrow them (``BOUNDED``), and the node is declined otherwise.
Subgraphs (If/Loop bodies) are folded with the same veto. Shape(x), and Gather of it,
become constants where inference gave the dims as numbers (``_fold_static_shapes``);
graphsurgeon's own shape folding is off because it comes with a cast elision that is
not exact (Cast(int->float) -> Mul(0.5) -> Cast(int) becomes an integer Mul by 0).

Declines when: the output would be larger than what it frees (Tile, Expand,
ConstantOfShape, a transposed copy of a shared weight...); the output size is unknown
and cannot be bounded; the node belongs to a weight-decode subgraph of the storage
module (``storage.DECODE_TAG`` in its name), which runtimes fold at load time and which
exists precisely to keep the file small. Each declined node is counted once.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from .. import storage
from .base import Pass, PassContext, PassResult, register

SMALL_BYTES = 256
# Output bytes <= bytes of the first input (same element count and type, or fewer).
BOUNDED = {
    "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Neg", "Abs",
    "Sqrt", "Relu", "Floor", "Ceil", "Reciprocal", "Transpose",
}
# Output bytes = the sum of the input bytes.
SUMMED = {"Concat"}
# Output is a few int64 whatever the input: rank or element count.
TINY = {"Shape", "Size"}


@register
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "fold constant subgraphs where the file does not grow (lossless)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        computed = {t.name for g in _graphs(graph) for n in g.nodes for t in n.outputs}
        ifs = _count_ifs(graph)
        _fold(graph, result.declined)
        result.stats["tensors_folded"] = sum(
            1 for g in _graphs(graph) for name, t in g.tensors().items()
            if name in computed and isinstance(t, gs.Constant))
        result.stats["ifs_flattened"] = ifs - _count_ifs(graph)
        result.changed = any(result.stats.values())
        return result


def _graphs(graph: gs.Graph) -> list[gs.Graph]:
    return [graph, *graph.subgraphs(recursive=True)]


def _count_ifs(graph: gs.Graph) -> int:
    return sum(1 for g in _graphs(graph) for n in g.nodes if n.op == "If")


def _fold(graph: gs.Graph, declined: Counter) -> None:
    """Fold ``graph`` with the veto, then each of its subgraphs (recursively)."""
    # graphsurgeon asks about the same node once per folding round: remember the
    # verdict per node so that each declined node is counted once.
    verdicts: dict[int, str | None] = {}
    outputs = {t.name for t in graph.outputs}

    def exclude(node: gs.Node) -> bool:
        if id(node) not in verdicts:
            verdicts[id(node)] = _veto(node, outputs)
        return verdicts[id(node)] is not None

    _fold_static_shapes(graph)
    # fold_shapes=False: see the module docstring (cast elision). graphsurgeon does not
    # pass the veto on to subgraphs: recurse here instead.
    graph.fold_constants(fold_shapes=False, recurse_subgraphs=False, error_ok=True,
                         should_exclude_node=exclude)
    declined.update(reason for reason in verdicts.values() if reason)
    for sub in list(graph.subgraphs()):
        _fold(sub, declined)


def _fold_static_shapes(graph: gs.Graph) -> None:
    """Replace Shape(x) and Shape(x) -> Gather(const) by constants where the dims are static.

    Shape(x)[i] is static when onnx shape inference gave dimension i as a number.
    """
    for node in graph.nodes:
        if node.op != "Shape" or storage.DECODE_TAG in (node.name or ""):
            continue
        dims = node.inputs[0].shape
        if dims is None:
            continue
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        dims = list(dims)[start:end]
        if all(isinstance(d, int) and d >= 0 for d in dims):
            _to_constant(node.outputs[0], np.array(dims, dtype=np.int64))
            continue
        for gather in list(node.outputs[0].outputs):
            _fold_shape_gather(gather, dims)


def _fold_shape_gather(gather: gs.Node, dims: list) -> None:
    """Gather(Shape(x), i) -> the static dims it picks (dynamic dims elsewhere)."""
    if gather.op != "Gather" or gather.attrs.get("axis", 0) != 0 \
            or not isinstance(gather.inputs[1], gs.Constant):
        return
    indices = np.asarray(gather.inputs[1].values)
    if not np.issubdtype(indices.dtype, np.integer) or np.any(indices >= len(dims)) \
            or np.any(indices < -len(dims)):
        return
    picked = np.array(np.asarray(dims, dtype=object)[indices], dtype=object)
    if all(isinstance(d, int) and d >= 0 for d in np.ravel(picked)):
        _to_constant(gather.outputs[0], picked.astype(np.int64))


def _to_constant(tensor: gs.Variable, value: np.ndarray) -> None:
    tensor.to_constant(value)
    tensor.inputs.clear()


def _itemsize(dtype) -> int | None:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # types numpy lacks (bfloat16...) come as onnx enums
        return None


def _nbytes(tensor: gs.Tensor) -> int | None:
    """Bytes of ``tensor`` from its value or its inferred shape; None if unknown."""
    if isinstance(tensor, gs.Constant):
        return int(tensor.values.nbytes)
    if tensor.shape is None or tensor.dtype is None:
        return None
    if any(not isinstance(d, int) or d < 0 for d in tensor.shape):
        return None
    itemsize = _itemsize(tensor.dtype)
    if itemsize is None:
        return None
    return int(np.prod(tensor.shape, dtype=np.int64)) * itemsize


def _output_bytes(node: gs.Node) -> int | None:
    """Bytes the node's outputs would add; bounded from the inputs when unknown."""
    sizes = [_nbytes(t) for t in node.outputs]
    if all(s is not None for s in sizes):
        return sum(sizes)
    if node.op in TINY:
        return 0
    inputs = [_nbytes(t) for t in node.inputs if not t.is_empty()]
    if node.op in BOUNDED and inputs and inputs[0] is not None:
        return inputs[0]
    if node.op in SUMMED and inputs and all(s is not None for s in inputs):
        return sum(inputs)
    return None


def _freed_bytes(node: gs.Node, outputs: set[str]) -> int:
    """Bytes of the inputs that only this node reads (no longer stored once folded).

    The veto is only asked about nodes whose inputs are all constant or foldable, so
    a variable input here is the result of a folded producer.
    """
    return sum(_nbytes(t) or 0 for t in node.inputs
               if not t.is_empty() and len(t.outputs) == 1 and t.name not in outputs)


def _veto(node: gs.Node, outputs: set[str]) -> str | None:
    if storage.DECODE_TAG in (node.name or ""):
        return "part of a weight-decode subgraph (folded by the runtime at load)"
    added = _output_bytes(node)
    if added is None:
        return "output size unknown; the op may grow"
    if added > max(_freed_bytes(node, outputs), SMALL_BYTES):
        return f"{node.op} would grow the file"
    return None
