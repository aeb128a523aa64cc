"""half-constants: float32 constants stored as float16, cast back at load (lossy, tiny).

What compression leaves in float32 (biases, codebooks, the per-channel scales of int8
and codebook decodes, layers kept float) is stored at half the bytes; a Cast that
onnxruntime folds at load gives the compute its float32 values back, so speed is
unchanged and the model still computes in float32:

Before:  b fp32 [C] -> Conv          scale fp32 [C] -> Mul (decode)
After:   b fp16 [C] -> Cast(FLOAT) -> Conv

The only change is float16 rounding: a relative error of at most 2^-11 per value
(weights at ~66 dB SQNR, far below any int8 or codebook error). On EfficientNet-Lite0
after ``cluster-weights --avg-bits 4`` the float32 leftovers are 6 % of the file.

A tensor whose values are all small or all large for float16 (its subnormal range, or
beyond 65504) is stored times a power of two 2^k that brings its largest to [1, 2),
and decoded by Cast then Mul(2^-k), also folded at load:

After:   w fp16 [O, C] (w * 2^k) -> Cast(FLOAT) -> Mul(2^-k) -> Gemm

Declines (counted, tensor kept float32) when, even so, a value would lose more than
2^-11 of itself without being below 1/1024 of the tensor's largest (a bias near 0
beside others: float16's subnormal range), or is not finite; a QuantizeLinear/DequantizeLinear
reads it (onnxruntime fuses QDQ only around constant scales); the file would not
shrink (the new names and Cast cost more than the halved values save; with
compact-names later in the pipeline names count as the short ones it gives). Tensors
of fewer than MIN_VALUES values, graph inputs and outputs are left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..storage.core import _Builder
from ..storage.integer import cast_mul
from .base import Pass, PassContext, PassResult, register, replace_uses, taken_names

MIN_VALUES = 64  # below this a Cast node eats most of what float16 saves
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
RELATIVE = 2.0 ** -11  # float16 rounding of a normal value
COMPACT_CAST = 40  # a Cast node and tensor header with compacted names, generously
NEGLIGIBLE = 2.0 ** -10  # values below this fraction of the tensor's largest


@register
class HalfConstants(Pass):
    name = "half-constants"
    summary = "float32 constants (biases, codebooks, scales, float weights) stored as " \
              "float16, Cast folded at load (lossy, 2^-11 relative)"
    lossless = False
    # runs after the passes that read or write float32 constants; folding would undo it
    after = ("fold-constants", "fold-bn", "fold-affine", "prune-weights", "prune-channels",
             "svd-split", "cluster-weights", "qdq-int8", "auto-compress")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return halve(graph, compact="compact-names" in ctx.later)


def halve(graph: gs.Graph, only: set[str] | None = None, compact: bool = False) -> PassResult:
    """Store ``graph``'s eligible float32 constants (of those named in ``only``, when
    given) as float16 + Cast (module doc); ``compact``: compact-names runs later."""
    result = PassResult(changed=False)
    readers: dict[str, list[gs.Node]] = {}
    constants: dict[str, gs.Constant] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and np.dtype(t.dtype) == np.float32:
                readers.setdefault(t.name, []).append(node)
                constants[t.name] = t
    fixed = {t.name for t in (*graph.inputs, *graph.outputs)}
    taken = taken_names(graph)
    halved = before = after = 0
    for name, const in constants.items():
        values = np.asarray(const.values)
        if name in fixed or values.size < MIN_VALUES or (only is not None and name not in only):
            continue
        if any(n.op in QDQ_OPS for n in readers[name]):
            result.declined["read by QuantizeLinear/DequantizeLinear"] += 1
            continue
        half, shift = _to_half(values)
        if half is None:
            result.declined["values outside float16's range or precision"] += 1
            continue
        start = len(graph.nodes)
        b = _Builder(graph, name, taken)
        stored = b.const("half", half)
        out = cast_mul(b, stored, np.float32(2.0 ** -shift), values.shape) if shift else \
            b.cast(stored, np.float32, values.shape)
        renamed = len(readers[name]) * (len(out.name) - len(name))  # readers' inputs
        if not _pays(values, half, name, b.file + renamed, compact, len(graph.nodes) - start):
            del graph.nodes[start:]  # the decode just appended; its constants go with it
            result.declined["the Cast and its names cost more than float16 saves"] += 1
            continue
        replace_uses(const, out)
        halved, before, after = halved + 1, before + values.nbytes, after + half.nbytes
    if halved:
        result.changed = True
        result.stats.update(constants_halved=halved, bytes_saved=before - after)
    return result


def _pays(values: np.ndarray, half: np.ndarray, name: str, added: int,
          compact: bool, nodes: int) -> bool:
    """Whether the file shrinks: the float16 constant and its ``nodes`` decode nodes
    (``added`` serialized bytes) against the float32 constant; with ``compact`` the
    names are counted as the short ones compact-names gives (a name per tensor use, ~3
    bytes each)."""
    if compact:
        return half.nbytes + nodes * COMPACT_CAST < values.nbytes
    return added < numpy_helper.from_array(values, name).ByteSize()


def _to_half(values: np.ndarray) -> tuple[np.ndarray | None, int]:
    """(float16 values, k): ``values`` * 2^k as float16 (None when that does not fit,
    ``_fits``). k = 0 when the plain cast fits; else k brings the largest |value| to
    [1, 2), exactly (a power of two), so that a tensor whose values are all small (a
    classifier with |w| < 1/16: float16's subnormal spacing is then above 2^-11 of
    the negligible values) or all large (beyond 65504) keeps float16's relative
    precision; the decode multiplies by 2^-k."""
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    if _fits(values, half):
        return half, 0
    top = float(np.max(np.abs(values))) if values.size else 0.0
    if not np.isfinite(top) or top == 0.0:
        return None, 0
    shift = -int(np.floor(np.log2(top)))
    scaled = (values.astype(np.float64) * 2.0 ** shift).astype(np.float16)
    back = (scaled.astype(np.float64) * 2.0 ** -shift).astype(np.float32)
    # what is negligible is judged against the bulk (99th percentile of |value|), not
    # the largest: one outlier (7e4 beside weights of 0.1) must not make the rest so
    return (scaled, shift) if _fits(values, back, bulk=True) else (None, 0)


def _fits(values: np.ndarray, half: np.ndarray, bulk: bool = False) -> bool:
    """Every value survives float16 within 2^-11 of itself, or of NEGLIGIBLE times the
    tensor's largest (``bulk``: its 99th percentile) (an overflow to inf, or a NaN,
    fails)."""
    x = np.abs(values.astype(np.float64))
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, which fails below
        error = np.abs(half.astype(np.float64) - values.astype(np.float64))
    scale = (np.percentile(x, 99) if bulk else x.max()) if x.size else 0.0
    floor = NEGLIGIBLE * scale
    return bool(np.all(error <= RELATIVE * np.maximum(x, floor)))
