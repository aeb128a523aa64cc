"""Activation statistics over calibration data, and range selection per tensor.

Statistics are streamed batch by batch (activations of 100 images of a 224x224 CNN do
not fit in memory): a first sweep gathers min/max and per-channel max and mean, a second
(only for histogram methods) a histogram of each tensor over its [min, max].

Range methods, each returning [lo, hi] that always contains 0:
- ``minmax``: the observed extremes.
- ``percentile``: the ``p`` and ``100 - p`` percentiles of the histogram.
- ``entropy``: the clipping threshold minimising the KL divergence between the
  histogram and its 8-bit quantized version (TensorRT's calibration idea).
- ``mse``: the range minimising the expected squared quantization error
  E[(x - Q(x))^2] under the histogram: clipping error outside, s^2/12 inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ... import validate

BINS = 2048
LEVELS = 256


@dataclass
class TensorStats:
    lo: float = np.inf
    hi: float = -np.inf
    channel_max: np.ndarray | None = None
    channel_sum: np.ndarray | None = None
    count: int = 0
    hist: np.ndarray | None = field(default=None, repr=False)
    zeros: int = 0

    def update(self, x: np.ndarray) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        if x.ndim >= 2:
            axes = tuple(i for i in range(x.ndim) if i != 1)
            cmax = x.max(axis=axes)
            csum = x.sum(axis=axes, dtype=np.float64)
            self.channel_max = cmax if self.channel_max is None else np.maximum(
                self.channel_max, cmax)
            self.channel_sum = csum if self.channel_sum is None else self.channel_sum + csum
            self.count += x.size // x.shape[1]

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None else self.channel_sum / max(self.count, 1)

    def add_histogram(self, x: np.ndarray) -> None:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if hi <= lo:
            return
        counts, _ = np.histogram(x, bins=BINS, range=(lo, hi))
        self.hist = counts if self.hist is None else self.hist + counts
        self.zeros += int(np.count_nonzero(x == 0))


def collect(model: onnx.ModelProto, names: list[str], batches: list[dict],
            histograms: list[str], progress=lambda m: None) -> dict[str, TensorStats]:
    """Stream ``batches`` through ``model``: statistics of ``names``, and a second sweep
    for the histograms of the tensors in ``histograms`` (a subset of ``names``)."""
    runner = validate.Runner(validate.with_outputs(model, names), optimization="basic")
    try:
        stats = {n: TensorStats() for n in names}
        for i, batch in enumerate(batches):
            values = runner.run_batch(batch)
            for name in names:
                stats[name].update(values[name])
            progress(f"calibration sweep 1: batch {i + 1}/{len(batches)}")
        if histograms:
            for i, batch in enumerate(batches):
                values = runner.run_batch(batch)
                for name in histograms:
                    stats[name].add_histogram(values[name])
                progress(f"calibration sweep 2: batch {i + 1}/{len(batches)}")
        return stats
    finally:
        runner.close()


def choose_range(stats: TensorStats, method: str, percentile: float = 99.999,
                 symmetric: bool = False) -> tuple[float, float]:
    """[lo, hi] for one tensor (contains 0) by ``method``; ``symmetric``: for the int8
    grid on [-b, b] (int8_params), else for the uint8 grid on [lo, hi]."""
    lo, hi = min(stats.lo, 0.0), max(stats.hi, 0.0)
    if method == "minmax" or stats.hist is None or hi <= lo:
        return lo, hi
    edges = np.linspace(lo, hi, BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    if method == "percentile":
        return _percentile(stats.hist, edges, percentile)
    if method == "entropy":
        return _entropy(stats.hist, edges, lo, hi, stats.zeros, symmetric)
    return _mse(stats.hist, centers, lo, hi, symmetric)


def _percentile(hist, edges, p) -> tuple[float, float]:
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    lo = edges[np.searchsorted(cdf, (100 - p) / 100)]
    hi = edges[min(np.searchsorted(cdf, p / 100) + 1, len(edges) - 1)]
    return min(float(lo), 0.0), max(float(hi), 0.0)


def quant_error(hist, centers, lo, hi, symmetric: bool = False) -> float:
    """Expected squared error of uniform 8-bit quantization of the histogram on [lo, hi]
    (``symmetric``: on the int8 grid [-b, b], b = max(|lo|, |hi|), 127 steps each side)."""
    if symmetric:
        bound = max(-lo, hi)
        lo, hi, scale = -bound, bound, bound / 127
    else:
        scale = (hi - lo) / (LEVELS - 1)
    clipped = np.clip(centers, lo, hi)
    err = (centers - clipped) ** 2 + np.where(centers == clipped, scale**2 / 12, 0.0)
    return float(np.sum(hist * err))


def _mse(hist, centers, lo, hi, symmetric: bool = False) -> tuple[float, float]:
    best, best_err = (lo, hi), quant_error(hist, centers, lo, hi, symmetric)
    for alpha in np.linspace(0.15, 1.0, 86)[:-1]:
        cand = (lo * alpha, hi * alpha)
        err = quant_error(hist, centers, *cand, symmetric)
        if err < best_err:
            best, best_err = cand, err
    return float(best[0]), float(best[1])


def _entropy(hist, edges, lo, hi, zeros: int = 0, symmetric: bool = False
             ) -> tuple[float, float]:
    """KL-optimal threshold on the positive side; the negative side scales with it.

    Exact zeros (half of a ReLU output) are left out: the grid holds 0 exactly, and
    as a spike in the first bin they dominate the divergence, which then always picks
    the smallest threshold (measured on SqueezeNet: every ReLU clipped to 1/16 of its
    range, output cosine 0.02). The quantized histogram has as many levels as the
    uint8 grid on [lo, hi] puts on the positive side (255 for a ReLU output: with
    TensorRT's 128, meant for a symmetric int8 grid, it clips twice as hard as needed);
    127 on the ``symmetric`` int8 grid."""
    zero = int(np.searchsorted(edges, 0.0))
    pos = hist[max(zero - 1, 0):].copy()
    pos[0] = max(pos[0] - zeros, 0)
    if pos.sum() == 0:
        return lo, hi
    levels = 127 if symmetric else \
        int(np.clip(round((LEVELS - 1) * hi / (hi - lo)), 16, LEVELS - 1))
    best_i, best_kl = len(pos), np.inf
    for i in range(levels, len(pos) + 1, 16):
        kl = _kl(pos[:i].astype(np.float64), pos[i:].sum(), levels)
        if kl < best_kl:
            best_i, best_kl = i, kl
    frac = best_i / len(pos)
    return lo * frac, hi * frac


def _kl(ref: np.ndarray, outliers: float, levels: int) -> float:
    """KL(P || Q): P is ``ref`` with the clipped mass added to its last bin; Q is ``ref``
    *without* that mass, merged into ``levels`` levels and spread back over its
    non-empty bins, so a threshold that clips much pays for the mass Q cannot represent."""
    p = ref.copy()
    p[-1] += outliers
    chunks = np.array_split(ref, levels)
    q = np.concatenate([np.where(c > 0, c.sum() / max((c > 0).sum(), 1), 0) for c in chunks])
    p, q = p / p.sum(), q / max(q.sum(), 1e-12)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))


def uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of the asymmetric uint8 grid on [lo, hi] (lo <= 0 <= hi)."""
    if hi - lo < 1e-12:
        return np.float32(1.0), np.uint8(0)
    scale = np.float32((hi - lo) / (LEVELS - 1))
    zero = np.uint8(np.clip(round(-lo / float(scale)), 0, 255))
    return scale, zero


def int8_params(lo: float, hi: float) -> tuple[np.float32, np.int8]:
    """Scale and zero point of the symmetric int8 grid covering [lo, hi]."""
    bound = max(abs(lo), abs(hi))
    return np.float32(bound / 127 if bound > 0 else 1.0), np.int8(0)
