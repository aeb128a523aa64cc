"""Replace one site by its two factors in the graph.

Channel:  x -> Conv(A: r x C_in x kh x kw, stride/pads/dilations) -> Conv(B: C_out x r x 1 x 1, b')
Spatial:  x -> Conv(V: r x C_in x kh x 1, vertical stride/pads/dilation)
            -> Conv(H: C_out x r x 1 x kw, horizontal stride/pads/dilation, b')
Gemm:     x -> Gemm(A, transB=1) -> Gemm(B, b', transB=1)   (A's C = 0 below opset 11)
MatMul:   x -> MatMul(A^T) -> MatMul(B^T) [-> Add(b') when b' is not zero]

The first factor has no bias: zero padding of the intermediate then equals the
original's zero padding (a zero input column gives a zero output column), which is why
the spatial split may pad each axis in its own conv. New names derive from the node's.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..base import unique_name
from .factor import Factors
from .site import Site


def install(graph: gs.Graph, site: Site, f: Factors, taken: set[str]) -> None:
    """Replace ``site.node`` by the factors ``f`` (its output tensor is kept)."""
    node, key = site.node, site.key
    base = node.name or key

    def const(suffix: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(unique_name(taken, f"{base}_{suffix}"),
                           np.ascontiguousarray(value.astype(site.dtype)))

    (op1, attrs1, extra1), (op2, attrs2, extra2) = \
        _NODES[node.op if node.op != "Conv" else f.mode](site, f, const)
    if op1 == "Gemm" and (graph.opset or 0) < 11:  # C is optional from opset 11 only
        extra1.append(const("svd_zero", np.zeros(f.rank)))
    x, y = node.inputs[0], node.outputs[0]
    # Inputs first: graphsurgeon unlinks by node equality (see remove_identity._detach).
    node.inputs.clear()
    node.outputs.clear()
    mid = gs.Variable(unique_name(taken, f"{key}_svd_mid"), dtype=site.dtype)
    out = y
    if node.op == "MatMul" and np.any(f.bias != 0):
        out = gs.Variable(unique_name(taken, f"{key}_svd_pre"), dtype=site.dtype)
        graph.nodes.append(gs.Node("Add", unique_name(taken, f"{base}_svd_bias"),
                                   inputs=[out, const("svd_bias", f.bias)], outputs=[y]))
    graph.nodes.append(gs.Node(op1, unique_name(taken, f"{base}_svd_a"), attrs1,
                               inputs=[x, *extra1], outputs=[mid]))
    graph.nodes.append(gs.Node(op2, unique_name(taken, f"{base}_svd_b"), attrs2,
                               inputs=[mid, *extra2], outputs=[out]))


def _node(op: str, attrs: dict, *extra: gs.Tensor) -> tuple[str, dict, list]:
    return op, attrs, list(extra)


def _channel(site: Site, f: Factors, const):
    kh, kw = site.kernel
    a = f.first.reshape(f.rank, site.c_in, kh, kw)
    b = f.second.reshape(site.c_out, f.rank, 1, 1)
    first = _node("Conv", _conv_attrs(site, (kh, kw), site.pads, site.strides, site.dilations),
                  const("svd_a", a))
    second = _node("Conv", {"kernel_shape": [1, 1]}, const("svd_b", b),
                   const("svd_bias", f.bias))
    return first, second


def _spatial(site: Site, f: Factors, const):
    (kh, kw), (top, left, bottom, right) = site.kernel, site.pads
    v = f.first.reshape(f.rank, site.c_in, kh, 1)
    h = f.second.reshape(f.rank, site.c_out, kw).transpose(1, 0, 2).reshape(
        site.c_out, f.rank, 1, kw)
    first = _node("Conv", _conv_attrs(site, (kh, 1), (top, 0, bottom, 0),
                                      (site.strides[0], 1), (site.dilations[0], 1)),
                  const("svd_v", v))
    second = _node("Conv", _conv_attrs(site, (1, kw), (0, left, 0, right),
                                       (1, site.strides[1]), (1, site.dilations[1])),
                   const("svd_h", h), const("svd_bias", f.bias))
    return first, second


def _conv_attrs(site: Site, kernel, pads, strides, dilations) -> dict:
    return {"kernel_shape": list(kernel), "pads": list(pads), "strides": list(strides),
            "dilations": list(dilations)}


def _gemm(site: Site, f: Factors, const):
    first = _node("Gemm", {"transB": 1}, const("svd_a", f.first))
    second = _node("Gemm", {"transB": 1}, const("svd_b", f.second), const("svd_bias", f.bias))
    return first, second


def _matmul(site: Site, f: Factors, const):
    first = _node("MatMul", {}, const("svd_a", f.first.T))
    second = _node("MatMul", {}, const("svd_b", f.second.T))
    return first, second


_NODES = {"channel": _channel, "spatial": _spatial, "Gemm": _gemm, "MatMul": _matmul}
