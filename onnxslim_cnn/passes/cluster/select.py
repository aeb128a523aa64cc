"""Bits (and codebook granularity) per layer from measured sensitivity.

Every layer has candidates (bits, per-tensor or per-channel codebook) with their bytes
and output SQNR (refine.py). Three ways to choose:

- fixed bits b: the granularity maximising ``SQNR - 6.02 * bits_per_weight`` (the
  rate-distortion slope of ~6 dB per bit: a per-channel codebook must buy its bytes);
- error budget (``min_sqnr_db``): each layer's cheapest candidate reaching the SQNR,
  else its best one;
- size budget (``avg_bits``, codebooks and the decode nodes of small tensors included;
  a candidate not smaller than the dense tensor means staying float): start every layer
  at its cheapest candidate, then repeatedly take the upgrade with the largest drop of
  network output noise per added byte,

      gain = s_l (10^(-SQNR_now/10) - 10^(-SQNR_new/10)) / (bytes_new - bytes_now),

  with s_l the layer's measured sensitivity (sensitivity.py; 1 without data),

  while the total stays within avg_bits / 8 * (number of weights). Looking at every
  dearer candidate of a layer, not only the next, walks the lower convex hull.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DB_PER_BIT = 6.02


@dataclass(frozen=True)
class Candidate:
    bits: int
    granularity: str  # sites.GRANULARITIES
    bytes: int
    sqnr_db: float
    clustering: object = field(default=None, compare=False, repr=False)  # if kept
    dense: bool = False  # the encoding would not be smaller: the layer stays float


def fixed(cands: list[Candidate], size: int) -> Candidate:
    """Best rate-distortion score among candidates of one bit width (an encodable one
    when there is one: staying float has no noise, which no score should reward here)."""
    cands = [c for c in cands if not c.dense] or cands
    return max(cands, key=lambda c: c.sqnr_db - DB_PER_BIT * 8 * c.bytes / max(size, 1))


def by_error(layers: list[list[Candidate]], min_db: float) -> list[Candidate]:
    """Per layer the cheapest candidate with SQNR >= min_db (else the best SQNR)."""
    out = []
    for cands in layers:
        good = [c for c in cands if c.sqnr_db >= min_db]
        out.append(min(good, key=lambda c: c.bytes) if good else
                   max(cands, key=lambda c: c.sqnr_db))
    return out


def by_size(layers: list[list[Candidate]], budget: float,
            scale: list[float] | None = None) -> list[Candidate]:
    """Greedy marginal-gain allocation under a total byte ``budget`` (module docstring).

    Args:
        scale: per layer, network output noise per unit of the layer's relative noise
            (sensitivity.py); None weighs every layer alike.
    """
    scale = scale or [1.0] * len(layers)
    pick = [min(cands, key=lambda c: (c.bytes, -c.sqnr_db)) for cands in layers]
    total = sum(c.bytes for c in pick)
    while True:
        best, best_gain = None, 0.0
        for i, cands in enumerate(layers):
            now = pick[i]
            for c in cands:
                extra = c.bytes - now.bytes
                if extra <= 0 or total + extra > budget:
                    continue
                gain = scale[i] * (_noise(now) - _noise(c)) / extra
                if gain > best_gain:
                    best, best_gain = (i, c), gain
        if best is None:
            return pick
        i, c = best
        total += c.bytes - pick[i].bytes
        pick[i] = c


def _noise(c: Candidate) -> float:
    return 10 ** (-c.sqnr_db / 10)
