"""Fold nodes whose inputs are all constant, but only where the file does not grow.

Why: exported graphs carry shape arithmetic (Shape -> Gather -> Concat -> Reshape) and
weight preprocessing (Transpose, Cast, Mul of constants) that runtimes redo at load.

Before:  W -> Transpose -> Conv       After:  W_T -> Conv
Uses onnx-graphsurgeon's ``fold_constants`` (evaluated by onnxruntime) with a veto:
a node is folded only if the bytes it adds to the file are at most the bytes of the
constants it frees (inputs with no other consumer), or under ``SMALL_BYTES``.

Declines when: the output would be larger than what it frees (Tile, Expand,
ConstantOfShape, a transposed copy of a shared weight...); the output size is unknown
and the op may grow; the node belongs to a weight-decode subgraph of the storage
module (``storage.DECODE_TAG`` in its name), which runtimes fold at load time and which
exists precisely to keep the file small.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .. import storage
from .base import Pass, PassContext, PassResult, register

SMALL_BYTES = 256
NEVER_GROWS = {
    "Shape", "Size", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather",
    "Slice", "Concat", "Neg", "Abs", "Sqrt", "Relu", "Floor", "Ceil", "Reciprocal",
}


@register
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "fold constant subgraphs where the file does not grow (lossless)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        computed = {t.name for n in graph.nodes for t in n.outputs}

        def exclude(node: gs.Node) -> bool:
            reason = _veto(node)
            if reason:
                result.declined[reason] += 1
            return reason is not None

        graph.fold_constants(fold_shapes=True, error_ok=True, should_exclude_node=exclude)
        folded = sum(1 for name, t in graph.tensors().items()
                     if name in computed and isinstance(t, gs.Constant))
        result.stats["tensors_folded"] = folded
        result.changed = folded > 0
        return result


def _nbytes(tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant):
        return int(tensor.values.nbytes)
    if tensor.shape is None or tensor.dtype is None:
        return None
    if any(not isinstance(d, int) or d < 0 for d in tensor.shape):
        return None
    return int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize


def _veto(node: gs.Node) -> str | None:
    if storage.DECODE_TAG in (node.name or ""):
        return "part of a weight-decode subgraph (folded by the runtime at load)"
    sizes = [_nbytes(t) for t in node.outputs]
    if any(s is None for s in sizes):
        return None if node.op in NEVER_GROWS else "output size unknown; the op may grow"
    added = sum(sizes)
    freed = sum(_nbytes(t) or 0 for t in node.inputs
                if isinstance(t, gs.Constant) and len(t.outputs) == 1)
    if added > max(freed, SMALL_BYTES):
        return f"{node.op} would grow the file"
    return None
