"""Input statistics of each site on calibration data: mean and covariance of its patches.

The covariance of a Conv's im2col patches (D = C_in*kh*kw) is what svd-split fits the
factors to. A 224 x 224 layer has ~50k patches per image, so each batch contributes a
seeded random sample of its patches, gathered straight from the padded
input (no full im2col); ``rows`` patches per site over all batches (16k: ~30 samples per
dimension for D = 576). Sums of x and x x^T are accumulated in float64:

    mu = sum(x) / n,   Sigma = sum(x x^T) / n - mu mu^T

A site that sees fewer rows than its D (a Gemm: one row per sample) keeps the rows
instead, centred (factor.Samples): VGG-19's fc6 with 100 images is 100 x 25088 numbers,
not a 25088^2 float64 matrix of 5 GB whose products cost 2.6 TFLOP.

Sites are measured in groups whose covariances together hold at most ``MAX_ENTRIES``
numbers (ResNet-50 would need ~1 GB at once); each group is one sweep over the data.
"""

from __future__ import annotations

import numpy as np
import onnx

from ... import validate
from .factor import Samples
from .site import Site

MAX_ENTRIES = 2**24
CHUNK = 1024  # rows of the covariance finished at a time


class Moments:
    """Streaming first and second moments of row vectors. While there are fewer rows
    than dimensions the rows themselves are kept (a Samples covariance, exact and
    smaller); from then on the sums."""

    def __init__(self, dim: int):
        self.dim = dim
        self.total = np.zeros(dim)
        self.rows: list[np.ndarray] = []
        self.outer: np.ndarray | None = None
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        # one batch's product in float32 (twice as fast; <= 16k terms), summed in float64
        rows = rows.astype(np.float32)
        self.total += rows.sum(axis=0, dtype=np.float64)
        self.count += rows.shape[0]
        if self.outer is None and self.count < self.dim:
            self.rows.append(rows)
            return
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim))
            for kept in self.rows:
                self.outer += kept.T @ kept
            self.rows = []
        self.outer += rows.T @ rows

    def result(self) -> tuple[np.ndarray, np.ndarray | Samples]:
        """(mean, covariance). The sums' array is finished in place (a 25088^2 float64
        matrix is 5 GB, each temporary copy another 5 GB); it is symmetric (every
        batch's rows^T rows is one syrk, and mu mu^T is)."""
        mean = self.total / max(self.count, 1)
        if self.outer is None:
            rows = np.concatenate(self.rows) if self.rows else np.zeros((1, self.dim))
            return mean, Samples(rows - mean)
        sigma, self.outer = self.outer, None
        sigma /= max(self.count, 1)
        for lo in range(0, self.dim, CHUNK):  # mu mu^T a band of rows at a time
            sigma[lo: lo + CHUNK] -= np.outer(mean[lo: lo + CHUNK], mean)
        return mean, sigma


def patches(x: np.ndarray, site: Site, rng: np.random.Generator, rows: int) -> np.ndarray:
    """At most ``rows`` random im2col patches (n, D) of ``x`` for ``site``'s geometry."""
    if site.node.op != "Conv":
        flat = x.reshape(-1, x.shape[-1])
        pick = rng.choice(flat.shape[0], min(rows, flat.shape[0]), replace=False)
        return flat[np.sort(pick)]
    (kh, kw), (sh, sw), (dh, dw) = site.kernel, site.strides, site.dilations
    top, left, bottom, right = site.pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    total = x.shape[0] * h_out * w_out
    flat = rng.choice(total, min(rows, total), replace=False)
    n, rest = np.divmod(np.sort(flat), h_out * w_out)
    oy, ox = np.divmod(rest, w_out)
    ys = (oy * sh)[:, None] + np.arange(kh) * dh
    xs = (ox * sw)[:, None] + np.arange(kw) * dw
    # (n, C, kh, kw): channel axis kept whole, kernel offsets gathered per patch
    got = xp[n[:, None, None], :, ys[:, :, None], xs[:, None, :]]
    return got.transpose(0, 3, 1, 2).reshape(len(n), -1)


def groups(sites: list[Site]) -> list[list[Site]]:
    """Sites split into groups of at most MAX_ENTRIES covariance numbers."""
    out: list[list[Site]] = [[]]
    size = 0
    for site in sites:
        entries = site.matrix.shape[1] ** 2
        if out[-1] and size + entries > MAX_ENTRIES:
            out.append([])
            size = 0
        out[-1].append(site)
        size += entries
    return [g for g in out if g]


def collect(model: onnx.ModelProto, sites: list[Site], batches: list[dict], seed: int,
            rows: int = 16384, progress=lambda m: None) -> dict[str, tuple]:
    """(mean, covariance) of each site's input patches, keyed by ``site.key``."""
    result = {}
    inputs = {i.name for i in model.graph.input}
    for index, group in enumerate(groups(sites)):
        names = sorted({s.node.inputs[0].name for s in group} - inputs)
        runner = validate.Runner(validate.with_outputs(model, names, only=True),
                                 optimization="basic") if names else None
        moments = {s.key: Moments(s.matrix.shape[1]) for s in group}
        rng = np.random.default_rng(seed)
        per_batch = -(-rows // max(len(batches), 1))
        try:
            for batch in batches:
                values = dict(batch) | (runner.run_batch(batch) if runner else {})
                for site in group:
                    x = np.asarray(values[site.node.inputs[0].name])
                    moments[site.key].add(patches(x, site, rng, per_batch))
        finally:
            if runner:
                runner.close()
        progress(f"svd-split statistics: group {index + 1}/{len(groups(sites))}")
        result.update({k: m.result() for k, m in moments.items()})
    return result
