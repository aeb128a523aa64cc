"""Compact weight storage: bits (see the package docstring for formats and figures)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UsageError
from .core import _Builder, _check_bits

# bit planes of a b-bit value, most significant first: widths dividing 8 never straddle
# a byte, so each plane unpacks with one BitShift and one Mod
PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1), 8: (8,)}


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
