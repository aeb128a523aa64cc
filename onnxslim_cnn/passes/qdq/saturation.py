"""Per-channel weight ranges that cannot overflow onnxruntime's AVX2 int8 kernels.

On x86 CPUs without VNNI, onnxruntime's u8 x s8 GEMM (used by QLinearConv, QGemm,
QLinearMatMul) multiplies activation bytes by weight bytes with ``vpmaddubsw``, which
adds each *pair* of neighbouring products along the reduction axis K into a saturating
int16. With full 8-bit weights, 255 * 127 * 2 = 64770 > 32767, so real data can clip and
the int8 model computes something else. ``reduce_range`` (7-bit weights everywhere)
avoids it but loses precision in every layer.

Here each output channel n gets the largest weight range q_n <= 127 such that for every
pair (k, k+1) of the reduction axis (onnxruntime packs K as (kh, kw, c_in) for convs):
    max(sum_{j in pair} a_j * max(w_j, 0), sum_{j in pair} a_j * max(-w_j, 0)) <= 32767
where a_j is the largest uint8 activation level of input channel j seen in calibration
(at least the zero point, which padding produces). Products of opposite sign cannot
saturate a pair, so only same-sign sums count.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

INT16_MAX = 32767
MIN_QMAX = 63  # 7-bit weights never saturate: 255 * 64 * 2 < 32767


def reduction_matrix(w: np.ndarray, kind: str) -> np.ndarray:
    """Weights as [C_out, K] in onnxruntime's K order for ``kind`` conv/gemm_t/gemm."""
    if kind == "conv":
        return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1) if w.ndim == 4 else \
            w.transpose(0, *range(2, w.ndim), 1).reshape(w.shape[0], -1)
    return w if kind == "gemm_t" else w.T


def activation_levels(w: np.ndarray, kind: str, levels: np.ndarray, group: int) -> np.ndarray:
    """Largest activation level for every (output channel, K) element."""
    if kind != "conv":
        return np.broadcast_to(levels[None, :], (w.shape[1] if kind == "gemm" else w.shape[0],
                                                levels.shape[0]))
    c_out, c_in_g = w.shape[0], w.shape[1]
    taps = int(np.prod(w.shape[2:]))
    per_group = levels.reshape(group, c_in_g)
    rows = per_group[np.arange(c_out) // (c_out // group)]
    return np.tile(rows, (1, taps))


def safe_qmax(wk: np.ndarray, ak: np.ndarray, qmax: int = 127) -> np.ndarray:
    """Per output channel, the largest q in [MIN_QMAX, qmax] whose pairs cannot saturate.

    Args:
        wk: float weights [C_out, K] in kernel K order.
        ak: activation levels [C_out, K] (uint8 values the kernel will see).
    """
    absmax = np.abs(wk).max(axis=1)
    absmax[absmax == 0] = 1.0
    chosen = np.full(wk.shape[0], MIN_QMAX, dtype=np.int64)
    open_ = np.ones(wk.shape[0], dtype=bool)
    for q in range(qmax, MIN_QMAX, -1):
        wq = np.round(wk[open_] / absmax[open_, None] * q)
        ok = pair_bound(wq, ak[open_]) <= INT16_MAX
        idx = np.flatnonzero(open_)[ok]
        chosen[idx] = q
        open_[idx] = False
        if not open_.any():
            break
    return chosen


def pair_bound(wq: np.ndarray, ak: np.ndarray) -> np.ndarray:
    """Per output channel, the largest same-sign pair sum the kernel can meet."""
    if wq.shape[1] % 2:
        wq = np.pad(wq, ((0, 0), (0, 1)))
        ak = np.pad(ak, ((0, 0), (0, 1)))
    prod_pos = (ak * np.maximum(wq, 0)).reshape(wq.shape[0], -1, 2).sum(axis=2)
    prod_neg = (ak * np.maximum(-wq, 0)).reshape(wq.shape[0], -1, 2).sum(axis=2)
    return np.maximum(prod_pos, prod_neg).max(axis=1)


@functools.cache
def host_kernel_saturates() -> bool:
    """Does this machine's onnxruntime int8 kernel clip pair sums to int16?

    A 1x1 QLinearConv whose 16 products are all 255 * 127: the exact int32 sum is 518160
    (253 after the 1/2048 output scale); saturating kernels clip each pair's 64770 to
    32767 and give 8 * 32767 = 262136 (128). VNNI / AVX-512 VNNI / ARM dot-product kernels sum
    in int32 and agree with the exact value; the result also goes into the report, since
    an int8 file is often built on one machine and deployed on another.
    """
    k = 16
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz",
                                               "ys", "yz"], ["y"])],
        "probe", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8,
                                                     [1, k, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, None)],
        [numpy_helper.from_array(np.float32(1.0), "xs"),
         numpy_helper.from_array(np.uint8(0), "xz"),
         numpy_helper.from_array(np.full((1, k, 1, 1), 127, np.int8), "w"),
         numpy_helper.from_array(np.float32(1.0), "ws"),
         numpy_helper.from_array(np.int8(0), "wz"),
         numpy_helper.from_array(np.float32(2048.0), "ys"),
         numpy_helper.from_array(np.uint8(0), "yz")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": np.full((1, k, 4, 4), 255, np.uint8)})[0]
    exact = round(k * 255 * 127 / 2048.0)
    return int(np.abs(y.astype(np.int64) - exact).max()) > 0
