"""Compact weight storage: integer (see the package docstring for formats and figures)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import UsageError
from .core import Encoded, ValuesEncoder, _Builder, _require_opset


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
        dtype: dtype of the decoded tensor (float32 or float16). A float16 tensor is
            decoded in float32 and cast at the end, so onnxruntime can fold the decode;
            the scale holds float16 values (rounded once) stored as float32.

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
        out = _dequantize(b, stored, store, scale, q.shape, axis)
    else:
        out = cast_mul(b, stored, scale, q.shape, axis)
    return b.finish(b.cast(out, dtype, q.shape), q.size * scale.itemsize,
                    f"int{bits}-{decode}", opset)


def cast_mul(b: _Builder, stored, scale, shape, axis: int | None = None) -> gs.Variable:
    """q -> Cast -> Mul(scale) in float32 (``scale`` per ``axis``, or one value when
    ``axis`` is None; half-constants' power-of-two decode too); a float16 weight's caller
    casts at the end:
    onnxruntime has no float16 Mul on CPU, so it could not fold a float16 decode and
    would run it on every inference (measured: SqueezeNet fp16 1.5x slower)."""
    if axis is not None:
        view = [1] * len(shape)
        view[axis] = -1
        scale = scale.reshape(view)
    wide = scale.astype(np.float32)
    cast = b.op("Cast", [stored], np.float32, list(shape), to=onnx.TensorProto.FLOAT)
    return b.op("Mul", [cast, b.const("scale", wide)], np.float32, list(shape))


def _dequantize(b: _Builder, stored, store, scale, shape, axis) -> gs.Variable:
    """DequantizeLinear(stored, scale, 0) in float32: a float16 scale needs opset 19, and
    the caller casts a float16 weight at the end as for ``_cast_mul``."""
    zero = b.const("zero_point", np.zeros(scale.shape, store))
    attrs = {} if axis is None else {"axis": axis}
    return b.op("DequantizeLinear", [stored, b.const("scale", scale.astype(np.float32)), zero],
                np.float32, list(shape), **attrs)


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

    Args:
        dtype: dtype of the decoded tensor; float16 dequantizes in float32 and casts.

    Returns:
        Encoded of the float tensor; min_opset max(encoded's, 13 per channel / 10).
    """
    tensor = encoded.tensor
    scale = np.asarray(scale, dtype)
    opset = max(encoded.min_opset, 10 if axis is None else 13)
    _require_opset(graph, opset, "DequantizeLinear")
    b = _Builder(graph, encoded.source, taken)
    out = b.cast(_dequantize(b, tensor, tensor.dtype, scale, tensor.shape, axis), dtype,
                 tensor.shape)
    dense = encoded.dense_bytes // np.dtype(tensor.dtype).itemsize * scale.itemsize
    return Encoded(out, encoded.stored_bytes + b.stored, dense, encoded.encoding + "+dq",
                   opset, encoded.source, encoded.file_bytes + b.file)


def int_values(bits: int, decode: str = "float") -> ValuesEncoder:
    """Values encoder quantizing the nonzero values per tensor to int8/int4 (lossy)."""

    def encode(graph, name, values, taken) -> Encoded:
        q, scale = quantize_symmetric(values, bits, axis=None)
        return encode_int_values(graph, name, q, scale, bits, None, taken, decode,
                                 dtype=values.dtype)

    return encode
