"""Compact weight storage: codebook (see the package docstring for formats and figures)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UsageError
from .bits import PLANES, _unpack
from .core import (
    DECODE_TAG,
    FLOAT_DTYPES,
    Encoded,
    ValuesEncoder,
    _Builder,
    _check_bits,
    _require_opset,
)


def encode_codebook(graph: gs.Graph, name: str, indices: np.ndarray, codebook: np.ndarray,
                    bits: int, shape=None, taken: set[str] | None = None,
                    per_channel_axis: int | None = None,
                    channel_scale: np.ndarray | None = None, dtype=None) -> Encoded:
    """Store ``codebook[indices]`` as ``bits``-bit packed indices plus the codebook.

    Args:
        indices: integers in [0, k), k <= 2^bits; any shape with ``prod(shape)`` items.
        codebook: [k] (per tensor) or [C, k] with C = shape[per_channel_axis]; float or
            int8 (decode with ``dequantize`` afterwards). Stored in its own dtype: a
            float16 codebook's Gather decodes float16 directly (onnxruntime has float16
            Gather on CPU and folds it).
        shape: decoded shape (default ``indices.shape``).
        channel_scale: [C] float32 with a [k] codebook: the decode is multiplied by it
            along ``per_channel_axis`` (a shared codebook scaled per channel). The
            codebook is then stored as float32 and multiplied in float32 (onnxruntime
            has no float16 Mul on CPU to fold).
        dtype: dtype of the decoded tensor (default: the codebook's, float32 when
            scaled); a decode of another dtype ends in a Cast to it.

    Returns:
        Encoded with min_opset 11 (BitShift; 14 for 3, 5, 6, 7 bits: uint8 Add).

    Raises:
        UsageError: bits outside 1..8, an index out of range, a codebook of wrong shape.
        PreconditionError: the graph opset is below min_opset.
    """
    indices, codebook = np.asarray(indices), np.asarray(codebook)
    shape = tuple(int(d) for d in (indices.shape if shape is None else shape))
    _check_bits(bits)
    scaled = channel_scale is not None
    _check_codebook(indices, codebook, bits, shape, None if scaled else per_channel_axis)
    if scaled and (per_channel_axis is None or np.size(channel_scale) !=
                   shape[per_channel_axis % len(shape)]):
        raise UsageError(f"channel scale of {np.size(channel_scale)} values does not fit "
                         f"shape {shape} along axis {per_channel_axis}")
    _require_opset(graph, _codebook_opset(bits), f"{bits}-bit codebook storage")
    b = _Builder(graph, name, taken)
    index = b.op("Cast", [_unpack(b, indices, bits, shape)], np.int32, list(shape),
                 to=onnx.TensorProto.INT32)
    table = codebook.reshape(-1).astype(np.float32) if scaled else codebook.reshape(-1)
    if dtype is None:
        dtype = np.float32 if scaled else codebook.dtype
    dtype = np.dtype(dtype)
    view = [1] * len(shape)
    if per_channel_axis is not None:
        view[per_channel_axis] = -1
    if per_channel_axis is not None and not scaled:
        # entry j of channel c sits at c*k + j of the flattened [C, k] codebook
        offset = (np.arange(codebook.shape[0], dtype=np.int32) * codebook.shape[1])
        index = b.op("Add", [index, b.const("offset", offset.reshape(view))], np.int32,
                     list(shape))
    out = b.op("Gather", [b.const("codebook", table), index], table.dtype, list(shape),
               axis=0)
    if scaled:
        out = b.op("Mul", [out, b.const("scale", np.asarray(channel_scale, np.float32)
                                        .reshape(view))], np.float32, list(shape))
    return b.finish(b.cast(out, dtype, shape), indices.size * dtype.itemsize,
                    f"codebook{bits}", _codebook_opset(bits))


def _codebook_opset(bits: int) -> int:
    # BitShift 11; combining several planes adds uint8 with Add, typed for uint8 from 14
    return 11 if len(PLANES[bits]) == 1 else 14


def _check_codebook(indices, codebook, bits, shape, axis) -> None:
    if int(np.prod(shape)) != indices.size:
        raise UsageError(f"{indices.size} indices do not fill shape {shape}")
    k = codebook.shape[-1] if codebook.ndim else 0
    wanted = 1 if axis is None else 2
    if codebook.ndim != wanted or not 0 < k <= 1 << bits:
        raise UsageError(f"codebook shape {codebook.shape} does not fit {bits} bits "
                         f"({'per channel [C, k]' if wanted == 2 else 'per tensor [k]'})")
    if axis is not None and codebook.shape[0] != shape[axis % len(shape)]:
        raise UsageError(f"codebook has {codebook.shape[0]} channels, weight has "
                         f"{shape[axis % len(shape)]} along axis {axis}")
    if indices.size and (indices.min() < 0 or indices.max() >= k):
        raise UsageError(f"indices outside [0, {k})")


def codebook_values(codebook: np.ndarray, bits: int) -> ValuesEncoder:
    """Values encoder storing each value as its index in ``codebook`` (exact match).

    Raises (when called): UsageError if a value is not a codebook entry.
    """
    codebook = np.asarray(codebook)

    def encode(graph, name, values, taken) -> Encoded:
        order = np.argsort(codebook, kind="stable")
        pos = np.clip(np.searchsorted(codebook[order], values), 0, codebook.size - 1)
        if values.size and not np.array_equal(codebook[order][pos], values):
            raise UsageError(f"{name}: values are not all entries of the codebook")
        return encode_codebook(graph, name, order[pos], codebook, bits, taken=taken)

    return encode


@dataclass
class CodebookDecode:
    """The end of an ``encode_codebook`` decode: ``gather`` = Gather(table, index).

    Attributes:
        table: the float codebook constant (float32, or float16 for a float16 weight),
            [k] or a per-channel [C, k] flattened.
        channels: C for a per-channel codebook, else None.
        mul: with a shared codebook scaled per channel, the Mul by ``scale`` [C].
        cast: the Cast ending the decode of a float16 weight (``Cast(to=FLOAT)`` once
            qdq-int8 computed the model in float32, passes/float16.py), else None.
    """

    gather: gs.Node
    table: gs.Constant
    channels: int | None
    mul: gs.Node | None = None
    scale: np.ndarray | None = None
    cast: gs.Node | None = None



def find_codebook(tensor: gs.Tensor) -> CodebookDecode | None:
    """The float32/float16 codebook decode that writes ``tensor`` (read by nothing else),
    if one of ``encode_codebook``'s does (recognised by ``DECODE_TAG`` in the node
    names), with or without the Cast that ends a float16 weight's decode."""
    cast = _decode_node(tensor, "Cast")
    gather = _decode_node(cast.inputs[0], None) if cast is not None else \
        _decode_node(tensor, None)
    mul, scale = None, None
    if gather is not None and gather.op == "Mul" and isinstance(gather.inputs[1], gs.Constant):
        mul, scale = gather, np.asarray(gather.inputs[1].values).reshape(-1)
        gather = _decode_node(mul.inputs[0], "Gather")
    if gather is None or gather.op != "Gather":
        return None
    table, index = gather.inputs
    if not isinstance(table, gs.Constant) or np.asarray(table.values).dtype not in FLOAT_DTYPES \
            or len(table.outputs) != 1:
        return None
    offset = index.inputs[0] if isinstance(index, gs.Variable) and index.inputs else None
    channels = None
    if offset is not None and offset.op == "Add" and isinstance(offset.inputs[1], gs.Constant):
        channels = int(np.asarray(offset.inputs[1].values).size)
    if mul is not None and channels is not None:
        return None
    return CodebookDecode(gather, table, channels, mul, scale, cast)


def _decode_node(tensor: gs.Tensor, op: str | None) -> gs.Node | None:
    """The tagged decode node (of type ``op`` when given) that alone writes ``tensor``,
    which nothing else reads."""
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1 \
            or len(tensor.outputs) != 1:
        return None
    node = tensor.inputs[0]
    if DECODE_TAG not in (node.name or "") or (op is not None and node.op != op):
        return None
    return node


def decoded_values(tensors: list[gs.Variable], opset: int) -> list[np.ndarray]:
    """The values of ``tensors``, each computed only from constants (decode subgraphs),
    in one onnxruntime session over their producers."""
    from .. import validate

    if not tensors:
        return []
    nodes, seen, todo = [], set(), list(tensors)
    while todo:
        t = todo.pop()
        for node in t.inputs:
            if id(node) not in seen:
                seen.add(id(node))
                nodes.append(node)
                todo.extend(i for i in node.inputs if isinstance(i, gs.Variable))
    graph = gs.Graph(nodes=nodes, outputs=list(tensors), opset=opset)
    graph.toposort()
    runner = validate.Runner(gs.export_onnx(graph, do_type_check=False), "disable")
    try:
        values = runner.run_batch({})
    finally:
        runner.close()
    return [values[t.name] for t in tensors]
