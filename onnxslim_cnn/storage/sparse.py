"""Compact weight storage: sparse (see the package docstring for formats and figures)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..graph_edit import taken_names, unique_name
from .bits import _unpack
from .core import DECODE_TAG, SPARSE_TAG, Encoded, ValuesEncoder, _Builder, _require_opset


def encode_sparse(graph: gs.Graph, name: str, weight: np.ndarray,
                  taken: set[str] | None = None,
                  values_encoder: ValuesEncoder | None = None) -> Encoded:
    """Store ``weight`` as a 1-bit nonzero mask plus its nonzero values in order.

    Args:
        values_encoder: encodes the 1-D nonzero values (``codebook_values``,
            ``int_values``); None stores them raw in ``weight``'s dtype.

    Returns:
        Encoded with min_opset 11 (CumSum), or the values encoder's if higher.
    """
    weight = np.asarray(weight)
    _require_opset(graph, 11, "sparse storage")
    b = _Builder(graph, name, taken)
    mask = weight.reshape(-1) != 0
    nonzero = weight.reshape(-1)[mask]
    size, shape = weight.size, list(weight.shape)
    values, opset, label = _sparse_values(b, nonzero, values_encoder)  # may raise: first
    bit = b.op("Cast", [_unpack(b, mask.astype(np.uint8), 1, [size])], np.int32, [size],
               to=onnx.TensorProto.INT32)
    # position of each nonzero among the nonzeros, 1-based; 0 (-> table[0] = 0) for zeros
    rank = b.op("CumSum", [bit, b.const("axis", np.array(0, np.int32))], np.int32, [size])
    index = b.op("Mul", [rank, bit], np.int32, [size])
    grid = b.op("Reshape", [index, b.ints("shape", shape)], np.int32, shape)
    table = b.op("Concat", [b.const("zero", np.zeros(1, values.dtype)), values], values.dtype,
                 [nonzero.size + 1], axis=0)
    out = b.op("Gather", [table, grid], values.dtype, shape, axis=0)
    return b.finish(out, weight.nbytes, label, max(11, opset))


def is_sparse(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` is written by ``encode_sparse`` with raw values (no values
    encoder): Gather(Concat([0], values constant), index), recognised by ``DECODE_TAG``."""
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return False
    gather = tensor.inputs[0]
    if gather.op != "Gather" or DECODE_TAG not in (gather.name or ""):
        return False
    table = gather.inputs[0]
    concat = table.inputs[0] if isinstance(table, gs.Variable) and table.inputs else None
    return concat is not None and concat.op == "Concat" and \
        DECODE_TAG in (concat.name or "") and \
        all(isinstance(t, gs.Constant) for t in concat.inputs)


def _sparse_values(b: _Builder, nonzero, encoder):
    if encoder is None:
        return b.const("values", nonzero), 1, "sparse"
    encoded = encoder(b.graph, f"{b.name}_values", nonzero, b.taken)
    b.stored += encoded.stored_bytes
    b.file += encoded.file_bytes
    return encoded.tensor, encoded.min_opset, f"sparse+{encoded.encoding}"


def _sparse_proto(weight: np.ndarray, name: str) -> onnx.SparseTensorProto:
    flat = weight.reshape(-1)
    where = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[where], name)
    indices = numpy_helper.from_array(where, f"{name}_indices")
    return onnx.helper.make_sparse_tensor(values, indices, list(weight.shape))


def mark_sparse_initializer(graph: gs.Graph, name: str, weight: np.ndarray,
                            taken: set[str] | None = None) -> Encoded:
    """A copy of ``weight`` named for ``to_sparse_initializers`` (dense in the graph).

    ``stored_bytes`` and ``file_bytes`` are those of the serialized sparse initializer
    (values + INT64 flat indices), min_opset 1 (IR version 6).
    """
    weight = np.asarray(weight)
    taken = taken if taken is not None else taken_names(graph)
    tensor = gs.Constant(unique_name(taken, f"{name}/{SPARSE_TAG}"), weight.copy())
    size = _sparse_proto(weight, tensor.name).ByteSize()
    return Encoded(tensor, size, weight.nbytes, "sparse-initializer", 1, name, size)


def best_sparse(graph: gs.Graph, name: str, weight: np.ndarray,
                taken: set[str] | None = None,
                values_encoder: ValuesEncoder | None = None) -> Encoded:
    """The smaller in the file of ``encode_sparse`` and an ONNX sparse initializer.

    Both are measured: the bitmask encoding is built in a scratch graph and its
    ``file_bytes`` compared with the serialized sparse initializer.
    """
    taken = taken if taken is not None else taken_names(graph)
    weight = np.asarray(weight)
    trial = encode_sparse(gs.Graph(opset=graph.opset), name, weight, set(taken),
                          values_encoder)
    if trial.file_bytes <= _sparse_proto(weight, f"{name}/{SPARSE_TAG}").ByteSize():
        return encode_sparse(graph, name, weight, taken, values_encoder)
    return mark_sparse_initializer(graph, name, weight, taken)


def to_sparse_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` whose ``SPARSE_TAG`` initializers are ONNX sparse initializers.

    Call on the final model only (onnx-graphsurgeon cannot re-import them correctly).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for init in out.graph.initializer:
        if SPARSE_TAG in init.name:
            out.graph.sparse_initializer.append(
                _sparse_proto(numpy_helper.to_array(init), init.name))
        else:
            keep.append(init)
    if len(keep) != len(out.graph.initializer):
        del out.graph.initializer[:]
        out.graph.initializer.extend(keep)
        out.ir_version = max(out.ir_version, 6)
    return out
