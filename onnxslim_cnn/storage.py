"""Compact weight storage: weights encoded as standard ONNX ops runtimes fold at load.

Why: pruning, clustering and quantization must shrink the *file* without slowing
inference. A weight is stored compactly and rebuilt by a small decode subgraph whose
inputs are all initializers; onnxruntime's constant folding (level BASIC and up) runs it
once at session creation, so the optimized graph holds the same dense weight and
inference runs at the same speed (checked by tests/test_storage.py on the optimized
model onnxruntime writes). Every decode node carries ``DECODE_TAG`` in its name so the
fold-constants pass never folds it back into a dense weight.

Bytes below are initializer payload (n elements, b bits, k codebook entries, C channels,
nnz nonzeros). Each encoding adds < 100 B of small constants plus node and tensor names
(~1-2 kB); ``Encoded.file_bytes`` counts all of it, so callers can skip tiny tensors.
Start-up pays for the folding: roughly one copy per folded node output (~4 ms/MB,
measured), hence uint8 for every large intermediate. Measured once (light_resnet50,
seeded weights, 1 thread, medians): 4-bit codebooks on all Conv weights took the file
from 102 MB to 20 MB (13 MB with the Gemm too), session start-up from 0.46 s to 0.82 s;
inference latency unchanged.

Bit planes (``pack_bits``): a b-bit value is split into planes of width 4, 2 or 1
(``PLANES``: 3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1, most significant first). A plane of
width w holds 8/w values per byte; slot r of byte j (bits r*w .. r*w+w-1) holds value
r*rows + j, rows = ceil(n*w/8). Size sum(ceil(n*w/8)) <= n*b/8 + 3 bytes, i.e.
bit-exact, where the best word packing (floor(W/b) values per uint8..uint64 word)
wastes 1.6% (b=3, 7) to 6.25% (b=5, 6), and per-byte packing 12.5-37.5%. Widths that
divide 8 never straddle a byte, so unpacking needs no gathers:

    plane[1, rows] u8 -> BitShift(RIGHT by [[0],[w],[2w]..]) -> Mod(2^w) -> [8/w, rows]
    several planes: each -> Reshape[-1] -> Slice[:n]; acc = Add(BitShift(acc, LEFT w), plane)
    -> Reshape(shape)                                  (b = 8: the stored uint8 tensor)

Codebook (``encode_codebook``, weight sharing), min opset 11 (BitShift), 14 for
b = 3, 5, 6, 7 (Add on uint8):
    Before: W[shape] fp32 -> Conv
    After:  unpack(indices) -> Cast(int32) -> Gather(codebook[k]) -> Conv
            unpack(indices) -> Cast(int32) -> Add(c*k along axis) -> Gather(codebook[C*k])
    bytes = n*b/8 + k*itemsize (per channel: C*k*itemsize + 4*C)
    An int8 codebook decodes to int8; ``dequantize`` appends DequantizeLinear, and
    DQ -> Conv between activation Q/DQ then fuses into QLinearConv (tested).

Integer (``encode_int`` / ``encode_int_values``), symmetric:
    q = clip(round(w / s), -qmax, qmax), s = max|w| / qmax per channel (1 if all zero),
    qmax = 2^(b-1) - 1.
    Before: W fp32 -> Conv
    After ("dq"):    q int8|int4 -> DequantizeLinear(s, 0, axis) -> Conv
    After ("float"): q int8|int4 -> Cast(float) -> Mul(s shaped [C,1,1,1]) -> Conv
    bytes = n*b/8 + 4*C (+ C*b/8 zero points for "dq")
    min opset: int4 21; int8 "dq" 13 per channel, 10 per tensor; int8 "float" 7.
    onnxruntime never constant-folds DequantizeLinear (kept for QDQ fusion): between
    activation Q/DQ it becomes QLinearConv, but a lone DQ -> Conv stays in the optimized
    graph, runs on every inference and blocks Conv+BN/Relu fusion and weight prepacking
    (measured on ResNet-50: ~25% slower). Float-activation models want "float".

Sparse (``encode_sparse``), min opset 11 (CumSum):
    Before: W -> Conv
    After:  unpack(mask, 1 bit) -> Cast(int32) -> CumSum -> Mul(mask) -> Reshape(shape)
            -> Gather(Concat([0], values)) -> Conv
    bytes = n/8 + nnz*itemsize (or the values encoder's bytes). Zeros stay exact: their
    index is 0 and the table starts with 0. ``values_encoder`` encodes the nonzero values
    (``codebook_values``, ``int_values``); for per-channel int8 QDQ encode the sparse q
    tensor and ``dequantize`` the result.
    ONNX ``sparse_initializer`` (onnxruntime reads INT64 flat indices only):
    nnz*(itemsize+8) bytes, smaller than the bitmask only below ~1.6% density;
    ``best_sparse`` measures both. In the graph such a weight is only *marked*
    (``SPARSE_TAG`` in its name); ``to_sparse_initializers`` converts it on the final
    ModelProto, because onnx-graphsurgeon cannot round-trip sparse initializers (its
    loader reads typed fields, not raw data, and densifies to float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .errors import PreconditionError, UsageError
from .passes.base import replace_uses, taken_names, unique_name

DECODE_TAG = "onnxslim_decode"
# bit planes of a b-bit value, most significant first: widths dividing 8 never straddle
# a byte, so each plane unpacks with one BitShift and one Mod
PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}
SPARSE_TAG = "onnxslim_sparse"
INT4_TYPES = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


@dataclass
class Encoded:
    """One encoded weight.

    Attributes:
        tensor: the decoded tensor, to be read where the dense constant was read.
        stored_bytes: initializer payload bytes of the encoding (shape constants included).
        file_bytes: serialized bytes the encoding adds to the file: initializers with
            their names plus the decode nodes (compare with ``dense_bytes`` to decide
            whether encoding a small tensor pays).
        dense_bytes: bytes of the decoded dense tensor (float32 after ``dequantize``).
        encoding: e.g. ``"int8-dq"``, ``"codebook4"``, ``"sparse+codebook4"``.
        min_opset: smallest default-domain opset the decode ops need.
        source: name of the weight it encodes.
    """

    tensor: gs.Tensor
    stored_bytes: int
    dense_bytes: int
    encoding: str
    min_opset: int
    source: str
    file_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.stored_bytes / max(self.dense_bytes, 1)


ValuesEncoder = Callable[[gs.Graph, str, np.ndarray, set], Encoded]


# -- numpy reference ------------------------------------------------------------------

def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers < 2^bits as bit planes (module docstring), uint8.

    Returns:
        The planes one after the other: sum over planes of ceil(n / (8 / width)) bytes,
        i.e. n*bits/8 plus at most one byte per plane.
    """
    return np.concatenate([packed for _, _, packed in _planes(values, bits)])


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``count`` values, as int64."""
    _check_bits(bits)
    packed = np.asarray(packed, np.uint8)
    values, start = np.zeros(count, np.int64), 0
    for width, shift in _plane_layout(bits):
        per = 8 // width
        rows = -(-count // per)
        plane = packed[start:start + rows].astype(np.int64)
        slots = (plane[None, :] >> (np.arange(per)[:, None] * width)) & ((1 << width) - 1)
        values |= slots.reshape(-1)[:count] << shift
        start += rows
    return values


def _plane_layout(bits: int) -> list[tuple[int, int]]:
    """(width, shift) of each plane, most significant first."""
    layout, shift = [], bits
    for width in PLANES[bits]:
        shift -= width
        layout.append((width, shift))
    return layout


def _planes(values: np.ndarray, bits: int) -> list[tuple[int, int, np.ndarray]]:
    """(width, shift, packed) of each bit plane of ``values``."""
    _check_bits(bits)
    flat = np.asarray(values).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise UsageError(f"values outside [0, {1 << bits}) cannot be packed in {bits} bits")
    flat = flat.astype(np.uint8)
    planes = []
    for width, shift in _plane_layout(bits):
        per = 8 // width
        rows = -(-flat.size // per)
        slots = np.zeros(per * rows, np.uint8)
        slots[:flat.size] = (flat >> shift) & ((1 << width) - 1)
        slots = slots.reshape(per, rows)  # slot r of byte j holds element r*rows + j
        packed = np.zeros(rows, np.uint8)
        for r in range(per):
            packed |= slots[r] << np.uint8(r * width)
        planes.append((width, shift, packed))
    return planes


def quantize_symmetric(weight: np.ndarray, bits: int, axis: int | None = 0):
    """(q int8, scale float32) with q = clip(round(w / s), -qmax, qmax).

    ``scale`` has shape [C] (C = weight.shape[axis]) or [] for ``axis=None``.
    """
    weight = np.asarray(weight, np.float32)
    qmax = 2 ** (bits - 1) - 1
    axes = tuple(i for i in range(weight.ndim) if axis is None or i != axis % weight.ndim)
    amax = np.max(np.abs(weight), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -qmax, qmax).astype(np.int8)
    return q, scale.reshape(-1) if axis is not None else scale.reshape(())


# -- graph building -------------------------------------------------------------------

class _Builder:
    """Appends one weight's decode subgraph: tagged, uniquely named nodes and constants."""

    def __init__(self, graph: gs.Graph, name: str, taken: set[str] | None):
        self.graph, self.name = graph, name
        self.base = f"{name}/{DECODE_TAG}"
        self.taken = taken if taken is not None else taken_names(graph)
        self.stored = self.file = 0

    def const(self, suffix: str, values) -> gs.Constant:
        values = np.asarray(values)
        name = unique_name(self.taken, f"{self.base}/{suffix}")
        if _is_int4(values.dtype):
            # graphsurgeon exports int4 only from a packed TensorProto (see protect_int4)
            proto = numpy_helper.from_array(values, name)
            self.stored += len(proto.raw_data)
            self.file += proto.ByteSize()
            return gs.Constant(name, gs.ir.tensor.LazyValues(proto))
        self.stored += values.nbytes
        self.file += numpy_helper.from_array(values, name).ByteSize()
        return gs.Constant(name, values)

    def op(self, op: str, inputs: list, dtype, shape=None, **attrs) -> gs.Variable:
        node_name = unique_name(self.taken, f"{self.base}/{op}")
        out = gs.Variable(unique_name(self.taken, f"{node_name}_out"), dtype=dtype, shape=shape)
        self.graph.nodes.append(gs.Node(op, node_name, attrs, inputs, [out]))
        self.file += onnx.helper.make_node(op, [t.name for t in inputs], [out.name], node_name,
                                           **attrs).ByteSize()
        return out

    def ints(self, suffix: str, values) -> gs.Constant:
        return self.const(suffix, np.asarray(values, np.int64))

    def finish(self, tensor, dense_bytes: int, encoding: str, min_opset: int) -> Encoded:
        return Encoded(tensor, int(self.stored), int(dense_bytes), encoding, min_opset,
                       self.name, int(self.file))


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise UsageError(f"bits must be an integer in 1..8, got {bits!r}")


def _is_int4(dtype) -> bool:
    try:
        return np.dtype(dtype) in INT4_TYPES
    except TypeError:  # graphsurgeon reports types numpy lacks as onnx enum values
        return False


def _require_opset(graph: gs.Graph, needed: int, what: str) -> None:
    if (graph.opset or 0) < needed:
        raise PreconditionError(f"{what} needs opset {needed}; the model has opset "
                                f"{graph.opset} (upgrade it first)")


def _unpack(b: _Builder, values: np.ndarray, bits: int, shape) -> gs.Variable:
    """Stores ``values`` (ints in [0, 2^bits)) as bit planes; returns their uint8 decode."""
    if bits == 8:
        return b.const("packed", values.astype(np.uint8).reshape(shape))
    planes, acc = _planes(values, bits), None
    for width, _, packed in planes:
        field = _unpack_plane(b, width, packed, values.size, flat=len(planes) > 1)
        if acc is not None:  # Horner: acc = (acc << width) + field
            acc = b.op("BitShift", [acc, b.const("shift", np.uint8(width))], np.uint8,
                       [values.size], direction="LEFT")
            field = b.op("Add", [acc, field], np.uint8, [values.size])
        acc = field
    return b.op("Reshape", [acc, b.ints("shape", shape)], np.uint8, list(shape))


def _unpack_plane(b: _Builder, width: int, packed, count: int, flat: bool) -> gs.Variable:
    """One plane as uint8 [8/width, rows], or [count] when padded or ``flat``."""
    per, rows = 8 // width, packed.size
    stored = b.const("packed", packed.reshape(1, rows))
    slots = b.const("slots", (np.arange(per, dtype=np.uint8) * width).reshape(per, 1))
    shifted = b.op("BitShift", [stored, slots], np.uint8, [per, rows], direction="RIGHT")
    field = b.op("Mod", [shifted, b.const("modulus", np.uint8(1 << width))], np.uint8,
                 [per, rows])
    if per * rows == count and not flat:
        return field
    field = b.op("Reshape", [field, b.ints("flat", [-1])], np.uint8, [per * rows])
    if per * rows == count:
        return field
    return b.op("Slice", [field, b.ints("start", [0]), b.ints("end", [count])], np.uint8,
                [count])


# -- codebook -------------------------------------------------------------------------

def encode_codebook(graph: gs.Graph, name: str, indices: np.ndarray, codebook: np.ndarray,
                    bits: int, shape=None, taken: set[str] | None = None,
                    per_channel_axis: int | None = None) -> Encoded:
    """Store ``codebook[indices]`` as ``bits``-bit packed indices plus the codebook.

    Args:
        indices: integers in [0, k), k <= 2^bits; any shape with ``prod(shape)`` items.
        codebook: [k] (per tensor) or [C, k] with C = shape[per_channel_axis]; float or
            int8 (decode with ``dequantize`` afterwards).
        shape: decoded shape (default ``indices.shape``).

    Returns:
        Encoded with min_opset 11 (BitShift; 14 for 3, 5, 6, 7 bits: uint8 Add).

    Raises:
        UsageError: bits outside 1..8, an index out of range, a codebook of wrong shape.
        PreconditionError: the graph opset is below min_opset.
    """
    indices, codebook = np.asarray(indices), np.asarray(codebook)
    shape = tuple(int(d) for d in (indices.shape if shape is None else shape))
    _check_bits(bits)
    _check_codebook(indices, codebook, bits, shape, per_channel_axis)
    _require_opset(graph, _codebook_opset(bits), f"{bits}-bit codebook storage")
    b = _Builder(graph, name, taken)
    index = b.op("Cast", [_unpack(b, indices, bits, shape)], np.int32, list(shape),
                 to=onnx.TensorProto.INT32)
    table = codebook.reshape(-1)
    if per_channel_axis is not None:
        # entry j of channel c sits at c*k + j of the flattened [C, k] codebook
        view = [1] * len(shape)
        view[per_channel_axis] = -1
        offset = (np.arange(codebook.shape[0], dtype=np.int32) * codebook.shape[1])
        index = b.op("Add", [index, b.const("offset", offset.reshape(view))], np.int32,
                     list(shape))
    out = b.op("Gather", [b.const("codebook", table), index], codebook.dtype, list(shape),
               axis=0)
    return b.finish(out, indices.size * codebook.itemsize, f"codebook{bits}",
                    _codebook_opset(bits))


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


# -- integers -------------------------------------------------------------------------

def encode_int(graph: gs.Graph, const: gs.Constant, bits: int, axis: int | None = 0,
               taken: set[str] | None = None, decode: str = "dq") -> Encoded:
    """Symmetric int8/int4 quantization of ``const`` (see ``quantize_symmetric``).

    Returns/Raises: as ``encode_int_values``.
    """
    q, scale = quantize_symmetric(const.values, bits, axis)
    return encode_int_values(graph, const.name, q, scale, bits, axis, taken, decode,
                             dtype=np.asarray(const.values).dtype)


def encode_int_values(graph: gs.Graph, name: str, q: np.ndarray, scale: np.ndarray,
                      bits: int, axis: int | None = 0, taken: set[str] | None = None,
                      decode: str = "dq", dtype=np.float32) -> Encoded:
    """Store precomputed integers ``q`` (decoded as q * scale) as INT8 or INT4.

    Args:
        q: integers in [-2^(bits-1), 2^(bits-1)).
        scale: [C] along ``axis`` or a scalar for ``axis=None``.
        decode: ``"dq"`` (DequantizeLinear; kept by onnxruntime, fuses with activation
            Q/DQ) or ``"float"`` (Cast + Mul; folded by onnxruntime).
        dtype: dtype of the decoded tensor (float32 or float16).

    Returns:
        Encoded; min_opset 21 for int4, for int8 13 ("dq" per channel), 10 ("dq" per
        tensor) or 7 ("float").

    Raises:
        UsageError: bits not 4 or 8, values out of range, a scale of the wrong size.
        PreconditionError: the graph opset is below min_opset (the caller upgrades).
    """
    q = np.asarray(q)
    scale = np.asarray(scale, dtype)
    opset = _check_int(q, scale, bits, axis, decode)
    _require_opset(graph, opset, f"int{bits} storage ({decode})")
    b = _Builder(graph, name, taken)
    store = ml_dtypes.int4 if bits == 4 else np.int8
    stored = b.const("q", q.astype(store))
    if decode == "dq":
        zero = b.const("zero_point", np.zeros(scale.shape, store))
        attrs = {} if axis is None else {"axis": axis}
        out = b.op("DequantizeLinear", [stored, b.const("scale", scale), zero], scale.dtype,
                   list(q.shape), **attrs)
    else:
        out = _cast_mul(b, stored, scale, q.shape, axis)
    return b.finish(out, q.size * scale.itemsize, f"int{bits}-{decode}", opset)


def _cast_mul(b: _Builder, stored, scale, shape, axis) -> gs.Variable:
    if axis is not None:
        view = [1] * len(shape)
        view[axis] = -1
        scale = scale.reshape(view)
    cast = b.op("Cast", [stored], scale.dtype, list(shape),
                to=onnx.helper.np_dtype_to_tensor_dtype(scale.dtype))
    return b.op("Mul", [cast, b.const("scale", scale)], scale.dtype, list(shape))


def _check_int(q, scale, bits, axis, decode) -> int:
    if bits not in (4, 8) or decode not in ("dq", "float"):
        raise UsageError(f"integer storage supports bits 4 or 8 and decode 'dq' or 'float', "
                         f"got bits={bits}, decode={decode!r}")
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.size and (q.min() < low or q.max() > high):
        raise UsageError(f"int{bits} values must lie in [{low}, {high}]")
    channels = 1 if axis is None else q.shape[axis]
    if scale.size != channels or (axis is None and scale.ndim):
        raise UsageError(f"scale of shape {scale.shape} does not fit axis {axis} of {q.shape}")
    if bits == 4:
        return 21
    if decode == "float":
        return 7
    return 10 if axis is None else 13


def dequantize(graph: gs.Graph, encoded: Encoded, scale: np.ndarray, axis: int | None = 0,
               taken: set[str] | None = None, dtype=np.float32) -> Encoded:
    """Append DequantizeLinear(scale, zero point 0, axis) to an int8/uint8 decode.

    Used for an int8 codebook or a sparse int8 tensor, so the decoded integers feed a
    DQ -> Conv that onnxruntime fuses with activation Q/DQ into QLinearConv.

    Returns:
        Encoded of the float tensor; min_opset max(encoded's, 13 per channel / 10).
    """
    tensor = encoded.tensor
    scale = np.asarray(scale, dtype)
    opset = max(encoded.min_opset, 10 if axis is None else 13)
    _require_opset(graph, opset, "DequantizeLinear")
    b = _Builder(graph, encoded.source, taken)
    zero = b.const("zero_point", np.zeros(scale.shape, tensor.dtype))
    attrs = {} if axis is None else {"axis": axis}
    out = b.op("DequantizeLinear", [tensor, b.const("scale", scale), zero], scale.dtype,
               tensor.shape, **attrs)
    dense = encoded.dense_bytes // np.dtype(tensor.dtype).itemsize * scale.itemsize
    return Encoded(out, encoded.stored_bytes + b.stored, dense, encoded.encoding + "+dq",
                   opset, encoded.source, encoded.file_bytes + b.file)


# -- sparse ---------------------------------------------------------------------------

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


def _sparse_values(b: _Builder, nonzero, encoder):
    if encoder is None:
        return b.const("values", nonzero), 1, "sparse"
    encoded = encoder(b.graph, f"{b.name}_values", nonzero, b.taken)
    b.stored += encoded.stored_bytes
    b.file += encoded.file_bytes
    return encoded.tensor, encoded.min_opset, f"sparse+{encoded.encoding}"


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


def int_values(bits: int, decode: str = "float") -> ValuesEncoder:
    """Values encoder quantizing the nonzero values per tensor to int8/int4 (lossy)."""

    def encode(graph, name, values, taken) -> Encoded:
        q, scale = quantize_symmetric(values, bits, axis=None)
        return encode_int_values(graph, name, q, scale, bits, None, taken, decode,
                                 dtype=values.dtype)

    return encode


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


# -- wiring ---------------------------------------------------------------------------

def replace_with(graph: gs.Graph, const: gs.Constant, encoded: Encoded) -> int:
    """Make every consumer of ``const`` read ``encoded.tensor``; returns how many."""
    users = len(const.outputs)
    replace_uses(const, encoded.tensor)
    return users


def protect_int4(graph: gs.Graph) -> int:
    """Re-wrap INT4/UINT4 constants as packed TensorProtos so graphsurgeon can export them.

    onnx-graphsurgeon 0.6 exports a constant whose values were read as a numpy array
    with one byte per int4 element, which onnx rejects; call before ``gs.export_onnx``.
    Returns the number of constants re-wrapped.
    """
    count = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and _is_int4(tensor.dtype):
            proto = numpy_helper.from_array(np.asarray(tensor.values), tensor.name)
            tensor.values = gs.ir.tensor.LazyValues(proto)
            count += 1
    return count
