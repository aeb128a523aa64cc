"""How much of a layer's output error reaches the model output: weights for allocate.

allocate.py minimises sum_l e_l(s_l), the layers' relative output errors. That treats
an error in the classifier, which lands on the logits as it is, like the same error
in an early layer, which later layers and ReLUs partly absorb; on SqueezeNet 1.1 with
the classifier included it gave the classifier (41 % of the weights) 70 % sparsity and
lost 9 points of top-1. Here each layer's error is measured once where it matters:
    r_l = ||y_l - y||^2 / ||y||^2  /  e_l(s0)
with y the model output, y_l the output with only layer l masked at s0 = REACH_LEVEL
(magnitude mask, no recovery: the same mask as the curve's point e_l(s0)), on a few
calibration batches; the allocation then minimises sum_l r_l e_l(s_l). One forward of
REACH_SAMPLES images per layer. ``network_curves`` measures whole curves this way
(allocation ``network``).
"""

from __future__ import annotations

from itertools import repeat

import numpy as np
import onnx
from onnx import numpy_helper

from ... import validate
from . import allocate, gram, obs

REACH_LEVEL = 0.5
REACH_SAMPLES = 16
# sparsities at which ``network_curves`` measures each layer (interpolated in between)
NETWORK_LEVELS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def reach(model: onnx.ModelProto, layers: list[gram.Layer], curves: list[np.ndarray],
          scores: list[np.ndarray], batches: list[dict], progress=lambda m: None
          ) -> list[float]:
    """r_l per layer (1.0 where the weight is no initializer of ``model``)."""
    at = int(np.argmin(np.abs(allocate.GRID - REACH_LEVEL)))
    reference = _outputs(model, batches)
    found = {init.name: i for i, init in enumerate(model.graph.initializer)}
    out = []
    for i, (layer, curve, score) in enumerate(zip(layers, curves, scores, strict=True)):
        progress(f"prune-weights: reach of layer {i + 1}/{len(layers)} {layer.name}")
        name = layer.node.inputs[1].name
        if name not in found or curve[at] <= 0:
            out.append(1.0)
            continue
        keep = layer.unmatrix(allocate.keep_mask(score, allocate.GRID[at]))
        probe = _with_initializer(model, found[name], np.where(keep, layer.weight, 0))
        out.append(_relative_error(_outputs(probe, batches), reference) / curve[at])
    return out


def network_curves(model: onnx.ModelProto, layers: list[gram.Layer], grams: dict,
                   batches: list[dict], progress=lambda m: None) -> list[np.ndarray]:
    """E_l(s) on allocate.GRID: the relative model-output error with only layer l pruned
    to s *with* the OBS update (obs.prune, its mask and compensation; the joint re-fit is
    left out), measured at NETWORK_LEVELS and interpolated linearly, E_l(0) = 0.

    Where ``reach`` scales a layer's own error curve by one measurement at REACH_LEVEL
    (masking, no recovery), this measures what allocation trades: the network error of
    the pruning prune-weights will do, at every level (a layer without its Gram matrix:
    magnitude pruning, as prune-weights does it). One forward of ``batches`` per
    (layer, level): prune-weights takes ~5x as long on EfficientNet-Lite0.
    """
    reference = _outputs(model, batches)
    found = {init.name: i for i, init in enumerate(model.graph.initializer)}
    out = []
    for i, layer in enumerate(layers):
        progress(f"prune-weights: network error of layer {i + 1}/{len(layers)} {layer.name}")
        h, w = grams.get(layer.name), gram.augmented(layer)
        k = layer.matrix().shape[2]
        factor = None if h is None else obs.inverse_factor(h)
        masks = repeat(None, len(NETWORK_LEVELS)) if h is not None else \
            allocate.keep_masks(np.abs(layer.matrix()), NETWORK_LEVELS)
        points = [0.0]
        for level, keep in zip(NETWORK_LEVELS, masks, strict=True):
            new = obs.prune(h, w, k, sparsity=level, factor=factor)[0] if h is not None \
                else np.where(gram.pad_keep(keep, w.shape[2]), w, 0.0)  # magnitude only
            probe = _pruned_probe(model, found, layer, new, k)
            points.append(_relative_error(_outputs(probe, batches), reference))
        out.append(np.interp(allocate.GRID, (0.0, *NETWORK_LEVELS), points))
    return out


def _pruned_probe(model, found: dict[str, int], layer: gram.Layer, new: np.ndarray, k: int
                  ) -> onnx.ModelProto:
    """``model`` with the layer's weight (and bias initializer, if any) from rows ``new``."""
    values = {found[layer.node.inputs[1].name]: layer.unmatrix(new[:, :, :k])}
    bias = layer.node.inputs[2].name if layer.bias is not None else None
    if bias in found:
        values[found[bias]] = new[:, :, k].reshape(-1)
    return _with_initializers(model, values)


def _outputs(model: onnx.ModelProto, batches: list[dict]) -> list[np.ndarray]:
    runner = validate.Runner(model, optimization="basic")
    try:
        return [np.concatenate([np.asarray(v, np.float64).reshape(len(v), -1)
                                for v in runner.run_batch(b).values()], axis=1)
                for b in batches]
    finally:
        runner.close()


def _with_initializer(model: onnx.ModelProto, index: int, value: np.ndarray
                      ) -> onnx.ModelProto:
    return _with_initializers(model, {index: value})


def _with_initializers(model: onnx.ModelProto, values: dict[int, np.ndarray]
                       ) -> onnx.ModelProto:
    """A copy of ``model`` (one copy) whose initializers at the given indices hold
    ``values``, each in that initializer's dtype (float16 stays float16)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for index, value in values.items():
        init = probe.graph.initializer[index]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        init.CopyFrom(numpy_helper.from_array(value.astype(dtype), init.name))
    return probe


def _relative_error(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    num = sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, ref, strict=True))
    return num / max(sum(float(np.sum(r ** 2)) for r in ref), 1e-30)
