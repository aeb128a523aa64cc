"""Which layers svd-split can factorise, seen as a matrix ``M`` (out x D), and their cost.

A site is a Conv (2-D, group 1), a Gemm or a MatMul with a constant weight. Its linear
map is ``y = M x + b`` where ``x`` is the im2col patch of the input (Conv: D = C_in*kh*kw,
patch order (c, y, x) as in ``W.reshape(C_out, -1)``) or the input row (Gemm/MatMul).

Costs are multiply-accumulates per sample (MACs) and parameters:
    original:  P_out * C_out * D                            params C_out * D
    channel:   P_out * r * (D + C_out)                      params r * (D + C_out)
    spatial:   H_out*W_in*r*C_in*kh + P_out*C_out*r*kw      params r * (C_in*kh + C_out*kw)
(spatial: the k x 1 conv keeps the full input width, the 1 x k conv applies the
horizontal stride). Without known shapes P_out = 1 and W_in = W_out * stride_w.

Declines when: the weight is not constant or not float; Conv is not 2-D, is depthwise
or grouped, or uses auto_pad; Gemm uses transA or a per-row bias; MatMul's weight is not
a constant 2-D second input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..base import const_value, not_constant


@dataclass
class Site:
    """One factorisable layer.

    Attributes:
        node: the Conv/Gemm/MatMul node.
        matrix: M (out x D), float64, Gemm's alpha folded in.
        bias: b (out,), float64 (zeros when absent; Gemm's beta folded in).
        dtype: the weight's dtype (factors are cast back to it).
        c_in: input channels (Conv) or features.
        kernel: (kh, kw); (1, 1) for Gemm/MatMul.
        pads, strides, dilations: Conv geometry (pads as t, l, b, r).
        shape: (H_in, W_in, H_out, W_out) when known.
    """

    node: gs.Node
    matrix: np.ndarray
    bias: np.ndarray
    dtype: np.dtype
    c_in: int
    kernel: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    shape: tuple[int, int, int, int] | None = None

    @property
    def key(self) -> str:
        return self.node.outputs[0].name

    @property
    def name(self) -> str:
        return self.node.name or self.key

    @property
    def c_out(self) -> int:
        return self.matrix.shape[0]

    @property
    def positions(self) -> int:
        return self.shape[2] * self.shape[3] if self.shape else 1

    def cost(self, mode: str, rank: int | None = None) -> tuple[int, int]:
        """(params, MACs per sample) of the layer as it is (``mode="none"``) or split."""
        d, c_out, (kh, kw) = self.matrix.shape[1], self.c_out, self.kernel
        if mode == "none":
            return c_out * d, self.positions * c_out * d
        if mode == "channel":
            return rank * (d + c_out), self.positions * rank * (d + c_out)
        h_out, w_in = (self.shape[2], self.shape[1]) if self.shape else (1, self.strides[1])
        macs = h_out * w_in * rank * self.c_in * kh + self.positions * c_out * rank * kw
        return rank * (self.c_in * kh + c_out * kw), macs


def find_site(node: gs.Node) -> Site | str:
    """The Site of ``node`` or the reason it cannot be factorised."""
    weight = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return not_constant(node.inputs[1]) if len(node.inputs) > 1 else "no weight input"
    if not np.issubdtype(weight.dtype, np.floating):
        return "weight is not floating point"
    return {"Conv": _conv, "Gemm": _gemm, "MatMul": _matmul}[node.op](node, weight)


def _conv(node: gs.Node, w: np.ndarray) -> Site | str:
    if w.ndim != 4:
        return "Conv is not 2-D"
    group = int(node.attrs.get("group", 1))
    if group > 1:
        return "depthwise conv" if w.shape[1] == 1 else "grouped conv (group > 1)"
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return "Conv uses auto_pad"
    bias = _vector(node, 2, w.shape[0], 1.0)
    if isinstance(bias, str):
        return bias
    attr = node.attrs
    return Site(node, w.reshape(w.shape[0], -1).astype(np.float64), bias, w.dtype, w.shape[1],
                kernel=(w.shape[2], w.shape[3]),
                pads=tuple(int(p) for p in attr.get("pads", (0, 0, 0, 0))),
                strides=tuple(int(s) for s in attr.get("strides", (1, 1))),
                dilations=tuple(int(d) for d in attr.get("dilations", (1, 1))),
                shape=_shape(node))


def _gemm(node: gs.Node, w: np.ndarray) -> Site | str:
    if node.attrs.get("transA", 0):
        return "Gemm uses transA"
    if w.ndim != 2:
        return "Gemm weight is not 2-D"
    m = w.astype(np.float64) * float(node.attrs.get("alpha", 1.0))
    m = m if node.attrs.get("transB", 0) else m.T
    bias = _vector(node, 2, m.shape[0], float(node.attrs.get("beta", 1.0)))
    if isinstance(bias, str):
        return bias
    return Site(node, m, bias, w.dtype, m.shape[1])


def _matmul(node: gs.Node, w: np.ndarray) -> Site | str:
    if w.ndim != 2:
        return "MatMul weight is not 2-D"
    return Site(node, w.T.astype(np.float64), np.zeros(w.shape[1]), w.dtype, w.shape[0])


def _vector(node: gs.Node, index: int, channels: int, scale: float) -> np.ndarray | str:
    """Bias input ``index`` as float64 (channels,), times ``scale``; zeros when absent."""
    if len(node.inputs) <= index or node.inputs[index].name == "":
        return np.zeros(channels)
    value = const_value(node.inputs[index])
    if value is None:
        return "bias is not constant"
    if value.size not in (1, channels) or (value.ndim == 2 and value.shape[0] != 1):
        return "bias is not one value per output channel"
    return np.broadcast_to(value.astype(np.float64).reshape(-1) * scale, (channels,)).copy()


def _shape(node: gs.Node) -> tuple[int, int, int, int] | None:
    """(H_in, W_in, H_out, W_out) when both spatial shapes are known integers."""
    dims = []
    for tensor in (node.inputs[0], node.outputs[0]):
        shape = tensor.shape
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
            return None
        dims += list(shape[2:])
    return tuple(dims)
