"""Per-layer SQNR of a quantized graph against the float graph, and fp32 fallback choice.

For every quantized layer output y (float emulation of the Q/DQ graph) and its float
counterpart r on the same calibration samples:
    SQNR = 20 log10(||r|| / ||y - r||)     (dB; higher is better)
Layers below ``threshold`` dB are the most sensitive; at most ``max_fraction`` of the
compute layers (lowest SQNR first) are kept in float, so int8 coverage stays high.
"""

from __future__ import annotations

import numpy as np
import onnx

from ... import validate

CAP_DB = 200.0


def layer_sqnr(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, names: list[str],
               batches: list[dict]) -> dict[str, float]:
    """SQNR in dB of tensors ``names`` (present in both models), streamed over batches."""
    ref = validate.Runner(validate.with_outputs(float_model, names), optimization="disable")
    got = validate.Runner(validate.with_outputs(quant_model, names), optimization="disable")
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    try:
        for batch in batches:
            r, y = ref.run_batch(batch), got.run_batch(batch)
            for name in names:
                a, b = r[name].astype(np.float64), y[name].astype(np.float64)
                signal[name] += float(np.sum(a * a))
                noise[name] += float(np.sum((a - b) ** 2))
    finally:
        ref.close()
        got.close()
    return {n: _db(signal[n], noise[n]) for n in names}


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return CAP_DB
    return float(min(CAP_DB, 10 * np.log10(max(signal, 1e-30) / noise)))


def choose_fallback(sqnr: dict[str, float], threshold: float, max_count: int) -> list[str]:
    """Names below ``threshold`` dB, worst first, at most ``max_count``."""
    low = sorted((v, n) for n, v in sqnr.items() if v < threshold)
    return [n for _, n in low[:max_count]]
