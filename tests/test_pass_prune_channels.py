"""prune-channels: coupling (residual Add, depthwise, Flatten -> Gemm), exactness against
the masked model, declines with reasons, least-squares recovery."""

import numpy as np
import onnx
import pytest

from onnxslim_cnn.manager import export_graph, import_graph
from onnxslim_cnn.passes.base import PassContext
from onnxslim_cnn.passes.prune.channels import PruneChannels, mask

from .helpers import (
    apply_pass,
    io_types,
    layer_params,
    make_float16,
    make_model,
    optimized_ops,
    rand,
    run,
)

# Every comparison against the masked model: float32, only the summation order
# differs, so rtol 1e-5 with atol 1e-5 relative to outputs of order 1.
RTOL = ATOL = 1e-5


def weight_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return {n.name or n.output[0]: inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm") and n.input[1] in inits}


def masked_model(model: onnx.ModelProto, result) -> onnx.ModelProto:
    graph = import_graph(model)
    assert mask(graph, {r["layer"]: r["removed"] for r in result.layers}) == len(result.layers)
    return export_graph(graph, model)


def check_exact(model, options=None, shape=(4, 4, 8, 8)):
    """Prune without recovery; assert it equals the masked original. Returns (out, result)."""
    out, result = apply_pass(PruneChannels, model, {"recovery": False, **(options or {})})
    assert result.changed
    feed = {"x": rand(shape, 42)}
    ref = run(masked_model(model, result), feed)["y"]
    np.testing.assert_allclose(run(out, feed)["y"], ref, rtol=RTOL, atol=ATOL)
    assert not np.allclose(ref, run(model, feed)["y"], rtol=1e-3, atol=1e-3)  # not a no-op
    return out, result


#  x -> A -> BN -> Relu -> B -> y
CHAIN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 6, 8, 8] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
    n = BatchNormalization (a, s, t, m, v)
    r = Relu (n)
    y = Conv <pads = [1, 1, 1, 1]> (r, wb, bb)
}
"""


def test_prune_channels_conv_bn_relu_conv_equals_masked():
    model = make_model(CHAIN, {
        "wa": rand((8, 4, 3, 3), 1, 0.3), "ba": rand((8,), 2, 0.1),
        "s": rand((8,), 3, 0.3) + 1, "t": rand((8,), 4, 0.1), "m": rand((8,), 5, 0.1),
        "v": np.abs(rand((8,), 6)) + 0.5,
        "wb": rand((6, 8, 3, 3), 7, 0.3), "bb": rand((6,), 8, 0.1)})
    out, result = check_exact(model, {"channel_ratio": 0.25, "channel_score": "l2"})
    assert weight_shapes(out) == {"a": (6, 4, 3, 3), "y": (6, 6, 3, 3)}
    bn = {i.name: tuple(i.dims) for i in out.graph.initializer}
    assert [bn[n] for n in next(n for n in out.graph.node if n.op_type ==
                                "BatchNormalization").input[1:]] == [(6,)] * 4
    assert result.stats["channels_removed"] == 2


#      x -> A -> Relu -> B -> Add -> Relu -> C -> y
#                  \_____________/^   (the residual: A's and B's channels are one space)
RESIDUAL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 5, 8, 8] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
    r = Relu (a)
    b = Conv <pads = [1, 1, 1, 1]> (r, wb, bb)
    s = Add (b, r)
    q = Relu (s)
    y = Conv (q, wc, bc)
}
"""


def test_prune_channels_residual_add_prunes_both_branches_together():
    model = make_model(RESIDUAL, {
        "wa": rand((8, 4, 3, 3), 1, 0.3), "ba": rand((8,), 2, 0.1),
        "wb": rand((8, 8, 3, 3), 3, 0.2), "bb": rand((8,), 4, 0.1),
        "wc": rand((5, 8, 1, 1), 5, 0.3), "bc": rand((5,), 6, 0.1)})
    out, result = check_exact(model, {"channel_ratio": 0.5, "channel_score": "l1"})
    assert [r["layer"] for r in result.layers] == ["a,b"]
    assert weight_shapes(out) == {"a": (4, 4, 3, 3), "b": (4, 4, 3, 3), "y": (5, 4, 1, 1)}


#  x -> A -> Clip(0, 6) -> depthwise D -> Clip -> GAP -> Flatten -> Gemm -> y
DEPTHWISE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 3] y) {
    a = Conv (x, wa, ba)
    r = Clip (a, lo, hi)
    d = Conv <pads = [1, 1, 1, 1], group = 8> (r, wd, bd)
    q = Clip (d, lo, hi)
    p = GlobalAveragePool (q)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, wg, bg)
}
"""


def test_prune_channels_depthwise_and_flatten_gemm_follow():
    model = make_model(DEPTHWISE, {
        "wa": rand((8, 4, 1, 1), 1, 0.5), "ba": rand((8,), 2, 0.2),
        "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
        "wd": rand((8, 1, 3, 3), 3, 0.5), "bd": rand((8,), 4, 0.2),
        "wg": rand((3, 8), 5, 0.5), "bg": rand((3,), 6, 0.1)})
    out, result = check_exact(model, {"channel_ratio": 0.25})
    assert weight_shapes(out) == {"a": (6, 4, 1, 1), "d": (6, 1, 3, 3), "y": (3, 6)}
    dw = next(n for n in out.graph.node if n.output[0] == "d")
    assert {a.name: a.i for a in dw.attribute}["group"] == 6


def test_prune_channels_reshape_to_rows_then_gemm_follows():
    """Inception v1's head: GlobalAveragePool -> Reshape to [N, C] by a constant target
    (C written out) -> Gemm. The target shape is rewritten with the kept count."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 8, 8] x) => (float[N, 3] y) {
        a = Conv (x, wa, ba)
        r = Relu (a)
        p = GlobalAveragePool (r)
        f = Reshape (p, shape)
        y = Gemm <transB = 1> (f, wg, bg)
    }
    """
    model = make_model(text, {"wa": rand((8, 4, 1, 1), 1, 0.5), "ba": rand((8,), 2, 0.2),
                              "shape": np.array([-1, 8], np.int64),
                              "wg": rand((3, 8), 5, 0.5), "bg": rand((3,), 6, 0.1)})
    out, _ = check_exact(model, {"channel_ratio": 0.25})
    assert weight_shapes(out) == {"a": (6, 4, 1, 1), "y": (3, 6)}
    target = next(i for i in out.graph.initializer if i.data_type == onnx.TensorProto.INT64)
    assert onnx.numpy_helper.to_array(target).tolist() == [-1, 6]


#  x -> A -> Relu \
#  x -> B -> Relu -> Concat -> BN -> MaxPool -> C -> y      (Inception's branches)
#                           \-> D -> z
INCEPTION = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 5, 4, 4] y, float[N, 3, 8, 8] z) {
    a = Conv (x, wa, ba)
    ra = Relu (a)
    b = Conv <pads = [1, 1, 1, 1]> (x, wb, bb)
    rb = Relu (b)
    k = Concat <axis = 1> (ra, rb)
    n = BatchNormalization (k, s, t, m, v)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (n)
    y = Conv <pads = [1, 1, 1, 1]> (p, wc, bc)
    z = Conv (k, wd, bd)
}
"""


def inception_weights(scale=1.0):
    return {"wa": rand((8, 4, 1, 1), 1, 0.5), "ba": rand((8,), 2, 0.1),
            "wb": rand((8, 4, 3, 3), 3, 0.3), "bb": rand((8,), 4, 0.1),
            "s": rand((16,), 5, 0.3) + 1, "t": rand((16,), 6, 0.1),
            "m": rand((16,), 7, 0.1), "v": np.abs(rand((16,), 8)) + 0.5,
            "wc": rand((5, 16, 3, 3), 9, 0.2 * scale), "bc": rand((5,), 10, 0.1),
            "wd": rand((3, 16, 1, 1), 11, 0.3 * scale), "bd": rand((3,), 12, 0.1)}


def test_prune_channels_concat_prunes_each_input_at_its_offset():
    model = make_model(INCEPTION, inception_weights())
    out, result = apply_pass(PruneChannels, model, {"recovery": False, "channel_ratio": 0.25,
                                                    "channel_score": "l2"})
    assert [r["layer"] for r in result.layers] == ["a", "b"]
    assert weight_shapes(out) == {"a": (6, 4, 1, 1), "b": (6, 4, 3, 3), "y": (5, 12, 3, 3),
                                  "z": (3, 12, 1, 1)}
    bn = next(n for n in out.graph.node if n.op_type == "BatchNormalization")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    removed = [r["removed"] for r in result.layers]
    kept = np.setdiff1d(np.arange(16), removed[0] + [8 + c for c in removed[1]])
    np.testing.assert_array_equal(inits[bn.input[1]], inception_weights()["s"][kept])
    feed = {"x": rand((4, 4, 8, 8), 42)}
    masked = run(masked_model(model, result), feed)
    for name, value in run(out, feed).items():
        np.testing.assert_allclose(value, masked[name], rtol=RTOL, atol=ATOL)
    assert not np.allclose(masked["y"], run(model, feed)["y"], rtol=1e-3, atol=1e-3)


#  x -> S -> Relu -> *0.5 -> F1 -> Concat(r0, f1) -> BN -> Mul -> Add -> Relu -> F2
#    -> Concat(k1, f2) -> Y -> y
#  (DenseNet: a Concat's output is concatenated again, S's channels are in both; Caffe2's
#  BN is followed by a per-channel Mul and Add of constants)
DENSE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 6, 8, 8] y) {
    s = Conv (x, ws, bs)
    r0 = Relu (s)
    h0 = Mul (r0, half)
    f1 = Conv <pads = [1, 1, 1, 1]> (h0, w1, b1)
    k1 = Concat <axis = 1> (r0, f1)
    n1 = BatchNormalization (k1, g1, t1, m1, v1)
    u1 = Mul (n1, sc)
    a1 = Sub (u1, sh)
    q1 = Relu (a1)
    f2 = Conv <pads = [1, 1, 1, 1]> (q1, w2, b2)
    k2 = Concat <axis = 1> (k1, f2)
    y = Conv (k2, wy, by)
}
"""


def test_prune_channels_nested_concat_follows_every_offset():
    model = make_model(DENSE, {
        "ws": rand((8, 4, 1, 1), 1, 0.5), "bs": rand((8,), 2, 0.1),
        "w1": rand((4, 8, 3, 3), 3, 0.3), "b1": rand((4,), 4, 0.1),
        "g1": rand((12,), 5, 0.3) + 1, "t1": rand((12,), 6, 0.1),
        "m1": rand((12,), 7, 0.1), "v1": np.abs(rand((12,), 8)) + 0.5,
        "half": np.array(0.5, np.float32), "sc": rand((12, 1, 1), 13, 0.2) + 1,
        "sh": rand((1, 12, 1, 1), 14, 0.2),
        "w2": rand((4, 12, 3, 3), 9, 0.3), "b2": rand((4,), 10, 0.1),
        "wy": rand((6, 16, 1, 1), 11, 0.3), "by": rand((6,), 12, 0.1)})
    out, result = check_exact(model, {"channel_ratio": 0.25, "channel_score": "l1"})
    assert [r["layer"] for r in result.layers] == ["s", "f1", "f2"]
    assert weight_shapes(out) == {"s": (6, 4, 1, 1), "f1": (3, 6, 3, 3),
                                  "f2": (3, 9, 3, 3), "y": (6, 12, 1, 1)}
    inits = {i.name: tuple(i.dims) for i in out.graph.initializer}
    assert [inits[n.input[1]] for n in out.graph.node if n.op_type in ("Mul", "Sub")] == [
        (), (9, 1, 1), (1, 9, 1, 1)]


def test_prune_channels_concat_activation_score_counts_readers_at_the_offset():
    """Channel c of A (offset 0) and of B (offset 8) is scored by what C and D read
    there: a channel whose Concat columns are zero in both readers is removed first."""
    weights = inception_weights()
    for name in ("wc", "wd"):
        weights[name][:, [5, 8 + 2]] = 0
    model = make_model(INCEPTION, weights)
    ctx = PassContext(calib=[{"x": rand((8, 4, 8, 8), 100)}])
    _, result = apply_pass(PruneChannels, model, {"recovery": False, "channel_ratio": 0.125},
                           ctx)
    assert [(r["layer"], r["removed"]) for r in result.layers] == [("a", [5]), ("b", [2])]


def test_prune_channels_recovery_lowers_error_through_concat():
    model = make_model(INCEPTION, inception_weights())
    ctx = PassContext(calib=[{"x": rand((8, 4, 8, 8), 100 + i)} for i in range(3)])
    plain, _ = apply_pass(PruneChannels, model, {"recovery": False}, ctx)
    fitted, result = apply_pass(PruneChannels, model, {}, ctx)
    assert result.stats["consumers_refitted"] == 2  # y and z read the Concat
    feed = {"x": rand((16, 4, 8, 8), 999)}
    ref, got_plain, got_fit = run(model, feed), run(plain, feed), run(fitted, feed)
    for name in ("y", "z"):
        err_plain = np.linalg.norm(got_plain[name] - ref[name])
        assert np.linalg.norm(got_fit[name] - ref[name]) < 0.8 * err_plain


DECLINES = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 8, 8, 8] y, float[N, 4, 8, 8] z, float[N, 4, 8, 4] w,
                           float[N, 4, 16, 8] u) {
    a = Conv (x, wa, ba)
    b = Conv (x, wb, bb)
    y = Concat <axis = 1> (a, b)
    h = Conv (x, wh, bh)
    g = Conv <group = 2> (h, wg, bg)
    z = Conv (g, wz, bz)
    c = Conv (x, wc, bc)
    e = Conv (x, we, be)
    k = Concat <axis = 2> (c, e)
    u = Conv (k, wu, bu)
    f = Conv (x, wf, bf)
    i = Conv (x, wi, bi)
    l = Concat <axis = 1> (f, i)
    j = Conv (x, wj, bj)
    q = Add (l, j)
    w = Conv <strides = [1, 2]> (q, ww, bw)
}
"""


def test_prune_channels_concat_grouped_and_outputs_decline():
    """A Concat that is a graph output, one along the height axis, and one whose sum
    with a Conv's output mixes channels: their inputs are declined with the reason."""
    weights = {n: rand((4, 4, 1, 1), i) for i, n in enumerate(
        ["wa", "wb", "wh", "wz", "wc", "we", "wu", "wf", "wi", "ww"])}
    weights.update({n.replace("w", "b", 1): rand((4,), 20 + i) for i, n in
                    enumerate(list(weights))})
    weights.update({"wg": rand((4, 2, 1, 1), 40), "bg": rand((4,), 41),
                    "wj": rand((8, 4, 1, 1), 42), "bj": rand((8,), 43),
                    "ww": rand((4, 8, 1, 1), 44)})
    _, result = apply_pass(PruneChannels, make_model(DECLINES, weights), {"recovery": False})
    assert not result.changed
    assert result.declined == {"channels coupled through Concat": 5,  # c, e; f, i, j
                               "a tensor is a graph input or output": 5,  # a, b; z, u, w
                               "grouped (not depthwise) Conv": 1}


def test_prune_channels_unfolded_channel_constant_declines_with_advice():
    """Caffe2's BN scale arrives as Unsqueeze(constant): not yet a constant, the decline
    says what to run first (and fold-constants then lets the space be pruned)."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 8, 8] x) => (float[N, 3, 8, 8] y) {
        a = Conv (x, wa, ba)
        s = Unsqueeze (sc, axes)
        m = Mul (a, s)
        y = Conv (m, wy, by)
    }
    """
    model = make_model(text, {"wa": rand((8, 4, 1, 1), 1), "ba": rand((8,), 2),
                              "sc": rand((8, 1), 3) + 1, "axes": np.array([2], np.int64),
                              "wy": rand((3, 8, 1, 1), 4), "by": rand((3,), 5)})
    _, result = apply_pass(PruneChannels, model, {"recovery": False})
    assert result.declined == {"Mul: its operand is computed from constants by Unsqueeze "
                               "(run fold-constants first)": 1,
                               "a tensor is a graph input or output": 1}  # y
    from onnxslim_cnn.passes.fold_constants import FoldConstants

    folded, _ = apply_pass(FoldConstants, model, {})
    check_exact(folded, {"channel_ratio": 0.25})


def test_prune_channels_constant_first_mul_with_a_shared_input_is_pruned():
    """Mul(scale, a) with a also read by a Relu: the slice's weight is its constant,
    not its activation input (which it shares): the space is pruned exactly."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 8, 8] x) => (float[N, 3, 8, 8] y, float[N, 3, 8, 8] z) {
        a = Conv (x, wa, ba)
        m = Mul (sc, a)
        y = Conv (m, wy, by)
        r = Relu (a)
        z = Conv (r, wz, bz)
    }
    """
    model = make_model(text, {"wa": rand((8, 4, 1, 1), 1), "ba": rand((8,), 2),
                              "sc": rand((8, 1, 1), 3) + 1,
                              "wy": rand((3, 8, 1, 1), 4), "by": rand((3,), 5),
                              "wz": rand((3, 8, 1, 1), 6), "bz": rand((3,), 7)})
    out, result = apply_pass(PruneChannels, model, {"recovery": False, "channel_ratio": 0.25})
    assert [r["layer"] for r in result.layers] == ["a"]
    assert weight_shapes(out) == {"a": (6, 4, 1, 1), "y": (3, 6, 1, 1), "z": (3, 6, 1, 1)}
    feed = {"x": rand((4, 4, 8, 8), 42)}
    masked = run(masked_model(model, result), feed)
    for name, value in run(out, feed).items():
        np.testing.assert_allclose(value, masked[name], rtol=RTOL, atol=ATOL)


def test_prune_channels_flatten_over_spatial_declines():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 4, 4] x) => (float[N, 3] y) {
        a = Conv (x, wa, ba)
        f = Flatten (a)
        y = Gemm <transB = 1> (f, wg, bg)
    }
    """
    model = make_model(text, {"wa": rand((8, 4, 1, 1), 1), "ba": rand((8,), 2),
                              "wg": rand((3, 128), 3), "bg": rand((3,), 4)})
    _, result = apply_pass(PruneChannels, model)
    assert not result.changed
    assert result.declined == {"Flatten over C x H x W with H*W > 1 (or unknown)": 1}


def test_prune_channels_too_few_channels_declines():
    model = make_model(CHAIN, {
        "wa": rand((2, 4, 3, 3), 1), "ba": rand((2,), 2), "s": np.ones(2, np.float32),
        "t": np.zeros(2, np.float32), "m": np.zeros(2, np.float32),
        "v": np.ones(2, np.float32), "wb": rand((6, 2, 3, 3), 7), "bb": rand((6,), 8)})
    _, result = apply_pass(PruneChannels, model, {"channel_ratio": 0.25})
    assert not result.changed
    assert result.declined == {"fewer channels than 1/ratio": 1,
                               "a tensor is a graph input or output": 1}


@pytest.mark.parametrize("sequential", [True, False])
def test_prune_channels_recovery_lowers_error_on_unseen_data(sequential):
    model = make_model(RESIDUAL, {
        "wa": rand((16, 4, 3, 3), 1, 0.3), "ba": rand((16,), 2, 0.1),
        "wb": rand((16, 16, 3, 3), 3, 0.1), "bb": rand((16,), 4, 0.1),
        "wc": rand((5, 16, 1, 1), 5, 0.3), "bc": rand((5,), 6, 0.1)})
    ctx = PassContext(calib=[{"x": rand((8, 4, 8, 8), 100 + i)} for i in range(3)])
    opts = {"channel_ratio": 0.25, "sequential": sequential}
    plain, _ = apply_pass(PruneChannels, model, {**opts, "recovery": False}, ctx)
    fitted, result = apply_pass(PruneChannels, model, opts, ctx)
    assert result.stats["consumers_refitted"] == 2  # b (reads r) and c (reads q)
    feed = {"x": rand((16, 4, 8, 8), 999)}
    ref = run(model, feed)["y"]
    err_plain = np.linalg.norm(run(plain, feed)["y"] - ref)
    err_fit = np.linalg.norm(run(fitted, feed)["y"] - ref)
    assert err_fit < 0.8 * err_plain
    assert weight_shapes(fitted) == weight_shapes(plain)


def test_prune_channels_float16_equals_masked_recovery_helps_and_stays_float16(tmp_path):
    model = make_float16(RESIDUAL, {
        "wa": rand((16, 4, 3, 3), 1, 0.3), "ba": rand((16,), 2, 0.1),
        "wb": rand((16, 16, 3, 3), 3, 0.1), "bb": rand((16,), 4, 0.1),
        "wc": rand((5, 16, 1, 1), 5, 0.3), "bc": rand((5,), 6, 0.1)})
    ctx = PassContext(calib=[{"x": rand((8, 4, 8, 8), 100 + i, dtype=np.float16)}
                             for i in range(3)])
    plain, masked = apply_pass(PruneChannels, model, {"recovery": False}, ctx)
    fitted, result = apply_pass(PruneChannels, model, {}, ctx)
    assert result.stats["consumers_refitted"] == 2  # b (reads r) and c (reads q)
    feed = {"x": rand((16, 4, 8, 8), 999, dtype=np.float16)}
    ref = run(model, feed)["y"].astype(np.float64)
    # the float32 tolerance (1e-5) loosened to float16's: onnxruntime rounds every Conv
    # and Add output to float16, so summing in another order can flip a rounding by one
    # step (2^-10 relative at most): rtol 2e-3 (measured: identical outputs)
    np.testing.assert_allclose(run(plain, feed)["y"],
                               run(masked_model(model, masked), feed)["y"], rtol=2e-3,
                               atol=2e-3)
    err_plain = np.linalg.norm(run(plain, feed)["y"] - ref)
    err_fit = np.linalg.norm(run(fitted, feed)["y"] - ref)
    assert err_fit < 0.8 * err_plain  # the float32 test's bound
    assert weight_shapes(fitted) == weight_shapes(plain) == {
        "a": (12, 4, 3, 3), "b": (12, 12, 3, 3), "y": (5, 12, 1, 1)}
    assert {v.dtype for v in layer_params(fitted).values()} == {np.dtype(np.float16)}
    assert io_types(fitted) == {onnx.TensorProto.FLOAT16}
    assert fitted.ByteSize() < model.ByteSize()
    # nothing to decode at load: onnxruntime runs float16 convolutions (its casts around
    # them as for the original), no Cast or other op of a weight decode is left
    ops = optimized_ops(fitted, tmp_path)
    assert ops["Cast"] == optimized_ops(model, tmp_path)["Cast"]
    assert not {"BitShift", "Mod", "Gather", "CumSum", "Mul", "DequantizeLinear"} & set(ops)


@pytest.fixture(scope="module")
def light_resnet50(tmp_path_factory):
    from models import light

    return light.materialize("resnet50", tmp_path_factory.mktemp("light"))


@pytest.mark.parametrize("which", ["resnet8", "light_resnet50", "squeezenet"])
def test_prune_channels_real_models_equal_their_masked_original(which, request):
    """25 % of the channels of the real ResNet-8, of the onnx package's ResNet-50 and of
    the real SqueezeNet 1.1 (its fire modules' expand convs are concatenated; BN folded
    first, as in the pipeline; recovery off): the pruned graph computes what the masked
    original computes, and its convolutions are smaller."""
    from onnxslim_cnn.passes.fold_bn import FoldBatchNorm

    from .helpers import shared_model

    if which == "resnet8":
        model = onnx.load(str(shared_model("resnet8_cifar10_mlperf_tiny")))
        shape = (2, 3, 32, 32)
    elif which == "squeezenet":
        model = onnx.load(str(shared_model("squeezenet1.1_caffe2_fp32")))
        shape = (1, 3, 224, 224)
    else:
        model = onnx.load(str(request.getfixturevalue("light_resnet50")))
        shape = (1, 3, 224, 224)
    model, _ = apply_pass(FoldBatchNorm, model, {})
    out, result = apply_pass(PruneChannels, model, {"recovery": False, "channel_ratio": 0.25})
    assert result.changed and result.stats["channels_removed"] > 0
    if which == "squeezenet":  # every conv but the classifier (Softmax reads it)
        assert result.stats["spaces_pruned"] == 25
    name = next(i.name for i in model.graph.input
                if i.name not in {t.name for t in model.graph.initializer})
    feed = {name: rand(shape, 3)}
    ref = run(masked_model(model, result), feed)
    got = run(out, feed)
    for key, value in ref.items():
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL * scale)
    before, after = weight_shapes(model), weight_shapes(out)
    assert sum(np.prod(s) for s in after.values()) < 0.8 * sum(np.prod(s) for s in before.values())
