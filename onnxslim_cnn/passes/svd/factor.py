"""The math of svd-split: low-rank factors of a layer matrix, fitted to its outputs.

A layer computes y = M x + b (M: out x D, x: im2col patch). With the centred input
covariance Sigma = E[(x - mu)(x - mu)^T] (Sigma = I without data), the output error of
an approximation M' is

    err(M')^2 = tr((M - M') Sigma (M - M')^T) / tr(M Sigma M^T)

once the bias absorbs the mean shift, b' = b + (M - M') mu (so E[y'] = E[y]).

Channel mode (Zhang et al. 2015): with U S V^T = svd(M Sigma^{1/2}) (computed as the
eigenpairs U, s^2 of M Sigma M^T), the best rank-r M' is P M with P = U_r U_r^T, a
projection of the outputs onto their principal subspace:
    first conv  A = U_r^T M  (r x D: k x k, C_in -> r)
    second conv B = U_r      (out x r: 1 x 1, r -> C_out)
and err^2 = sum_{i>r} s_i^2 / sum_i s_i^2 exactly.

Spatial mode (Jaderberg et al. 2014, scheme 2): W reshaped to
    N[(c, y), (o, x)] = W[o, c, y, x]          (C_in*kh x C_out*kw)
is approximated by V H with V (C_in*kh x r) a kh x 1 conv and H (r x C_out*kw) a 1 x kw
conv. Data-aware, N is whitened on the left by S^{1/2}, S the covariance of one input
column (c, y) (Sigma's diagonal blocks averaged over x): svd(S^{1/2} N) = U s V^T,
V = S^{-1/2} U_r, H = s_r V_r^T; err is then measured with the full Sigma, for every
rank at once from one matrix over the SVD's terms (_dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOOR = 1e-6  # relative eigenvalue floor of S^{-1/2} (directions the data never uses)


@dataclass
class Factors:
    """A split: ``first`` (r x D' matrix), ``second`` (out x r' matrix), new bias."""

    mode: str
    rank: int
    first: np.ndarray
    second: np.ndarray
    bias: np.ndarray
    error: float


class Samples:
    """A covariance kept as its n centred samples X (n x D), Sigma = X^T X / n, when
    there are fewer samples than dimensions: a Gemm sees one row per image (VGG-19's fc6
    with 100 images: 100 x 25088 here, 5 GB as a D x D float64 matrix)."""

    def __init__(self, centred: np.ndarray):
        self.centred = centred

    def sandwich(self, m: np.ndarray) -> np.ndarray:
        """M Sigma M^T at a cost of out * D * n, not out * D^2."""
        y = m @ self.centred.T
        return y @ y.T / len(self.centred)

    def dense(self) -> np.ndarray:
        return self.centred.T @ self.centred / len(self.centred)


def dense(sigma: np.ndarray | Samples | None) -> np.ndarray | None:
    return sigma.dense() if isinstance(sigma, Samples) else sigma


def sandwich(m: np.ndarray, sigma: np.ndarray | Samples | None) -> np.ndarray:
    """M Sigma M^T (M M^T without data)."""
    if sigma is None:
        return m @ m.T
    if isinstance(sigma, Samples):
        return sigma.sandwich(m)
    return (m @ sigma) @ m.T


def sqrt_psd(sigma: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Sigma^{1/2} (or Sigma^{-1/2} with eigenvalues floored at FLOOR * max)."""
    lam, vec = np.linalg.eigh(sigma)
    lam = np.maximum(lam, FLOOR * max(float(lam.max()), 1e-30))
    power = -0.5 if inverse else 0.5
    return (vec * lam**power) @ vec.T


class Channel:
    """Channel-mode factoriser of one matrix (one SVD, any rank)."""

    mode = "channel"

    def __init__(self, m: np.ndarray, sigma: np.ndarray | Samples | None):
        self.m = m
        if m.shape[0] <= m.shape[1]:
            # U and s^2 of svd(M Sigma^{1/2}) are the eigenpairs of M Sigma M^T (out x
            # out): no D x D square root (D = 4608 in ResNet-50's last stage)
            gram = sandwich(m, sigma)
            lam, vec = np.linalg.eigh((gram + gram.T) / 2)
            order = np.argsort(lam)[::-1]
            self.u, s2 = vec[:, order], np.maximum(lam[order], 0.0)
        else:  # out > D: the D x D square root is the smaller problem
            self.u, s, _ = np.linalg.svd(m if sigma is None else m @ sqrt_psd(dense(sigma)),
                                         full_matrices=False)
            s2 = s**2
        energy = np.cumsum(s2)
        self.residual = 1.0 - energy / energy[-1] if energy[-1] > 0 else np.zeros_like(energy)
        self.max_rank = len(s2)

    def error(self, rank: int) -> float:
        return float(np.sqrt(max(self.residual[rank - 1], 0.0)))

    def energy_rank(self, energy: float) -> int:
        return int(np.searchsorted(-self.residual, -(1.0 - energy) - 1e-12) + 1)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        u = self.u[:, :rank]
        return u.T @ self.m, u


class Spatial:
    """Spatial-mode factoriser of a conv weight (C_out, C_in, kh, kw)."""

    mode = "spatial"

    def __init__(self, m: np.ndarray, c_in: int, kernel: tuple[int, int],
                 sigma: np.ndarray | Samples | None):
        kh, kw = kernel
        sigma = dense(sigma)
        self.m, self.shape = m, (m.shape[0], c_in, kh, kw)
        n = m.reshape(self.shape).transpose(1, 2, 0, 3).reshape(c_in * kh, -1)
        left = right = None
        if sigma is not None:
            column = column_covariance(sigma, c_in, kernel)
            left, right = sqrt_psd(column), sqrt_psd(column, inverse=True)
        u, s, vt = np.linalg.svd(n if left is None else left @ n, full_matrices=False)
        self.v = u if right is None else right @ u
        self.h = s[:, None] * vt
        energy = np.cumsum(s**2)
        self.residual = 1.0 - energy / energy[-1] if energy[-1] > 0 else np.zeros_like(s)
        self.max_rank = len(s)
        self.dropped = self.residual if sigma is None else \
            _dropped(self.v, self.h, sigma, self.shape)

    def energy_rank(self, energy: float) -> int:
        return int(np.searchsorted(-self.residual, -(1.0 - energy) - 1e-12) + 1)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        return self.v[:, :rank].T, self.h[:rank]

    def approx(self, rank: int) -> np.ndarray:
        """M' (out x D) of the rank-``rank`` split."""
        c_out, c_in, kh, kw = self.shape
        n = self.v[:, :rank] @ self.h[:rank]
        return n.reshape(c_in, kh, c_out, kw).transpose(2, 0, 1, 3).reshape(c_out, -1)

    def error(self, rank: int) -> float:
        return float(np.sqrt(max(self.dropped[rank - 1], 0.0)))


def _dropped(v: np.ndarray, h: np.ndarray, sigma: np.ndarray, shape) -> np.ndarray:
    """err(r)^2 under the full Sigma for every rank r = 1 .. K of N = V H = sum_i v_i h_i
    (K terms), from one K x K matrix instead of a D x D product per rank.

    The error of rank r is M - M' = sum_{i>r} of the terms (exactly: V = S^{-1/2} U and
    S^{1/2} N = U s V^T with the same floored eigenvalues). Term i as a conv weight is
    v_i[c, y] h_i[o, x], so with Sigma_{x x'} the (c, y) x (c', y') block of Sigma at
    kernel columns x, x':
        tr((M - M') Sigma (M - M')^T) = sum_{i, j > r} G_ij,
        G_ij = sum_{x, x'} (v_i^T Sigma_{x x'} v_j) (h_i[:, x] . h_j[:, x'])
    and tr(M Sigma M^T) is the sum of all of G. Cost kw^2 (C_in kh)^2 K: VGG-19's
    512-channel 3x3 convs 32 GFLOP once, against 11 GFLOP for each rank looked at.
    """
    c_out, c_in, kh, kw = shape
    six = sigma.reshape(c_in * kh, kw, c_in * kh, kw)
    cols = h.reshape(len(h), c_out, kw)
    g = np.zeros((len(h), len(h)))
    for x in range(kw):
        for x2 in range(kw):
            a = v.T @ six[:, x, :, x2] @ v
            g += a * (cols[:, :, x] @ cols[:, :, x2].T)
    # suffix sums: tail[r] = sum of G[r:, r:]
    tail = np.cumsum(np.cumsum(g[::-1, ::-1], axis=0), axis=1)[::-1, ::-1].diagonal()
    total = tail[0]
    if total <= 0:
        return np.zeros(len(h))
    return np.append(tail[1:], 0.0) / total


def column_covariance(sigma: np.ndarray, c_in: int, kernel: tuple[int, int]) -> np.ndarray:
    """Covariance of one input column (c, y), averaged over the kernel's x offsets."""
    kh, kw = kernel
    six = sigma.reshape(c_in, kh, kw, c_in, kh, kw)
    blocks = [six[:, :, x, :, :, x] for x in range(kw)]
    return (sum(blocks) / kw).reshape(c_in * kh, c_in * kh)


def smallest_rank(error, budget: float, high: int) -> int | None:
    """Smallest r in [1, high] with error(r) <= budget (error falls with r), or None."""
    if high < 1 or error(high) > budget:
        return None
    low = 1
    while low < high:
        mid = (low + high) // 2
        if error(mid) <= budget:
            high = mid
        else:
            low = mid + 1
    return low


def build(factoriser, rank: int, bias: np.ndarray, mean: np.ndarray | None) -> Factors:
    """Factors of ``rank``, the bias corrected for the mean shift (module docstring)."""
    first, second = factoriser.factors(rank)
    new_bias = bias.copy()
    if mean is not None:
        approx = factoriser.approx(rank) if isinstance(factoriser, Spatial) else second @ first
        new_bias = bias + (factoriser.m - approx) @ mean
    return Factors(factoriser.mode, rank, first, second, new_bias, factoriser.error(rank))
