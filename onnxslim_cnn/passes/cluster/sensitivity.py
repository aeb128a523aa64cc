"""Network-level sensitivity of each layer to clustering, for the bit allocation.

A layer's own output SQNR (refine.Quadratic) says how much noise clustering puts on
that layer's output, not how much of it reaches the network output: a layer early in
the network, or feeding a narrow bottleneck, can hurt far more per unit of noise than
one before the classifier. So each layer is clustered once at a probe width, the model
is run with ONLY that layer changed, and the ratio

    s_l = ||y_l' - y||^2 / ||y||^2  /  (noise_l / signal_l)

(network output noise relative to its power, per unit of the layer's relative output
noise) scales the layer's candidates in select.by_size: for small noise the network
noise is close to linear in each layer's noise and close to additive over layers.

One onnxruntime session serves every layer: the weights (and biases) of all sites
become graph inputs, fed the original values except for the probed layer.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ... import validate
from .sequence import first_samples

MAX_SAMPLES = 16  # calibration samples (images) per probe


def network_noise(model: onnx.ModelProto, probes: dict[str, dict[str, np.ndarray]],
                  batches: list[dict]) -> dict[str, float]:
    """Relative output noise of ``model`` with one probe's tensors replaced at a time.

    Args:
        model: the model with its original weights as initializers.
        probes: probe key -> {initializer name: replacement value (same shape)}.
        batches: calibration batches (the first ``MAX_SAMPLES`` samples are used).

    Returns:
        probe key -> sum_outputs ||y' - y||^2 / ||y||^2 over the batches.
    """
    names = sorted({name for values in probes.values() for name in values})
    runner = validate.Runner(_as_inputs(model, names), optimization="basic")
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                 if t.name in names}
    noise = dict.fromkeys(probes, 0.0)
    power = 0.0
    try:
        for batch in first_samples(batches, MAX_SAMPLES):
            ref = runner.run_batch({**batch, **originals})
            power += sum(float(np.sum(np.square(v, dtype=np.float64))) for v in ref.values())
            for key, values in probes.items():
                got = runner.run_batch({**batch, **originals, **values})
                noise[key] += sum(float(np.sum(np.square(got[n] - ref[n], dtype=np.float64)))
                                  for n in ref)
    finally:
        runner.close()
    return {k: v / max(power, 1e-30) for k, v in noise.items()}


def _as_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``names`` are graph inputs instead."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names)
    kept = [t for t in out.graph.initializer if t.name not in wanted]
    moved = [t for t in out.graph.initializer if t.name in wanted]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    present = {i.name for i in out.graph.input}
    for t in moved:
        if t.name not in present:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type,
                                                                 list(t.dims)))
    return out
