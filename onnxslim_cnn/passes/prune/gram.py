"""Layer views, input Gram matrices on calibration data, and least-squares re-fitting.

A prunable layer is seen as G groups of output rows over K inputs each:
    Conv  W[O, C/G, kh, kw]  ->  Wm[G, O/G, K],  K = (C/G)*kh*kw   (im2col order c, i, j)
    Gemm  B[O, K] (transB=1) or B[K, O]  ->  Wm[1, O, K]
    MatMul B[K, O]  ->  Wm[1, O, K]
and its input as patch rows x[K] (im2col of the Conv input for group g). With the
bias appended as a constant input (x~ = [x, 1], w~ = [w, b]) the output error of a
changed row w~' on the calibration data is
    ||X~ w~' - X~ w~||^2 = (w~' - w~)^T H (w~' - w~),     H = sum over rows of x~ x~^T
so one streamed pass over the calibration data (H per layer and group, K+1 square)
gives both the error of any mask and the re-fit of the kept weights:
    w~'_k = (H_kk + lambda I)^-1 (H_k: w~ + lambda w~_k),  lambda = ridge * mean(diag H_kk)
the least-squares weights over the kept inputs k, with a small ridge pulling them
towards their original values (rank-deficient H: few rows, dead inputs). The bias is
always kept, so it also absorbs the mean of what was removed. MatMul has no bias
slot: its H has no ones row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from numpy.lib.stride_tricks import sliding_window_view

from ... import storage, validate
from ..base import const_value, not_constant
from ..cluster import refine

RIDGE = 1e-3
TOTAL_ROWS = 8192
# A layer whose Gram matrices would take more than this is pruned without them (by
# magnitude, no re-fit): VGG-19's fc6 has K = 25088, H alone 5 GB in float64, and the
# sums, the shrinkage and OBS's factors copy it several times (a 24 GB machine killed
# the process). 512 MB is K ~ 8190 for one group.
MAX_GRAM_BYTES = 2**29


@dataclass
class Layer:
    """A Conv/Gemm/MatMul with a constant weight, seen as Wm[G, O/G, K]."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None

    @property
    def groups(self) -> int:
        return int(self.node.attrs.get("group", 1)) if self.node.op == "Conv" else 1

    @property
    def has_bias_slot(self) -> bool:
        return self.node.op != "MatMul"

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def input_name(self) -> str:
        return self.node.inputs[0].name

    def matrix(self, weight: np.ndarray | None = None) -> np.ndarray:
        w = self.weight if weight is None else weight
        if self.node.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if self.node.op == "Gemm" and self.node.attrs.get("transB", 0):
            return w[None]
        return w.T[None]

    def unmatrix(self, m: np.ndarray) -> np.ndarray:
        if self.node.op == "Conv":
            return m.reshape(self.weight.shape)
        if self.node.op == "Gemm" and self.node.attrs.get("transB", 0):
            return m[0]
        return np.ascontiguousarray(m[0].T)

    def new_values(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight, bias) from new rows w~' [G, O/G, K(+1)], in the dtypes of the
        layer's weight and bias (a bias the layer lacks: the weight's); the bias is
        None without a bias column."""
        k = self.matrix().shape[2]
        weight = self.unmatrix(rows[:, :, :k]).astype(self.weight.dtype)
        if rows.shape[2] == k:
            return weight, None
        dtype = self.weight.dtype if self.bias is None else self.bias.dtype
        return weight, rows[:, :, k].reshape(-1).astype(dtype)

    def bias_vector(self) -> np.ndarray:
        rows = self.matrix().shape[0] * self.matrix().shape[1]
        return np.zeros(rows) if self.bias is None else self.bias.astype(np.float64)


def fits(layer: Layer) -> bool:
    """Whether ``layer``'s Gram matrices stay within MAX_GRAM_BYTES."""
    groups, _, k = layer.matrix().shape
    return groups * (k + 1) ** 2 * 8 <= MAX_GRAM_BYTES


def layer_of(node: gs.Node) -> Layer | str:
    """The Layer view of ``node`` or the reason it has none."""
    weight = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return "no weight input"
    if weight is None:
        return not_constant(node.inputs[1])
    if node.op == "Conv" and (weight.ndim != 4 or node.attrs.get("auto_pad", "NOTSET")
                              not in ("NOTSET", "VALID")):
        return "Conv is not 2-D with explicit pads"
    if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1
                              or node.attrs.get("beta", 1.0) != 1):
        return "Gemm uses transA, alpha or beta"
    if weight.ndim != (4 if node.op == "Conv" else 2) or weight.dtype not in storage.FLOAT_DTYPES:
        return "weight is not a float32/float16 matrix/kernel"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = const_value(node.inputs[2])
        rows = weight.shape[0] if node.op == "Conv" or node.attrs.get("transB", 0) \
            else weight.shape[1]
        if bias is None or bias.size != rows:
            return "bias is not a constant per output channel"
        bias = bias.reshape(-1)
    return Layer(node, weight, bias)


def patches(layer: Layer, x: np.ndarray, pick: np.ndarray | None = None) -> np.ndarray:
    """Input rows [P, G, K] of ``layer`` for the input batch ``x`` (only the rows
    ``pick`` of them, in row-major (n, i, j) order, when given)."""
    if layer.node.op != "Conv":
        r = x.reshape(-1, 1, x.shape[-1])
        return r if pick is None else r[pick]
    a = layer.node.attrs
    kh, kw = layer.weight.shape[2:]
    sh, sw = a.get("strides", [1, 1])
    dh, dw = a.get("dilations", [1, 1])
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    if pick is not None:
        return _picked(layer, x, pick)
    win = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [n, C, Ho, Wo, kh, kw]
    rows = win.transpose(0, 2, 3, 1, 4, 5)
    return rows.reshape(-1, layer.groups, rows.shape[3] // layer.groups * kh * kw)


def _picked(layer: Layer, padded: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The rows ``pick`` of patches() from the padded input, gathered directly."""
    a = layer.node.attrs
    kh, kw = layer.weight.shape[2:]
    (sh, sw), (dh, dw) = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
    ho = (padded.shape[2] - (kh - 1) * dh - 1) // sh + 1
    wo = (padded.shape[3] - (kw - 1) * dw - 1) // sw + 1
    n, i, j = np.unravel_index(pick, (padded.shape[0], ho, wo))
    hi = (i[:, None] * sh + np.arange(kh) * dh)[:, None, :, None]
    wi = (j[:, None] * sw + np.arange(kw) * dw)[:, None, None, :]
    c = np.arange(padded.shape[1])[None, :, None, None]
    win = padded[n[:, None, None, None], c, hi, wi]  # [P, C, kh, kw]
    return win.reshape(pick.size, layer.groups, -1)


def rows(layer: Layer, x: np.ndarray, pick: np.ndarray | None = None) -> np.ndarray:
    """Input rows [P, G, K(+1)]: patches with a trailing 1 where there is a bias slot."""
    r = patches(layer, x, pick)
    if not layer.has_bias_slot:
        return r
    return np.concatenate([r, np.ones((*r.shape[:2], 1), r.dtype)], axis=2)


def gram_add(total: np.ndarray | None, layer: Layer, x: np.ndarray,
             y: np.ndarray | None = None, cap: int = TOTAL_ROWS) -> np.ndarray:
    """``total`` + X~^T Y~ for ``layer`` (Y = X when None): [G, K(+1), K(+1)], float64.

    At most ``cap`` patch rows of the batch are used (a seeded sample, the same rows of
    X and Y): H is a sum over positions, its cost rows * K^2; callers share TOTAL_ROWS
    among their batches. Only the sampled patches are ever built (the full im2col of an
    early EfficientNet layer is hundreds of MB per batch).
    """
    pick = _pick(layer, x, cap)
    rx = rows(layer, x, pick)
    ry = rx if y is None else rows(layer, y, pick)
    part = np.matmul(rx.transpose(1, 2, 0), ry.transpose(1, 0, 2))  # BLAS per group
    if total is None:
        return part.astype(np.float64)
    total += part
    return total


def _pick(layer: Layer, x: np.ndarray, cap: int) -> np.ndarray | None:
    """A seeded sample of ``cap`` patch rows of ``x`` (None: all of them)."""
    count = _positions(layer, x)
    return None if count <= cap else np.sort(
        np.random.default_rng(count).choice(count, cap, replace=False))


def _positions(layer: Layer, x: np.ndarray) -> int:
    """Number of patch rows of ``x`` for ``layer`` (batch * output positions)."""
    if layer.node.op != "Conv":
        return int(np.prod(x.shape[:-1]))
    kh, kw = layer.weight.shape[2:]
    a = layer.node.attrs
    (sh, sw), (dh, dw) = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
    pt, pl, pb, pr = a.get("pads", [0, 0, 0, 0])
    ho = (x.shape[2] + pt + pb - (kh - 1) * dh - 1) // sh + 1
    wo = (x.shape[3] + pl + pr - (kw - 1) * dw - 1) // sw + 1
    return x.shape[0] * ho * wo


def collect_grams(model, layers: list[Layer], batches: list[dict],
                  progress=lambda m: None) -> dict[str, np.ndarray]:
    """H of every layer (by name) over ``batches``, streamed through onnxruntime."""
    return collect(model, layers, [], batches, progress)[0]


def collect(model, layers: list[Layer], wide: list[Layer], batches: list[dict],
            progress=lambda m: None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(H of every layer of ``layers``, mean input patch [G, K] of every layer of
    ``wide``) by name, in one sweep over ``batches``. The means are over the rows H
    would use: what a layer pruned without its H needs for its bias correction."""
    names = sorted({layer.input_name for layer in [*layers, *wide]})
    runner = validate.Runner(validate.with_outputs(model, names, only=True), optimization="basic")
    grams: dict[str, np.ndarray | None] = {layer.name: None for layer in layers}
    sums = {layer.name: 0.0 for layer in wide}
    counts = dict.fromkeys(sums, 0)
    cap = row_cap(batches)
    try:
        for i, batch in enumerate(batches):
            values = runner.run_batch(batch)
            for layer in layers:
                x = values[layer.input_name].astype(np.float32)
                grams[layer.name] = gram_add(grams[layer.name], layer, x, cap=cap)
            for layer in wide:
                x = values[layer.input_name].astype(np.float32)
                r = patches(layer, x, _pick(layer, x, cap))
                sums[layer.name] = sums[layer.name] + r.sum(axis=0, dtype=np.float64)
                counts[layer.name] += r.shape[0]
            progress(f"pruning statistics: batch {i + 1}/{len(batches)}")
    finally:
        runner.close()
    return ({layer.name: shrunk(grams[layer.name]) if layer.has_bias_slot else
             grams[layer.name] for layer in layers},
            {name: total / max(counts[name], 1) for name, total in sums.items()})


def shrunk(h: np.ndarray | None) -> np.ndarray | None:
    """H with its centred part shrunk towards its diagonal by K / (K + n).

    With n rows of K inputs the sample matrix has rank <= n (a 1x1 conv over 1152
    channels on 7x7 maps sees ~3000 correlated rows from 64 images, a dense head one
    row per image): masks and re-fits chosen on it exploit directions the calibration
    images happen not to span and do worse on other images (cluster-weights' refine.
    shrink). ``h`` has the ones row of a bias slot last; its corner is n.
    A cross matrix X~p^T X~o (sequence.py) is shrunk alike, its mean part from the sums
    of both sides, so that with X~p = X~o it stays equal to the shrunk H.
    """
    if h is None:
        return h
    n = np.maximum(h[:, -1, -1], 1.0)
    mean_part = h[:, :-1, -1][:, :, None] * h[:, -1, :-1][:, None, :] / n[:, None, None]
    out = h.copy()
    out[:, :-1, :-1] = refine.shrink(h[:, :-1, :-1] - mean_part, n) + mean_part
    return out


def row_cap(batches: list[dict]) -> int:
    return max(64, TOTAL_ROWS // max(len(batches), 1))


def cross_grams(reference, working, layer: Layer, batches: list[dict]):
    """(Hp, C) for the sequential re-fit of ``layer``: Hp = X~p^T X~p with X~p its input
    in ``working`` (upstream layers already pruned), C = X~p^T X~o with X~o its input in
    ``reference``, row-aligned over ``batches``.

    The re-fit then matches the *original* output from the *pruned* input:
        w~'_k = (Hp_kk + lambda I)^-1 (C_k: w~ + lambda w~_k)
    which also undoes part of the upstream error (SparseGPT/OBC-style sequential order).
    """
    name = layer.input_name
    ref = validate.Runner(validate.with_outputs(reference, [name], only=True), optimization="basic")
    work = validate.Runner(validate.with_outputs(working, [name], only=True), optimization="basic")
    hp = cross = None
    try:
        for batch in batches:
            xo = ref.run_batch(batch)[name].astype(np.float32)
            xp = work.run_batch(batch)[name].astype(np.float32)
            hp = gram_add(hp, layer, xp, cap=row_cap(batches))
            cross = gram_add(cross, layer, xp, xo, cap=row_cap(batches))
    finally:
        ref.close()
        work.close()
    return hp, cross


def augmented(layer: Layer, matrix: np.ndarray | None = None) -> np.ndarray:
    """w~ rows [G, O/G, K(+1)]: the weight matrix with the bias as the last column."""
    m = (layer.matrix() if matrix is None else matrix).astype(np.float64)
    if not layer.has_bias_slot:
        return m
    return np.concatenate([m, layer.bias_vector().reshape(*m.shape[:2], 1)], axis=2)


def mask_error(h: np.ndarray | None, w: np.ndarray, keep: np.ndarray) -> float:
    """sum over rows of d^T H d with d = w~ where the mask drops it (bias never dropped);
    H = I when None (no data: the weights' own energy)."""
    d = np.where(pad_keep(keep, w.shape[2]), 0.0, w)
    return energy(h, d)


def energy(h: np.ndarray | None, w: np.ndarray) -> float:
    """sum over rows of w~^T H w~: the output energy of the layer on the data (H = I
    when None)."""
    if h is None:
        return float(np.sum(w * w))
    return float(np.einsum("gok,gkl,gol->", w, h, w, optimize=True))


def fit_error(hp: np.ndarray, cross: np.ndarray, ho: np.ndarray, w: np.ndarray,
              new: np.ndarray) -> float:
    """||X~p new - X~o w||^2 summed over rows, from the Gram matrices of cross_grams."""
    quad = np.einsum("gok,gkl,gol->", new, hp, new, optimize=True)
    mixed = np.einsum("gok,gkl,gol->", new, cross, w, optimize=True)
    return float(quad - 2 * mixed + energy(ho, w))


def refit(h: np.ndarray, w: np.ndarray, keep: np.ndarray, ridge: float = RIDGE,
          cross: np.ndarray | None = None) -> np.ndarray:
    """Least-squares w~' (zero outside ``keep``) for rows w~ [G, O/G, K(+1)].

    Args:
        h: [G, K(+1), K(+1)] Gram matrices (Hp for the sequential re-fit).
        keep: bool [G, O/G, K]: inputs each row keeps (the bias column is always kept).
        cross: C of ``cross_grams`` (None: the input is unchanged, C = H).
    """
    cross = h if cross is None else cross
    keep = pad_keep(keep, w.shape[2])
    out = np.zeros_like(w)
    for g in range(w.shape[0]):
        patterns: dict[bytes, list[int]] = {}
        for o in range(w.shape[1]):
            patterns.setdefault(np.packbits(keep[g, o]).tobytes(), []).append(o)
        for members in patterns.values():
            k = np.flatnonzero(keep[g, members[0]])
            hkk = h[g][np.ix_(k, k)]
            lam = ridge * max(float(np.mean(np.diag(hkk))), 1e-12)
            rhs = cross[g][k] @ w[g, members].T + lam * w[g][np.ix_(members, k)].T
            out[g][np.ix_(members, k)] = np.linalg.solve(hkk + lam * np.eye(k.size), rhs).T
    return out


def pad_keep(keep: np.ndarray, width: int) -> np.ndarray:
    if keep.shape[2] == width:
        return keep
    return np.concatenate([keep, np.ones((*keep.shape[:2], 1), bool)], axis=2)
