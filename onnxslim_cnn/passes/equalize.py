"""Cross-layer equalization of activation channel ranges (lossless in float).

Why: int8 activations have one scale per tensor. When a tensor's channels span very
different ranges, the small channels get only a few of the 256 levels. Scaling channel
c of the producing Conv by s_c and the consumers' input channel c by 1/s_c leaves the
float function unchanged (ReLU, MaxPool, AveragePool and Concat commute with positive
per-channel scales) and evens the ranges out (Nagel et al. 2019 balance weight ranges;
here, as in SmoothQuant, the activation ranges measured on calibration data are
balanced against the consumers' weights).

Before:  P(W_p, b_p) -> Relu -> [MaxPool] -> [Concat] -> X -> C(W_c)
After:   P(s * W_p, s * b_p) -> ... -> X' = s * X -> C(W_c / s)
Math: r_c = max of channel c of X on the calibration data, R = max_c r_c,
      s_c = clip((R / r_c) ** alpha, 1 / MAX_SCALE, MAX_SCALE).

Declines when: a path op is not scale-homogeneous (Clip/ReLU6, Sigmoid, Add ...);
an intermediate tensor has a consumer outside the site; a consumer is not a Conv with a
constant weight and group 1 (or a Gemm after Flatten is not handled); no calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .base import (
    Pass,
    PassContext,
    PassResult,
    const_value,
    register,
    taken_names,
    unique_name,
)
from .qdq.calibrate import collect

HOMOGENEOUS = {"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Identity"}
MAX_SCALE = 16.0


@dataclass(frozen=True)
class EqualizeOptions:
    """alpha: 0 leaves ranges alone, 1 equalises channel ranges fully."""

    equalize_alpha: float = 0.5


@dataclass
class Site:
    tensor: gs.Tensor
    producers: list[tuple[gs.Node, int]] = field(default_factory=list)
    consumers: list[gs.Node] = field(default_factory=list)
    inner: list[gs.Tensor] = field(default_factory=list)


@register
class Equalize(Pass):
    name = "equalize"
    summary = "cross-layer equalization of activation channel ranges for int8 (lossless)"
    lossless = True
    after = ("fold-bn",)
    Options = EqualizeOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        sites = _sites(graph, result)
        if not sites or not ctx.calib:
            if sites:
                result.declined["no calibration data"] += len(sites)
            return result
        model = gs.export_onnx(graph, do_type_check=False)
        names = [s.tensor.name for s in sites]
        stats = collect(model, names, ctx.calib, [], ctx.progress)
        taken = taken_names(graph)
        for site in sites:
            scale = _scales(stats[site.tensor.name].channel_max, self.options.equalize_alpha)
            if scale is not None:
                _apply(site, scale, taken)
                result.stats["tensors_equalized"] = result.stats.get("tensors_equalized", 0) + 1
                result.changed = True
        return result


def _sites(graph: gs.Graph, result: PassResult) -> list[Site]:
    outputs = {t.name for t in graph.outputs}
    sites, seen = [], set()
    for node in graph.nodes:
        if node.op != "Conv" or node.inputs[0].name in seen:
            continue
        tensor = node.inputs[0]
        seen.add(tensor.name)
        site = Site(tensor)
        reason = _consumers(site, outputs) or _trace(site, tensor, 0, outputs, top=True)
        if reason:
            result.declined[reason] += 1
        else:
            sites.append(site)
    return sites


def _consumers(site: Site, outputs: set[str]) -> str | None:
    if site.tensor.name in outputs:
        return "tensor is a graph output"
    for node in site.tensor.outputs:
        w = const_value(node.inputs[1]) if node.op == "Conv" else None
        if w is None or int(node.attrs.get("group", 1)) != 1:
            return "a consumer is not a plain Conv with a constant weight"
        site.consumers.append(node)
    return None


def _trace(site: Site, tensor: gs.Tensor, offset: int, outputs: set[str],
           top: bool = False) -> str | None:
    if not top and (len(tensor.outputs) != 1 or tensor.name in outputs):
        return "an intermediate tensor has other consumers"
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return "tensor is not computed by a Conv path"
    site.inner.append(tensor)
    if producer.op == "Conv" and const_value(producer.inputs[1]) is not None:
        site.producers.append((producer, offset))
        return None
    if producer.op in HOMOGENEOUS:
        return _trace(site, producer.inputs[0], offset, outputs)
    if producer.op == "Concat" and int(producer.attrs.get("axis", 0)) in (1, -3):
        return _trace_concat(site, producer, offset, outputs)
    return f"{producer.op} between the layers is not scale-homogeneous"


def _trace_concat(site: Site, concat: gs.Node, offset: int, outputs: set[str]) -> str | None:
    for part in concat.inputs:
        reason = _trace(site, part, offset, outputs)
        if reason:
            return reason
        offset += _channels(site.producers[-1][0])
    return None


def _channels(conv: gs.Node) -> int:
    return int(const_value(conv.inputs[1]).shape[0])


def _scales(channel_max: np.ndarray | None, alpha: float) -> np.ndarray | None:
    if channel_max is None or alpha <= 0:
        return None
    r = np.maximum(channel_max.astype(np.float64), 0.0)
    top = float(r.max())
    if top <= 0:
        return None
    safe = np.where(r > 0, r, top)
    return np.clip((top / safe) ** alpha, 1 / MAX_SCALE, MAX_SCALE)


def _apply(site: Site, scale: np.ndarray, taken: set[str]) -> None:
    total = sum(_channels(p) for p, _ in site.producers)
    if total != scale.shape[0]:
        return
    for producer, offset in site.producers:
        part = scale[offset:offset + _channels(producer)]
        _rescale(producer, 1, part, 0, taken)
        if len(producer.inputs) > 2 and const_value(producer.inputs[2]) is not None:
            _rescale(producer, 2, part, 0, taken)
    for consumer in site.consumers:
        _rescale(consumer, 1, 1.0 / scale, 1, taken)


def _rescale(node: gs.Node, index: int, factor: np.ndarray, axis: int,
             taken: set[str]) -> None:
    """Replace input ``index`` of ``node`` by a new constant scaled along ``axis``."""
    old = node.inputs[index]
    value = const_value(old)
    shape = [1] * value.ndim
    shape[axis] = -1
    new = (value.astype(np.float64) * factor.reshape(shape)).astype(value.dtype)
    # The new constant takes the old name when nothing else reads the old one.
    name = old.name
    if len(old.outputs) == 1:
        old.name = unique_name(taken, name + "_pre_eq")
    else:
        name = unique_name(taken, name + "_eq")
    node.inputs[index] = gs.Constant(name, new)
