"""Materialise a quantization Plan: Q/DQ pairs, int8 weights, int32 biases.

Before:  x -> Conv(W, b) -> y
After:   x -> Q(s_x, z_x) -> DQ -> Conv(DQ(W_q, s_w), DQ(b_q, s_x*s_w)) -> y

Math:
    activations  x_q = clip(round(x / s_x) + z_x, 0, 255)            (uint8, per tensor)
    weights      W_q[n] = clip(round(W[n] / s_w[n]), -q_n, q_n),  s_w[n] = max|W[n]| / q_n
                 (int8 per output channel; q_n = 127, or less where ``saturation`` says)
    bias         b_q[n] = round(b'[n] / (s_x s_w[n]))                 (int32, zero point 0)
    bias correction: b'[n] = b[n] - sum_k (DQ(W_q) - W)[n, k] E[x_k], which cancels the
    mean output shift the weight rounding causes (Nagel et al. 2019, analytic form).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..base import const_value, unique_name
from . import saturation
from .bias_correct import BiasHandle
from .calibrate import TensorStats
from .placement import BiasSite, WeightSite


@dataclass(frozen=True)
class QParams:
    """Grid of one activation tensor; ``levels``: the uint8 levels its range spans."""

    scale: np.float32
    zero: np.generic
    levels: int = 255


@dataclass
class WeightQuant:
    q: np.ndarray
    scale: np.ndarray
    qmax: np.ndarray
    dequant: np.ndarray
    table: np.ndarray | None = None  # int8 codebook of a codebook weight (its shape)


def quantize_weight(w: np.ndarray, axis: int, qmax: np.ndarray) -> WeightQuant:
    """Symmetric per-channel int8 quantization of ``w`` along ``axis``."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    absmax = np.abs(flat).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    q = np.clip(np.round(flat / scale[:, None]), -qmax[:, None], qmax[:, None])
    deq = (q * scale[:, None]).reshape(moved.shape)
    return WeightQuant(
        q=np.moveaxis(q.reshape(moved.shape), 0, axis).astype(np.int8),
        scale=scale.astype(np.float32), qmax=qmax,
        dequant=np.moveaxis(deq, 0, axis),
    )


def weight_quant_from(w: np.ndarray, axis: int, q_rows: np.ndarray, scale: np.ndarray,
                      qmax: np.ndarray) -> WeightQuant:
    """WeightQuant of integer rows ``q_rows`` [C, rest] (channel axis first) for ``w``."""
    moved_shape = np.moveaxis(w, axis, 0).shape
    q = q_rows.reshape(moved_shape)
    deq = q * scale.astype(np.float64).reshape(-1, *([1] * (q.ndim - 1)))
    return WeightQuant(q=np.moveaxis(q, 0, axis).astype(np.int8),
                       scale=scale.astype(np.float32), qmax=qmax,
                       dequant=np.moveaxis(deq, 0, axis))


def quantize_codebook(site: WeightSite, w: np.ndarray, qmax: np.ndarray, act: QParams | None,
                      stats: TensorStats | None, avoid_saturation: bool) -> WeightQuant:
    """Int8 grid of a cluster-weights codebook: its entries are rounded, its packed
    indices kept (so the weight stays a few bits per value in the file).

    A per-channel codebook gets per-channel scales as ``quantize_weight``. A shared
    one gets one step u = max|codebook| / min_n q_n, so that its int8 entries fit every
    channel's bound, and channel n the scale u (times the codebook's scale of channel n
    when it is scaled per channel). Where the AVX2 pair sums could still saturate the bound is
    lowered further. ``Materializer.weight`` writes the int8 codebook.
    """
    found = site.codebook
    table = np.asarray(found.table.values, np.float64)
    channels = w.shape[site.axis]
    rows = np.moveaxis(w.astype(np.float64), site.axis, 0).reshape(channels, -1)
    qmax = np.asarray(qmax, np.int64).copy()
    per_channel = found.channels is not None
    while True:
        if per_channel:
            absmax = np.abs(table.reshape(channels, -1)).max(axis=1)
            scale = np.where(absmax > 0, absmax / qmax, 1.0)
        else:
            qmax[:] = qmax.min()
            top = np.abs(table).max()
            unit = top / qmax[0] if top > 0 else 1.0
            scale = unit * (np.ones(channels) if found.scale is None else
                            found.scale.astype(np.float64))
        q = np.clip(np.round(rows / scale[:, None]), -qmax[:, None], qmax[:, None])
        wq = weight_quant_from(w, site.axis, q, scale, qmax)
        bad = saturating_rows(site, wq, act, stats) if avoid_saturation else None
        if bad is None or not bad.any() or qmax.min() <= 1:
            entries, step, top = (table.reshape(channels, -1), scale, qmax) if per_channel \
                else (table[None], np.array([unit]), qmax[:1])
            wq.table = np.clip(np.round(entries / step[:, None]), -top[:, None],
                               top[:, None]).astype(np.int8).reshape(table.shape)
            return wq
        qmax[bad] -= 1


def saturating_rows(site: WeightSite, wq: WeightQuant, act: QParams | None,
                    stats: TensorStats | None) -> np.ndarray:
    """Output channels whose integer weights could saturate the AVX2 pair sums."""
    if site.depthwise or act is None or stats is None or stats.channel_max is None:
        return np.zeros(wq.scale.shape[0], dtype=bool)
    kind = kernel_kind(site)
    levels = np.clip(np.round(stats.channel_max / float(act.scale)) + int(act.zero), 0, 255)
    levels = np.maximum(levels, int(act.zero))
    group = int(site.node.attrs.get("group", 1)) if kind == "conv" else 1
    ak = saturation.activation_levels(wq.q, kind, levels, group)
    wk = saturation.reduction_matrix(wq.q.astype(np.float64), kind)
    return saturation.pair_bound(wk, ak) > saturation.INT16_MAX


class Materializer:
    """Inserts the nodes of one Plan into one graph; names derive from source names."""

    def __init__(self, graph: gs.Graph, taken: set[str]):
        self.graph = graph
        self.taken = taken
        self.biases: dict[str, BiasHandle] = {}

    def _const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(self.taken, base), np.asarray(value))

    def _node(self, op: str, base: str, inputs: list, out_dtype, attrs=None) -> gs.Variable:
        # Node and output share one name: names are repeated in the file, keep them short.
        out = gs.Variable(unique_name(self.taken, base), dtype=out_dtype)
        self.graph.nodes.append(gs.Node(op, out.name, attrs or {}, inputs, [out]))
        return out

    def activation(self, tensor: gs.Tensor, params: QParams,
                   reads: list[tuple[gs.Node, int]]) -> None:
        scale = self._const(f"{tensor.name}_s", np.array(params.scale, np.float32))
        zero = self._const(f"{tensor.name}_z", np.array(params.zero))
        q = self._node("QuantizeLinear", f"{tensor.name}_q", [tensor, scale, zero],
                       np.array(params.zero).dtype)
        dq = self._node("DequantizeLinear", f"{tensor.name}_dq", [q, scale, zero], np.float32)
        for node, index in reads:
            node.inputs[index] = dq

    def weight(self, site: WeightSite, wq: WeightQuant) -> None:
        if site.codebook is not None:
            self._codebook(site, wq)
            return
        source = site.node.inputs[site.index]
        name = source.name
        q = self._const(f"{name}_q", wq.q)
        scale = self._const(f"{name}_s", wq.scale)
        zero = self._const(f"{name}_z", np.zeros(wq.scale.shape, np.int8))
        dq = self._node("DequantizeLinear", f"{name}_dq", [q, scale, zero], np.float32,
                        {"axis": site.axis})
        site.node.inputs[site.index] = dq

    def _codebook(self, site: WeightSite, wq: WeightQuant) -> None:
        """Gather(codebook_f32, idx) [-> Mul(channel scale)] [-> Cast] -> W  becomes
        DQ(Gather(codebook_i8, idx), s) -> W (the channel scale folded into s):
        onnxruntime folds the Gather at load and fuses the DQ into its int8 kernel."""
        found = site.codebook
        per_channel = found.channels is not None or found.scale is not None
        scale = wq.scale if per_channel else wq.scale[:1].reshape(())
        found.gather.inputs[0] = self._const(f"{found.table.name}_q", wq.table)
        decoded = found.gather.outputs[0]
        decoded.dtype = np.int8
        # the Mul's scale is in the DequantizeLinear's now; the DequantizeLinear writes
        # the float the (upcast) Cast of a float16 weight's decode wrote
        for node in (n for n in (found.mul, found.cast) if n is not None):
            node.inputs.clear()
            node.outputs.clear()
            self.graph.nodes.remove(node)
        zero = np.zeros(np.shape(scale), np.int8)
        dq = self._node("DequantizeLinear", f"{decoded.name}_dq",
                        [decoded, self._const(f"{decoded.name}_s", scale),
                         self._const(f"{decoded.name}_z", zero)], np.float32,
                        {"axis": site.axis} if per_channel else None)
        site.node.inputs[site.index] = dq

    def bias(self, site: BiasSite, bias: np.ndarray, act: QParams, wq: WeightQuant) -> None:
        name = site.node.inputs[site.index].name
        scale = (np.float64(act.scale) * wq.scale.astype(np.float64)).astype(np.float32)
        q = np.clip(np.round(bias / scale.astype(np.float64)), -(2**31) + 1, 2**31 - 1)
        qc = self._const(f"{name}_q", q.astype(np.int32))
        sc = self._const(f"{name}_s", scale)
        # The int32 zero point is optional (0); onnxruntime fuses without it.
        dq = self._node("DequantizeLinear", f"{name}_dq", [qc, sc], np.float32, {"axis": 0})
        site.node.inputs[site.index] = dq
        self.biases[site.node.outputs[0].name] = BiasHandle(self.graph.nodes[-1], scale)


def kernel_kind(site: WeightSite) -> str:
    if site.node.op == "Conv":
        return "conv"
    return "gemm_t" if site.axis == 0 else "gemm"


def weight_qmax(site: WeightSite, w: np.ndarray, act: QParams | None, stats: TensorStats | None,
                base_qmax: int, avoid_saturation: bool) -> np.ndarray:
    """Per-channel q_n: ``base_qmax``, lowered where the int16 pair sums could saturate."""
    channels = w.shape[site.axis]
    if site.depthwise or not avoid_saturation or act is None or stats is None \
            or stats.channel_max is None:
        return np.full(channels, base_qmax, dtype=np.int64)
    kind = kernel_kind(site)
    levels = np.clip(np.round(stats.channel_max / float(act.scale)) + int(act.zero), 0, 255)
    levels = np.maximum(levels, int(act.zero))
    group = int(site.node.attrs.get("group", 1)) if kind == "conv" else 1
    ak = saturation.activation_levels(w, kind, levels, group)
    wk = saturation.reduction_matrix(w, kind)
    return saturation.safe_qmax(wk, ak, base_qmax)


def corrected_bias(site: BiasSite, bias: np.ndarray, wq: WeightQuant, w: np.ndarray,
                   stats: TensorStats | None) -> np.ndarray:
    """``bias`` minus the mean output shift the weight rounding causes."""
    if stats is None or stats.channel_mean is None:
        return bias
    mean = stats.channel_mean
    delta = wq.dequant - w.astype(np.float64)
    if site.node.op == "Conv":
        group = int(site.node.attrs.get("group", 1))
        c_out, c_in_g = delta.shape[0], delta.shape[1]
        if mean.shape[0] != c_in_g * group:
            return bias
        per_out = mean.reshape(group, c_in_g)[np.arange(c_out) // (c_out // group)]
        taps = delta.reshape(c_out, c_in_g, -1).sum(axis=2)
        return bias - np.sum(taps * per_out, axis=1)
    matrix = delta.T if site.weight.axis == 1 else delta
    if mean.shape[0] != matrix.shape[1]:
        return bias
    return bias - matrix @ mean


def bias_value(site: BiasSite) -> np.ndarray | None:
    value = const_value(site.node.inputs[site.index])
    return None if value is None else value.astype(np.float64).reshape(-1)
