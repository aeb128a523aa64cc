"""The weights cluster-weights can share, and one clustering of one weight.

A site is a Conv (2-D), Gemm or MatMul whose weight is a float32 or float16 constant
read by that node alone. Its weight is viewed as W2 [O, P]: one row per output channel,
in the order the layer multiplies it with an input patch (Conv: [O, C/g * kh * kw]; Gemm
with transB=0 and MatMul store [K, O] and are transposed). The clustering runs in
float64 whatever the weight's dtype; a float16 weight gets float16 codebook entries
(its decode stays float16, storage.encode_codebook).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ... import storage
from ..base import not_constant, replace_uses, unique_name
from . import assign, kmeans, refine
from .refine import ConvGeom

ZERO_FRACTION = 0.01  # more exact zeros than this: the layer was pruned, keep them exact
GRANULARITIES = ("tensor", "scaled", "channel")


@dataclass
class Site:
    key: str
    node: gs.Node
    const: gs.Constant
    w2: np.ndarray  # [O, P] float64
    axis: int  # output-channel axis of the stored weight
    transposed: bool
    geom: ConvGeom
    pruned: bool
    bias: gs.Constant | str | None = None  # the bias to correct, "new" to add one, None

    @property
    def size(self) -> int:
        return int(self.w2.size)

    @property
    def dtype(self) -> np.dtype:
        """The stored weight's dtype, which its decode and a corrected bias keep."""
        return np.asarray(self.const.values).dtype


@dataclass
class Clustered:
    """One clustering of a site: indices [O, P], codebook [R, k] float32, SQNRs.

    ``dtype``: the weight's; with float16 the entries of a ``tensor`` or ``channel``
    codebook are float16 values (the decode gathers them as float16), a ``scaled`` one
    stays float32 (its product is taken in float32 and cast).

    ``granularity`` (GRANULARITIES): ``tensor`` (R = 1), ``channel`` (R = O) or
    ``scaled``: one shared codebook (R = 1) times a per-channel ``scale`` [O], i.e.
    w'_o = scale_o * codebook[idx_o], for O + k floats instead of O * k.
    ``zeros``: the site was pruned and index 0 is the exact-zero centroid; a per-tensor
    codebook is then stored sparse when that is smaller (``sparse``): a 1-bit mask plus
    the indices of the nonzeros only, n/8 + nnz*b/8 bytes instead of n*b/8.
    """

    bits: int
    granularity: str
    idx: np.ndarray
    codebook: np.ndarray
    sqnr_db: float
    sqnr_kmeans_db: float
    refined: bool
    scale: np.ndarray | None = None
    zeros: bool = False
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    @property
    def sparse(self) -> bool:
        return self._sparse_nonzeros() is not None

    @property
    def nbytes(self) -> int:
        # the per-channel decode also stores an int32 offset per channel
        channels = 0 if self.granularity == "tensor" else self.idx.shape[0]
        nnz = self._sparse_nonzeros()
        indices = -(-self.idx.size * self.bits // 8) if nnz is None else \
            -(-self.idx.size // 8) - (-nnz * self.bits // 8)
        return indices + self.codebook.size * self.table_dtype.itemsize + 4 * channels

    @property
    def table_dtype(self) -> np.dtype:
        return table_dtype(self.granularity, self.dtype)

    def _sparse_nonzeros(self) -> int | None:
        """The nonzero count when the indices are stored sparse (mask + nonzeros' indices
        take fewer bits than all indices), else None."""
        if not self.zeros or self.granularity != "tensor":
            return None
        n, nnz = self.idx.size, int(np.count_nonzero(self.idx))
        return nnz if nnz * self.bits + n < n * self.bits else None

    def decoded(self) -> np.ndarray:
        """W2' [O, P] float64."""
        return decode(self.idx, self.codebook, self.scale)

    def rows(self) -> np.ndarray:
        """[O, k] or [1, k]: the values each row's indices select."""
        book = self.codebook.astype(np.float64)
        return book if self.scale is None else self.scale[:, None] * book


def find(graph: gs.Graph) -> tuple[list[Site], dict[str, int]]:
    """Sites of ``graph`` and the reasons other Conv/Gemm/MatMul were declined."""
    sites, declined = [], {}
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        site = _site(node)
        if isinstance(site, str):
            declined[site] = declined.get(site, 0) + 1
        else:
            sites.append(site)
    return sites, declined


def densify_sparse(graph: gs.Graph, taken: set[str]) -> dict[str, np.ndarray]:
    """Give every Conv/Gemm/MatMul weight stored sparse by prune-weights a dense
    constant again (so it is clustered with its zeros kept exact); returns {constant
    name: its value}, for the ones that stay unclustered to be stored sparse again."""
    found = [n.inputs[1] for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")
             and len(n.inputs) > 1 and storage.is_sparse(n.inputs[1])]
    dense = {}
    for tensor, value in zip(found, storage.decoded_values(found, graph.opset), strict=True):
        base = tensor.name.split(f"/{storage.DECODE_TAG}")[0]
        const = gs.Constant(unique_name(taken, f"{base}_dense"), value)
        replace_uses(tensor, const)
        dense[const.name] = value
    return dense


def _site(node: gs.Node) -> Site | str:
    if len(node.inputs) < 2:
        return "no weight input"
    const = node.inputs[1]
    if not isinstance(const, gs.Constant):
        return not_constant(const)
    w = np.asarray(const.values)
    if w.dtype not in storage.FLOAT_DTYPES:
        return "weight is not float32 or float16"
    if len(const.outputs) != 1:
        return "weight is shared by several nodes"
    layout = _layout(node, w)
    if isinstance(layout, str):
        return layout
    w2, axis, transposed, geom = layout
    w2 = w2.astype(np.float64)
    pruned = np.count_nonzero(w2 == 0) > ZERO_FRACTION * w2.size
    return Site(node.name or node.outputs[0].name, node, const, w2, axis, transposed, geom,
                bool(pruned), _bias(node, w2.shape[0]))


def _bias(node: gs.Node, channels: int) -> gs.Constant | str | None:
    """Where a bias correction can go: Conv, or Gemm with alpha = beta = 1 and a [O] /
    [1, O] constant C (or none): the existing constant, ``"new"``, or None."""
    if node.op == "MatMul" or (node.op == "Gemm" and (
            node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0)):
        return None
    if len(node.inputs) < 3 or (node.inputs[2].name == "" and not isinstance(
            node.inputs[2], gs.Constant)):
        return "new"
    bias = node.inputs[2]
    ok = isinstance(bias, gs.Constant) and len(bias.outputs) == 1 and \
        np.asarray(bias.values).dtype in storage.FLOAT_DTYPES and \
        np.asarray(bias.values).size == channels and np.asarray(bias.values).ndim <= 2
    return bias if ok else None


def _layout(node: gs.Node, w: np.ndarray):
    """(W2, axis, transposed, geometry) or the reason to decline."""
    if node.op == "Conv":
        if w.ndim != 4:
            return "not a 2-D convolution"
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "Conv uses auto_pad"
        geom = ConvGeom(kernel=tuple(w.shape[2:]),
                        strides=tuple(node.attrs.get("strides", (1, 1))),
                        dilations=tuple(node.attrs.get("dilations", (1, 1))),
                        pads=tuple(node.attrs.get("pads", (0, 0, 0, 0))),
                        groups=int(node.attrs.get("group", 1)))
        return w.reshape(w.shape[0], -1), 0, False, geom
    if w.ndim != 2:
        return "weight is not a matrix"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm uses transA"
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w, 0, False, ConvGeom(dense=True)
    return w.T, 1, True, ConvGeom(dense=True)


def cluster(site: Site, bits: int, granularity: str, quad: refine.Quadratic,
            init: str = "linear", seed: int = 0, data_aware: bool = True) -> Clustered:
    """k-means (k = 2^bits; one centroid fixed at 0 when pruned), then refinement.

    A ``scaled`` codebook clusters the rows divided by their largest |w|, each value
    weighted by that scale squared (so the k-means minimises the weight error itself).
    ``quad`` (refine.Quadratic of the site) scores the result as output SQNR and
    drives the least-squares refinement, kept only when it raises that SQNR.
    """
    w2, scale = site.w2, None
    weights = (w2 != 0).astype(np.float64) if site.pruned else None
    if granularity == "scaled":
        top = np.abs(w2).max(axis=1)
        scale = np.where(top > 0, top, 1.0).astype(np.float32).astype(np.float64)
        w2 = w2 / scale[:, None]
        weights = np.broadcast_to(scale[:, None] ** 2, w2.shape) * (
            1.0 if weights is None else weights)
    rows = w2 if granularity == "channel" else w2.reshape(1, -1)
    weights = None if weights is None else weights.reshape(rows.shape)
    k = 1 << bits
    zero = 0 if site.pruned else None
    cent = kmeans.kmeans_rows(rows, k - 1 if site.pruned else k, weights, init, seed)
    idx = kmeans.assign(rows, cent)
    if site.pruned:  # zeros -> the exact 0 centroid at index 0
        cent = np.concatenate([np.zeros((cent.shape[0], 1)), cent], axis=1)
        idx = np.where(rows == 0, 0, idx + 1)
    idx = idx.reshape(site.w2.shape)
    book = stored(cent, granularity, site.dtype)
    base = quad.direct_sqnr_db(decode(idx, book, scale))
    result = Clustered(bits, granularity, idx, book, base, base, False, scale, site.pruned,
                       site.dtype)
    if data_aware and quad.s is not None and k <= refine.MAX_K:
        _refine(result, quad, zero)
    return result


def _refine(result: Clustered, quad: refine.Quadratic, zero) -> None:
    """Error-feedback indices (assign.py) and least-squares centroids, kept if better."""
    cent, scale = result.rows(), result.scale
    k = cent.shape[1]
    idx = assign.gptq_assign(quad.w, quad.s, cent, zero)
    a, b = quad.normal_equations(idx, k)
    if scale is not None:  # w'_o = scale_o M_o c: the shared c sees scaled equations
        a, b = a * (scale ** 2)[:, None, None], b * scale[:, None]
    better = stored(refine.solve(a, b, result.codebook.astype(np.float64), zero),
                    result.granularity, result.dtype)
    score = quad.direct_sqnr_db(decode(idx, better, scale))
    if score > result.sqnr_db:
        result.idx, result.codebook, result.sqnr_db, result.refined = idx, better, score, True


def table_dtype(granularity: str, dtype) -> np.dtype:
    """The dtype a codebook is stored in: the weight's, float32 for ``scaled`` (its
    product is taken in float32, storage.encode_codebook)."""
    return np.dtype(np.float32) if granularity == "scaled" else np.dtype(dtype)


def stored(codebook: np.ndarray, granularity: str, dtype) -> np.ndarray:
    """``codebook`` [R, k] as float32 holding the values its table will store (float16
    values for a float16 weight's tensor/channel codebook, which the decode gathers as
    they are), so that ``Clustered.decoded`` is what the model computes."""
    return codebook.astype(table_dtype(granularity, dtype)).astype(np.float32)


def decode(idx: np.ndarray, codebook: np.ndarray, scale: np.ndarray | None = None
           ) -> np.ndarray:
    """W2' [O, P] = codebook[idx] (a [O, k] codebook: row o reads codebook row o), times
    ``scale`` [O] per row when given."""
    book = codebook.astype(np.float64)
    out = np.take_along_axis(book, idx, axis=1) if book.shape[0] > 1 else book[0][idx]
    return out if scale is None else out * scale[:, None]


def encode(graph: gs.Graph, name: str, site: Site, clustered: Clustered, taken: set[str]
           ) -> storage.Encoded:
    """``clustered`` stored as ``storage.encode_codebook`` nodes writing tensor ``name``:
    indices in the weight's own shape, codebook [k] or [O, k], scales of ``scaled``;
    when ``clustered.sparse``, ``storage.encode_sparse`` with the nonzeros' indices."""
    idx = (clustered.idx.T if site.transposed else clustered.idx).reshape(
        site.const.values.shape)
    book = clustered.codebook if clustered.per_channel else clustered.codebook[0]
    book = book.astype(clustered.table_dtype)
    if clustered.sparse:
        return storage.encode_sparse(graph, name, book[idx], taken,
                                     storage.codebook_values(book, clustered.bits))
    layout = {} if clustered.granularity == "tensor" else {
        "per_channel_axis": site.axis, "channel_scale": clustered.scale}
    return storage.encode_codebook(graph, name, idx, book, clustered.bits, taken=taken,
                                   dtype=site.dtype, **layout)
