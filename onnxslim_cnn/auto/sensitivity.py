"""Per-layer sensitivity: the network output error with only one layer changed.

For every layer and every candidate patch, the base model with just that patch is run
on a subset of the calibration samples; the relative output noise energy

    error = sum over outputs ||y - y_ref||^2 / sum ||y_ref||^2     (SQNR = -10 log10 error)

is what the allocation trades against the bytes the patch saves. Each (layer,
candidate) pair is measured once per run and cached in the ``Sensitivity`` object.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .. import validate
from .allocate import Option
from .patches import Patch, splice

SQNR_CAP = 200.0


def subset(batches: list[dict[str, np.ndarray]], count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` samples of ``batches`` (whole batches, the last one cut)."""
    out, left = [], count
    for batch in batches:
        if left <= 0:
            break
        size = next(iter(batch.values())).shape[0]
        out.append(batch if size <= left else {k: v[:left] for k, v in batch.items()})
        left -= size
    return out


def hold_out(batches: list[dict[str, np.ndarray]], labels: np.ndarray | None,
             fraction: float = 1 / 3):
    """(fit batches, held-out batches, held-out labels): the last ``fraction`` of the
    batches (at least one) is held out when there are two or more batches, so that
    what the candidate passes fitted (data-aware centroids) is judged on samples they
    did not see; a single batch serves both."""
    if len(batches) < 2:
        return batches, batches, labels
    count = max(1, round(fraction * len(batches)))
    fit, held = batches[:-count], batches[-count:]
    if labels is not None:
        labels = labels[len(labels) - sum(_size(b) for b in held):]
    return fit, held, labels


def _size(batch: dict[str, np.ndarray]) -> int:
    return next(iter(batch.values())).shape[0]


def noise(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> float:
    """Relative output noise energy of ``out`` against ``ref`` (inf for non-finite)."""
    signal = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in ref.values())
    err = sum(float(np.sum(np.square(out[k].astype(np.float64) - r))) for k, r in ref.items())
    if not np.isfinite(err):
        return float("inf")
    return err / signal if signal > 0 else err


def to_db(error: float) -> float:
    return SQNR_CAP if error <= 0 else float(min(SQNR_CAP, -10 * np.log10(error)))


class Sensitivity:
    """Measures and caches (layer, candidate) errors on a fixed sample subset."""

    def __init__(self, base: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
                 progress: Callable[[str], None]):
        self.base = base
        self.batches = batches
        self.progress = progress
        self.ref = validate.run_model(base, batches)
        self.cache: dict[tuple[str, str], float] = {}

    def options(self, layer: str, patches: list[Patch], base_bytes: int) -> list[Option]:
        """The float option (the layer's own weights, ``float``: fp32 or fp16) and one
        option per patch of ``layer``."""
        found = [Option("float", None, base_bytes, 0.0, SQNR_CAP)]
        for patch in patches:
            error = self.error(patch)
            found.append(Option(patch.tag, patch, base_bytes - patch.base_bytes + patch.bytes,
                                error, to_db(error)))
        return found

    def error(self, patch: Patch) -> float:
        key = (patch.layer, patch.tag)
        if key not in self.cache:
            out = validate.run_model(splice(self.base, [patch]), self.batches)
            self.cache[key] = noise(self.ref, out)
        return self.cache[key]

    def measure_all(self, by_layer: dict[str, list[Patch]],
                    base_bytes: dict[str, int]) -> dict[str, list[Option]]:
        """Options of every layer, with a progress line every tenth of the work."""
        total = sum(len(p) for p in by_layer.values())
        done, every = 0, max(1, total // 10)
        result = {}
        for layer, patches in by_layer.items():
            result[layer] = self.options(layer, patches, base_bytes[layer])
            for _ in patches:
                done += 1
                if done % every == 0 or done == total:
                    self.progress(f"[auto-compress] sensitivity {done}/{total} "
                                  f"(layer x candidate)")
        return result
