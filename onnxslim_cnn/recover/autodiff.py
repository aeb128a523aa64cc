"""Reverse-mode gradients of a CNN's ONNX graph in numpy, for distillation.

Why: the per-layer re-fits (least squares, OBS) fix each layer on its own; what is
left is error that several compressed layers build together. Tuning the kept weights
of all of them against the original model's outputs needs gradients through the
graph, and onnxruntime has no training build here. The CNN ops are few.

A ``Tape`` runs the graph forward in float32, keeping what each op's backward needs,
then pulls the output gradients back to the trainable initializers.

Ops: Conv (2-D; groups 1 or depthwise), Gemm, MatMul (constant right side), Relu,
Clip, Sigmoid, Softmax (both opset semantics), Add, Mul, MaxPool,
AveragePool (global window only), GlobalAveragePool, Concat, Flatten, Reshape, Shape, Constant;
Dropout and Identity pass values through (inference).

Conv as patches (im2col), per kernel offset (i, j):
    P[n, c, i, j, p] = x_pad[n, c, i*d + s*py, j*d + s*px]
    y[n, o, p] = sum_{c,i,j} W[o, c, i, j] P[n, c, i, j, p] + b[o]
    dW = sum_{n,p} dy P;   dP = W^T dy, scattered back onto x_pad (col2im)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def unsupported(model: onnx.ModelProto) -> set[str]:
    """The ops of ``model`` this module has no gradient for."""
    return {n.op_type for n in model.graph.node} - set(OPS)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _window(node, a: dict, x_shape, w_shape=None) -> dict:
    """Kernel, strides, dilations and (begin, end) pads of a 2-D Conv or pool."""
    kernel = tuple(w_shape[2:]) if w_shape is not None else tuple(a["kernel_shape"])
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(kernel) != 2:
        raise ValueError(f"{node.op_type} {node.name}: only explicit 2-D pads")
    win = {"k": kernel, "s": tuple(a.get("strides", [1, 1])),
           "d": tuple(a.get("dilations", [1, 1])), "b": pads[:2], "e": pads[2:]}
    if a.get("ceil_mode", 0):
        for ax in range(2):  # pad the end so the last (partial) window exists
            span = x_shape[2 + ax] + win["b"][ax] + win["e"][ax] - kernel[ax]
            win["e"][ax] += (-span) % win["s"][ax]
    return win


def _pad(x: np.ndarray, win: dict, fill: float = 0.0) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (win["b"][0], win["e"][0]), (win["b"][1], win["e"][1])),
                  constant_values=fill)


def _out_size(padded_shape, win: dict) -> tuple[int, int]:
    return tuple((padded_shape[2 + ax] - win["d"][ax] * (win["k"][ax] - 1) - 1)
                 // win["s"][ax] + 1 for ax in range(2))


def _offset(xp: np.ndarray, i: int, j: int, win: dict, out: tuple[int, int]) -> np.ndarray:
    """The view of the padded input that kernel tap (i, j) reads, [N, C, Ho, Wo]."""
    (sh, sw), (dh, dw), (ho, wo) = win["s"], win["d"], out
    return xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]


def im2col(x: np.ndarray, win: dict, fill: float = 0.0):
    """(patches [N, C, kh, kw, Ho, Wo], padded shape)."""
    xp = _pad(x, win, fill)
    out = _out_size(xp.shape, win)
    cols = np.empty(x.shape[:2] + tuple(win["k"]) + out, x.dtype)
    for i in range(win["k"][0]):
        for j in range(win["k"][1]):
            cols[:, :, i, j] = _offset(xp, i, j, win, out)
    return cols, xp.shape


def col2im(dcols: np.ndarray, padded_shape, win: dict) -> np.ndarray:
    """The adjoint of im2col: patch gradients summed back onto the unpadded input."""
    dxp = np.zeros(padded_shape, dcols.dtype)
    for i in range(win["k"][0]):
        for j in range(win["k"][1]):
            _offset(dxp, i, j, win, dcols.shape[4:])[...] += dcols[:, :, i, j]
    h, w = padded_shape[2:]
    return dxp[:, :, win["b"][0]: h - win["e"][0], win["b"][1]: w - win["e"][1]]


def _unbroadcast(d: np.ndarray, shape) -> np.ndarray:
    while d.ndim > len(shape):
        d = d.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and d.shape[axis] != 1:
            d = d.sum(axis=axis, keepdims=True)
    return d


def _conv(node, a, x, w, b=None):
    win = _window(node, a, x.shape, w.shape)
    group, (n, c), o = a.get("group", 1), x.shape[:2], w.shape[0]
    if group not in (1, c) or (group == c and (w.shape[1] != 1 or o != c)):
        raise ValueError(f"Conv {node.name}: groups other than 1 or depthwise")
    if group == 1:
        # a 1x1 conv without stride or pads reads x itself: no patch copy
        cols, padded = (x[:, :, None, None], x.shape) if _pointwise(win) else im2col(x, win)
        ho, wo = cols.shape[4:]
        y = _left(w.reshape(o, -1), cols.reshape(n, -1, ho * wo)).reshape(n, o, ho, wo)
        saved = (cols, padded, win, group)
    else:  # depthwise: one multiply-add per kernel tap, no patches
        xp = _pad(x, win)
        out = _out_size(xp.shape, win)
        y = np.zeros((n, c) + out, x.dtype)
        for i in range(win["k"][0]):
            for j in range(win["k"][1]):
                y += w[:, 0, i, j].reshape(1, -1, 1, 1) * _offset(xp, i, j, win, out)
        saved = (xp, x.shape, win, group)
    return (y if b is None else y + b.reshape(1, -1, 1, 1)), saved


def _left(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """a @ x[n] for every n as one GEMM (numpy's broadcast matmul loops without BLAS,
    ~15x slower on a 1x1 conv's shapes)."""
    return np.tensordot(a, x, axes=([1], [1])).transpose(1, 0, 2)


def _pointwise(win: dict) -> bool:
    return win["k"] == (1, 1) and win["s"] == (1, 1) and not any(win["b"] + win["e"])


def _conv_back(dy, ins, saved):
    w = ins[1]
    dx, dw = (_dense_back if saved[3] == 1 else _depthwise_back)(dy, w, saved)
    return [dx, dw.reshape(w.shape)] + ([dy.sum(axis=(0, 2, 3))] if len(ins) > 2 else [])


def _dense_back(dy, w, saved):
    cols, padded, win, _ = saved
    n, o = dy.shape[:2]
    d = dy.reshape(n, o, -1)
    m = cols.reshape(n, -1, d.shape[2])
    dw = np.tensordot(d, m, axes=([0, 2], [0, 2]))  # one GEMM over batch and positions
    dm = _left(w.reshape(o, -1).T, d)
    if _pointwise(win):
        return dm.reshape(padded), dw
    return col2im(dm.reshape(cols.shape), padded, win), dw


def _depthwise_back(dy, w, saved):
    xp, shape, win, _ = saved
    dxp, dw = np.zeros_like(xp), np.empty(w.shape[:1] + tuple(win["k"]), dy.dtype)
    out = dy.shape[2:]
    for i in range(win["k"][0]):
        for j in range(win["k"][1]):
            dw[:, i, j] = np.einsum("nchw,nchw->c", dy, _offset(xp, i, j, win, out))
            _offset(dxp, i, j, win, out)[...] += w[:, 0, i, j].reshape(1, -1, 1, 1) * dy
    h, wd = xp.shape[2:]
    return dxp[:, :, win["b"][0]: h - win["e"][0], win["b"][1]: wd - win["e"][1]], dw


def _gemm(node, a, x, w, b=None):
    if a.get("transA", 0):
        x = x.T
    w = w.T if a.get("transB", 0) else w
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    y = alpha * (x @ w)
    return (y if b is None else y + beta * b), (x, w, alpha, beta, a)


def _gemm_back(dy, ins, saved):
    x, w, alpha, beta, a = saved
    dx, dw = alpha * dy @ w.T, alpha * x.T @ dy
    grads = [dx.T if a.get("transA", 0) else dx, dw.T if a.get("transB", 0) else dw]
    return grads + ([beta * _unbroadcast(dy, ins[2].shape)] if len(ins) > 2 else [])


def _maxpool(node, a, x):
    win = _window(node, a, x.shape)
    cols, padded = im2col(x, {**win, "d": tuple(a.get("dilations", [1, 1]))}, -np.inf)
    n, c, kh, kw, ho, wo = cols.shape
    flat = cols.reshape(n, c, kh * kw, ho, wo)
    idx = flat.argmax(axis=2)[:, :, None]
    return np.take_along_axis(flat, idx, 2)[:, :, 0], (idx, cols.shape, padded, win)


def _maxpool_back(dy, ins, saved):
    idx, shape, padded, win = saved
    dflat = np.zeros((shape[0], shape[1], shape[2] * shape[3]) + shape[4:], dy.dtype)
    np.put_along_axis(dflat, idx, dy[:, :, None], 2)
    return [col2im(dflat.reshape(shape), padded, win)]


def _avgpool(node, a, x):
    if node.op_type == "AveragePool" and (tuple(a["kernel_shape"]) != x.shape[2:]
                                          or any(a.get("pads", []))):
        raise ValueError(f"AveragePool {node.name}: only a window over the whole map")
    return x.mean(axis=(2, 3), keepdims=True), x.shape


def _clip(node, a, x, lo=None, hi=None):
    lo = a.get("min", -np.inf) if lo is None else lo
    hi = a.get("max", np.inf) if hi is None else hi
    return np.clip(x, lo, hi), (x > lo) & (x < hi)


def _reshape(node, a, x, shape=None):
    if node.op_type == "Flatten":
        axis = a.get("axis", 1)
        return x.reshape(int(np.prod(x.shape[:axis])), -1), x.shape
    dims = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape)]
    return x.reshape(dims), x.shape


def _sigmoid(node, a, x):
    y = 1.0 / (1.0 + np.exp(-x))
    return y, y


def _concat(node, a, *xs):
    axis = a["axis"]
    return np.concatenate(xs, axis=axis), (axis, [x.shape[axis] for x in xs])


def _concat_back(dy, ins, saved):
    axis, sizes = saved
    return np.split(dy, np.cumsum(sizes)[:-1], axis=axis)


def _matmul(node, a, x, w):
    return x @ w, (x, w)


def _matmul_back(dy, ins, saved):
    x, w = saved
    return [dy @ np.swapaxes(w, -1, -2),
            _unbroadcast(np.swapaxes(x, -1, -2) @ dy, w.shape)]


def _softmax(node, a, x):
    """Opset 13+: along ``axis``; before: over the dims from ``axis`` (default 1) on."""
    shape = x.shape
    if a.get("_before_13"):
        x = x.reshape(int(np.prod(shape[:a.get("axis", 1)])), -1)
    axis = -1 if a.get("_before_13") else a.get("axis", -1)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return y.reshape(shape), (y, axis)


def _softmax_back(dy, ins, saved):
    y, axis = saved
    d = dy.reshape(y.shape)
    return [(y * (d - np.sum(d * y, axis=axis, keepdims=True))).reshape(dy.shape)]


def _same(node, a, x, *rest):
    return x, None


# op -> (forward(node, attrs, *inputs) -> (y, saved), backward(dy, inputs, saved) -> grads)
OPS = {
    "Conv": (_conv, _conv_back),
    "Gemm": (_gemm, _gemm_back),
    "MatMul": (_matmul, _matmul_back),
    "Relu": (lambda node, a, x: (np.maximum(x, 0), x > 0), lambda dy, ins, m: [dy * m]),
    "Clip": (_clip, lambda dy, ins, m: [dy * m]),
    "Sigmoid": (_sigmoid, lambda dy, ins, y: [dy * y * (1 - y)]),
    "Add": (lambda node, a, x, y: (x + y, None),
            lambda dy, ins, s: [_unbroadcast(dy, ins[0].shape), _unbroadcast(dy, ins[1].shape)]),
    "Mul": (lambda node, a, x, y: (x * y, None),
            lambda dy, ins, s: [_unbroadcast(dy * ins[1], ins[0].shape),
                                _unbroadcast(dy * ins[0], ins[1].shape)]),
    "MaxPool": (_maxpool, _maxpool_back),
    "AveragePool": (_avgpool, lambda dy, ins, shape: [
        np.broadcast_to(dy / (shape[2] * shape[3]), shape)]),
    "GlobalAveragePool": (_avgpool, lambda dy, ins, shape: [
        np.broadcast_to(dy / (shape[2] * shape[3]), shape)]),
    "Concat": (_concat, _concat_back),
    "Flatten": (_reshape, lambda dy, ins, shape: [dy.reshape(shape)]),
    "Reshape": (_reshape, lambda dy, ins, shape: [dy.reshape(shape)]),
    "Constant": (lambda node, a, *ins: (numpy_helper.to_array(a["value"]) if "value" in a
                                        else np.asarray(next(iter(a.values()))), None),
                 lambda dy, ins, s: []),
    "Softmax": (_softmax, _softmax_back),
    # the wrapper an opset upgrade puts around an old Softmax reads its input's shape
    "Shape": (lambda node, a, x: (np.array(x.shape[a.get("start", 0):a.get("end")], np.int64),
                                  None), lambda dy, ins, s: []),
    "Dropout": (_same, lambda dy, ins, s: [dy]),
    "Identity": (_same, lambda dy, ins, s: [dy]),
}


class Tape:
    """Forward and backward passes of ``model`` with ``params`` overriding its
    initializers (the trainable ones, float32).

    Raises:
        ValueError: an op or an attribute this module cannot differentiate.
    """

    def __init__(self, model: onnx.ModelProto, params: dict[str, np.ndarray]):
        missing = unsupported(model)
        if missing:
            raise ValueError(f"no gradient for {', '.join(sorted(missing))}")
        self.nodes = list(model.graph.node)
        self.attrs = [_attrs(node) for node in self.nodes]
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     13)
        for node, a in zip(self.nodes, self.attrs, strict=True):
            if node.op_type == "Softmax" and opset < 13:
                a["_before_13"] = True
        self.consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.params = params

    def _value(self, env: dict, name: str):
        if not name:
            return None
        if name in self.params:
            return self.params[name]
        return env[name] if name in env else self.consts[name]

    def forward(self, feeds: dict[str, np.ndarray], keep: bool = True):
        """(values of every tensor, what backward needs); ``keep`` False skips the
        saved state (evaluation only)."""
        env, saved = dict(feeds), []
        for node, a in zip(self.nodes, self.attrs, strict=True):
            ins = [self._value(env, name) for name in node.input]
            while ins and ins[-1] is None:
                ins.pop()
            y, state = OPS[node.op_type][0](node, a, *ins)
            env[node.output[0]] = y
            saved.append((node, ins, state if keep else None))
        return env, saved

    def backward(self, saved, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """dL/dparam for every trainable initializer, given dL/dtensor for some tensors."""
        g, out = dict(grads), {}
        for node, ins, state in reversed(saved):
            dy = g.pop(node.output[0], None)
            if dy is None:
                continue
            for name, d in zip(node.input, OPS[node.op_type][1](dy, ins, state), strict=False):
                if d is None or not name or (name in self.consts and name not in self.params):
                    continue
                target = out if name in self.params else g
                target[name] = target[name] + d if name in target else d
        return out
