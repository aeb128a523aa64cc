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

float16 weights: the decoded tensor has the weight's dtype, so a float16 model stays
float16 and a decode folds to the same dense float16 constant. Decodes that only move
values (Gather of a codebook, Concat + Gather of sparse values) run in float16, which
onnxruntime's CPU provider has: the codebook or the nonzero values are stored as
float16, half the bytes. Decodes that multiply (int "float", a scaled codebook) or
dequantize run in float32 and end in ``Cast(to=FLOAT16)``: onnxruntime has no float16
Mul on CPU, could not fold them, and would run them on every inference (measured:
SqueezeNet fp16 1.5x slower); DequantizeLinear takes a float16 scale only from opset 19.
An integer encoding's scale holds float16 values (rounded once) stored as float32.

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

from .bits import PLANES, pack_bits, unpack_bits
from .codebook import (
    CodebookDecode,
    codebook_values,
    decoded_values,
    encode_codebook,
    find_codebook,
)
from .core import (
    DECODE_TAG,
    FLOAT_DTYPES,
    INT4_TYPES,
    SPARSE_TAG,
    Encoded,
    ValuesEncoder,
    protect_int4,
    replace_with,
)
from .integer import dequantize, encode_int, encode_int_values, int_values, quantize_symmetric
from .sparse import (
    best_sparse,
    encode_sparse,
    is_sparse,
    mark_sparse_initializer,
    to_sparse_initializers,
)

__all__ = [
    "CodebookDecode",
    "DECODE_TAG",
    "Encoded",
    "FLOAT_DTYPES",
    "INT4_TYPES",
    "PLANES",
    "SPARSE_TAG",
    "ValuesEncoder",
    "best_sparse",
    "codebook_values",
    "decoded_values",
    "dequantize",
    "encode_codebook",
    "encode_int",
    "encode_int_values",
    "encode_sparse",
    "is_sparse",
    "find_codebook",
    "int_values",
    "mark_sparse_initializer",
    "pack_bits",
    "protect_int4",
    "quantize_symmetric",
    "replace_with",
    "to_sparse_initializers",
    "unpack_bits",
]
