"""Data-aware centroid refinement: least squares on calibration activations, no training.

A layer computes, per output channel o, y_o = w_o . x (x: an im2col patch of the input,
P = C/groups * kh * kw values; for Gemm/MatMul the input row). Clustering replaces w_o
by w'_o = M_o c (M_o [P, k] the 0/1 mask of each weight's cluster, c the codebook).
The output error over calibration patches X is

    E = sum_o ||(w'_o - w_o)^T X||^2 = sum_o (M_o c - w_o)^T G (M_o c - w_o),
    G = X X^T (uncentred second moment of the patches, one per conv group).

E is quadratic in the k centroid values, so its minimiser solves the k x k system

    (sum_o M_o^T G M_o + lam I) c = sum_o M_o^T G w_o + lam c_kmeans

(sum over the channels sharing the codebook: all of them per tensor, one per channel).
``lam`` (1e-6 of the mean diagonal) only pins clusters the data cannot see (empty, or
weights that meet all-zero inputs) to their k-means value. A centroid fixed at 0 (pruned
zeros) is left out of the unknowns. Indices stay as k-means chose them.

When the layer has (or can get) a bias, the mean output error per channel,
e_o^T mu (mu the mean patch), is removed exactly by b'_o = b_o - e_o^T mu, and what
remains is e_o^T S e_o with S = G - mu mu^T, the covariance: then S replaces G above.

The same matrix gives each layer's output SQNR without running the model:
    SQNR = 10 log10( sum_o w_o^T G w_o / sum_o e_o^T S e_o )   (dB, S = G or the covariance)

G is streamed: per batch a seeded random subset of output positions is gathered
straight from the padded input (no full im2col).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ... import validate

SAMPLES = 8192  # patches per layer over the whole calibration set
PATCH_VALUES = 1 << 22  # values gathered per layer and batch (memory and time bound)
MAX_PATCH = 2304  # larger P: G > 40 MB and refinement too slow, so it is skipped
CAP_DB = 200.0
CHUNK_VALUES = 1 << 21  # one-hot values per GEMM chunk of _segment_grams (16 MB)
MAX_K = 64  # 7-8 bit codebooks are already close, and k^3 solves per channel add up


@dataclass
class ConvGeom:
    """How a layer reads its input: a 2-D Conv's patch geometry, or a dense layer."""

    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1
    dense: bool = False


@dataclass
class Moments:
    """Second moment G [groups, P, P] and mean patch [groups, P] of a layer's input,
    from ``count`` patches (0: unknown)."""

    gram: np.ndarray
    mean: np.ndarray
    count: int = 0
    _cov: np.ndarray | None = None

    def cov(self) -> np.ndarray:
        """G - mu mu^T: what is left of G once the bias absorbs the mean error."""
        if self._cov is None:
            self._cov = self.gram - self.mean[:, :, None] * self.mean[:, None, :]
        return self._cov

    def fit_matrix(self, centred: bool) -> np.ndarray:
        """S to fit and score against: G (or the covariance), shrunk towards its diagonal.

        With n patches of P values the sample matrix has rank <= n; a dense head after a
        global pool sees one row per image (100 images, P = 1280), so error feedback and
        least squares would hide the error in directions the calibration images happen
        not to span, and score it as 20 dB better than it is on other images. Shrinking
        by alpha = P / (P + n) towards diag(S) (a Ledoit-Wolf-style weight: ~3 % for a
        3x3 conv's 8192 patches, > 90 % for that head) keeps the fit to what the data
        supports; the diagonal still weighs each input by its power.
        """
        s = self.cov() if centred else self.gram
        return shrink(s, self.count) if self.count else s


def shrink(s: np.ndarray, count) -> np.ndarray:
    """[g, P, P] second moments from ``count`` (scalar or [g]) rows each, shrunk towards
    their diagonals by alpha = P / (P + count) (Moments.fit_matrix)."""
    size = s.shape[1]
    alpha = size / (size + np.broadcast_to(np.asarray(count, np.float64), s.shape[:1]))
    out = (1 - alpha)[:, None, None] * s
    idx = np.arange(size)
    out[:, idx, idx] += alpha[:, None] * np.einsum("gii->gi", s)
    return out


def collect_grams(model: onnx.ModelProto, layers: dict[str, tuple[str, ConvGeom]],
                  batches: list[dict], seed: int = 0,
                  progress=lambda m: None) -> dict[str, Moments]:
    """Input moments per layer over ``SAMPLES`` seeded random patches.

    Args:
        layers: layer key -> (input tensor name, geometry).
    """
    names = sorted({name for name, _ in layers.values()})
    runner = validate.Runner(validate.with_outputs(model, names, only=True), optimization="basic")
    rng = np.random.default_rng(seed)
    grams: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    counts = dict.fromkeys(layers, 0)
    per_batch = max(1, -(-SAMPLES // max(len(batches), 1)))
    try:
        for i, batch in enumerate(batches):
            values = runner.run_batch(batch)
            for key, (name, geom) in layers.items():
                patches = _patches(values[name], geom, per_batch, rng)
                g = _gram(patches)
                grams[key] = g if key not in grams else grams[key] + g
                total = patches.sum(axis=0, dtype=np.float64)
                sums[key] = total if key not in sums else sums[key] + total
                counts[key] += patches.shape[0]
            progress(f"cluster-weights: activations of batch {i + 1}/{len(batches)}")
    finally:
        runner.close()
    return {k: Moments(g / max(counts[k], 1), sums[k] / max(counts[k], 1), counts[k])
            for k, g in grams.items()}


def _gram(patches: np.ndarray) -> np.ndarray:
    """[g, P, P] sum over patches of x x^T, one GEMM per group."""
    if patches.shape[1] == 1:
        flat = patches[:, 0, :]
        return (flat.T @ flat)[None].astype(np.float64)
    by_group = np.ascontiguousarray(patches.transpose(1, 2, 0))  # [g, P, S]
    return np.matmul(by_group, by_group.transpose(0, 2, 1)).astype(np.float64)


def _patches(x: np.ndarray, geom: ConvGeom, count: int, rng) -> np.ndarray:
    """[S, groups, P] float32 input patches at up to ``count`` random output positions
    (fewer for wide inputs: at most ``PATCH_VALUES`` values per batch)."""
    if geom.dense:
        rows = x.reshape(-1, x.shape[-1])
        count = min(count, rows.shape[0], max(PATCH_VALUES // rows.shape[1], 64))
        pick = rng.choice(rows.shape[0], count, replace=False)
        return rows[np.sort(pick)][:, None, :].astype(np.float32)
    (kh, kw), (sh, sw), (dh, dw) = geom.kernel, geom.strides, geom.dilations
    t, left, b, r = geom.pads
    # NHWC, so each gathered patch row is a contiguous run of channels
    xp = np.pad(x.transpose(0, 2, 3, 1), ((0, 0), (t, b), (left, r), (0, 0)))
    n, hp, wp, c = xp.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    count = min(count, n * ho * wo, max(PATCH_VALUES // (c * kh * kw), 64))
    pick = np.sort(rng.choice(n * ho * wo, count, replace=False))
    bi, rest = np.divmod(pick, ho * wo)
    oy, ox = np.divmod(rest, wo)
    patch = np.stack([xp[bi, oy * sh + i * dh, ox * sw + j * dw]
                      for i in range(kh) for j in range(kw)], axis=2)  # [S, C, kh*kw]
    return patch.reshape(count, geom.groups, -1).astype(np.float32, copy=False)


class Quadratic:
    """The output error of one layer as a quadratic in its decoded weights.

    noise(c) = sum_o e_o^T S e_o = sum_o c_o^T A_o c_o - 2 c_o^T b_o + w_o^T S w_o,
    with A_o = M_o^T S M_o and b_o = M_o^T S w_o (S: G, or the covariance when the
    bias absorbs the mean error). Built once per layer; scoring a clustering costs one
    GEMM (``direct_sqnr_db``), refining it the A_o (segment sums of S, O * P^2 adds).
    """

    def __init__(self, w: np.ndarray, moments: Moments | None, corrects_bias: bool):
        self.w = w
        if moments is None:  # no data: plain weight error, S = I
            self.groups, self.s = 1, None
            self.signal = float(np.sum(w * w))
            self.sw, self.wsw = w, np.sum(w * w, axis=1)
            return
        self.groups = moments.gram.shape[0]
        self.s = moments.fit_matrix(corrects_bias)
        self.signal = float(np.sum(_group_apply(w, moments.gram) * w))
        self.sw = _group_apply(w, self.s)
        self.wsw = np.sum(self.sw * w, axis=1)

    def normal_equations(self, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A [O, k, k] and b [O, k] for cluster indices ``idx`` [O, P]."""
        channels = idx.shape[0]
        flat = (idx + np.arange(channels)[:, None] * k).reshape(-1)
        b = np.bincount(flat, weights=self.sw.reshape(-1), minlength=channels * k)
        if self.s is None:  # A_o = diag(cluster sizes)
            counts = np.bincount(flat, minlength=channels * k).reshape(channels, k)
            return counts[:, :, None] * np.eye(k)[None], b.reshape(channels, k)
        return _segment_grams(self.s, idx, k), b.reshape(channels, k)

    def direct_sqnr_db(self, wq: np.ndarray) -> float:
        """Output SQNR of decoded weights ``wq`` [O, P]: one GEMM, no A_o needed."""
        err = wq - self.w
        noise = float(np.sum(err * err)) if self.s is None else \
            float(np.sum(_group_apply(err, self.s) * err))
        return _db(self.signal, noise)

    def sqnr_db(self, a: np.ndarray, b: np.ndarray, cent: np.ndarray) -> float:
        """Output SQNR of codebook ``cent`` [R, k] (R = 1 or O) given its A, b."""
        c = np.broadcast_to(cent.astype(np.float64), b.shape)
        quad = np.sum(c * np.matmul(a, c[..., None])[..., 0])
        noise = float(quad - 2 * np.sum(c * b) + self.wsw.sum())
        return _db(self.signal, noise)


def _db(signal: float, noise: float) -> float:
    if noise <= signal * 1e-20:
        return CAP_DB
    return float(min(CAP_DB, 10 * np.log10(max(signal, 1e-30) / noise)))


def _segment_grams(s: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """A [O, k, k]: A_o = M_o^T S_g(o) M_o, S's rows and columns summed per cluster of
    channel o (M_o [P, k] the one-hot of ``idx[o]``), as two batched GEMMs over chunks
    of channels (S M_o, then M_o^T (S M_o)): 3-10x faster than summing S's columns
    per channel (P^2 reads each), which took half of a cluster-weights run."""
    channels, size = idx.shape
    per_group = channels // s.shape[0]
    out = np.empty((channels, k, k))
    chunk = max(1, min(channels, CHUNK_VALUES // (size * k)))
    if s.shape[0] > 1:  # each channel of the chunk gathers its group's S
        chunk = max(1, min(chunk, CHUNK_VALUES // (size * size)))
    for lo in range(0, channels, chunk):
        sub = idx[lo:lo + chunk]
        onehot = np.zeros(sub.shape + (k,))
        np.put_along_axis(onehot, sub[:, :, None], 1.0, axis=2)
        gram = s[0] if s.shape[0] == 1 else s[np.arange(lo, lo + len(sub)) // per_group]
        out[lo:lo + len(sub)] = np.matmul(onehot.transpose(0, 2, 1), np.matmul(gram, onehot))
    return out


def solve(a: np.ndarray, b: np.ndarray, cent: np.ndarray, zero: int | None = None
          ) -> np.ndarray:
    """Least-squares centroids (module docstring).

    Args:
        a, b: ``Quadratic.normal_equations`` [O, k, k], [O, k]; cent: [R, k] k-means
            codebook (R = 1 per tensor: the channels' equations are summed; R = O).
        zero: index of a centroid fixed at 0, or None.

    Returns:
        [R, k] refined codebook.
    """
    if cent.shape[0] == 1:
        a, b = a.sum(axis=0, keepdims=True), b.sum(axis=0, keepdims=True)
    free = [j for j in range(cent.shape[1]) if j != zero]
    a, b, base = a[:, free][:, :, free], b[:, free], cent[:, free]
    lam = 1e-6 * np.maximum(np.einsum("rjj->r", a) / len(free), 1e-30)[:, None]
    a = a + lam[:, :, None] * np.eye(len(free))[None]
    out = cent.astype(np.float64).copy()
    out[:, free] = np.linalg.solve(a, (b + lam * base)[..., None])[..., 0]
    return out


def _group_apply(w: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """[O, P] rows G_{g(o)} w_o."""
    groups = gram.shape[0]
    if groups == 1:
        return w @ gram[0]
    return np.matmul(w.reshape(groups, -1, w.shape[1]), gram).reshape(w.shape)


def bias_shift(w: np.ndarray, wq: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """[O] change of bias cancelling the mean output error: -(wq_o - w_o) . mu_g(o)."""
    groups = mean.shape[0]
    err = (wq - w).reshape(groups, -1, w.shape[1])
    return -np.einsum("gop,gp->go", err, mean).reshape(-1)
