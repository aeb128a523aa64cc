"""fold-bn on tiny graphs: numeric equivalence under onnxruntime and structure.

Tolerances: float32 graphs are compared at rtol=atol=1e-5 (the fold is computed in
float64 and rounded once to float32; onnxruntime's reordering of the sums is the rest).
"""

import numpy as np
import pytest

from onnxslim_cnn.passes.fold_bn import FoldBatchNorm

from .helpers import apply_pass, assert_same_outputs, make_model, op_counts, positive, rand

# X -> Conv(W, B) -> BN -> Relu -> Y
CONV_BN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    n = BatchNormalization <epsilon = 0.001> (c, s, t, m, v)
    y = Relu (n)
}
"""


def bn_weights(channels: int, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"s": rand((channels,), seed + 2, dtype=dtype), "t": rand((channels,), seed + 3,
                                                                     dtype=dtype),
            "m": rand((channels,), seed + 4, dtype=dtype),
            "v": positive((channels,), seed + 5).astype(dtype)}


def conv_bn_weights(seed=0):
    return {"w": rand((4, 3, 3, 3), seed), "b": rand((4,), seed + 1), **bn_weights(4, seed)}


def init_names(model) -> set[str]:
    return {i.name for i in model.graph.initializer}


def test_fold_bn_conv_folds_and_matches():
    model = make_model(CONV_BN, conv_bn_weights())
    out, result = apply_pass(FoldBatchNorm, model)
    assert result.stats["bn_folded"] == 1
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    assert len(out.graph.initializer) == 2  # W', b' replace W, b, gamma, beta, mean, var
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


# (graph text, weight shape, has bias): Conv variants that all fold.
CONV_CASES = {
    "no-bias": ("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            y = BatchNormalization <epsilon = 0.00001> (c, s, t, m, v)
        }""", (4, 3, 3, 3), False),
    "grouped": ("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 4, 8, 8] x) => (float[N, 6, 8, 8] y) {
            c = Conv <group = 2, pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization (c, s, t, m, v)
        }""", (6, 2, 3, 3), True),
    "depthwise": ("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
            c = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization (c, s, t, m, v)
        }""", (4, 1, 3, 3), True),
    "conv1d": ("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 16] x) => (float[N, 5, 16] y) {
            c = Conv <pads = [1, 1]> (x, w, b)
            y = BatchNormalization (c, s, t, m, v)
        }""", (5, 3, 3), True),
    "conv1d-no-bias": ("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3, 16] x) => (float[N, 5, 14] y) {
            c = Conv (x, w)
            y = BatchNormalization (c, s, t, m, v)
        }""", (5, 3, 3), False),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_fold_bn_conv_variants_fold_and_match(case):
    text, w_shape, has_bias = CONV_CASES[case]
    weights = {"w": rand(w_shape, 1), **bn_weights(w_shape[0], 1)}
    if has_bias:
        weights["b"] = rand((w_shape[0],), 2)
    model = make_model(text, weights)
    out, result = apply_pass(FoldBatchNorm, model)
    assert result.changed and result.stats == {"bn_folded": 1}
    assert op_counts(out) == {"Conv": 1}
    conv = out.graph.node[0]
    assert len(conv.input) == 3 and conv.output[0] == "y"  # bias added, output name kept
    assert len(out.graph.initializer) == 2
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


# X[2, 5] -> Gemm(W, C) -> BN -> Y[2, 6]
GEMM_BN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 5] x) => (float[2, 6] y) {{
    h = Gemm <{attrs}> (x, w{bias})
    y = BatchNormalization <epsilon = 0.001> (h, s, t, m, v)
}}
"""


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), ()])
def test_fold_bn_gemm_folds_and_matches(trans_b, alpha, beta, c_shape):
    attrs = f"transB = {trans_b}, alpha = {alpha}, beta = {beta}"
    text = GEMM_BN.format(attrs=attrs, bias="" if c_shape is None else ", c")
    weights = {"w": rand((6, 5) if trans_b else (5, 6), 3), **bn_weights(6, 3)}
    if c_shape is not None:
        weights["c"] = rand(c_shape, 4)
    model = make_model(text, weights)
    out, result = apply_pass(FoldBatchNorm, model)
    assert result.stats == {"bn_folded": 1}
    assert op_counts(out) == {"Gemm": 1}
    attrs = {a.name: a for a in out.graph.node[0].attribute}
    assert attrs["alpha"].f == 1.0 and attrs["beta"].f == 1.0
    assert attrs["transB"].i == trans_b
    assert len(out.graph.initializer) == 2
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


def test_fold_bn_gemm_trans_a_opset9_folds_and_matches():
    # transA transposes the input, not the weight: the output features stay on B's axis 0.
    text = """
    <ir_version: 7, opset_import: ["" : 9]>
    g (float[5, 2] x) => (float[2, 6] y) {
        h = Gemm <transA = 1, transB = 1, alpha = 0.7, beta = 1.5> (x, w, c)
        y = BatchNormalization (h, s, t, m, v)
    }"""
    model = make_model(text, {"w": rand((6, 5), 1), "c": rand((6,), 2), **bn_weights(6, 3)})
    out, result = apply_pass(FoldBatchNorm, model)
    assert result.stats == {"bn_folded": 1}
    assert op_counts(out) == {"Gemm": 1}
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


def test_fold_bn_gemm_full_matrix_bias_declines():
    # C of shape [M, N] differs per row: not a per-feature bias.
    text = GEMM_BN.format(attrs="transB = 1", bias=", c")
    model = make_model(text, {"w": rand((6, 5), 3), "c": rand((2, 6), 4), **bn_weights(6, 3)})
    out, result = apply_pass(FoldBatchNorm, model)
    assert not result.changed
    assert result.declined == {"layer bias does not broadcast per output channel": 1}
    assert op_counts(out) == {"Gemm": 1, "BatchNormalization": 1}


# X[3, 5] -> MatMul(W) -> BN -> Y[3, 6]; folds into Gemm(X, W', b')
MATMUL_BN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 5] x) => (float[N, 6] y) {
    h = MatMul (x, w)
    y = BatchNormalization (h, s, t, m, v)
}
"""


def test_fold_bn_matmul_becomes_gemm_and_matches():
    model = make_model(MATMUL_BN, {"w": rand((5, 6), 5), **bn_weights(6, 5)})
    out, result = apply_pass(FoldBatchNorm, model)
    assert result.stats == {"bn_folded": 1}
    assert op_counts(out) == {"Gemm": 1}
    assert len(out.graph.initializer) == 2
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


def test_fold_bn_matmul_3d_declines():
    # BN's channel axis is 1 here, MatMul's output features are the last axis.
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 6, 5] x) => (float[2, 6, 6] y) {
        h = MatMul (x, w)
        y = BatchNormalization (h, s, t, m, v)
    }
    """
    model = make_model(text, {"w": rand((5, 6), 5), **bn_weights(6, 5)})
    out, result = apply_pass(FoldBatchNorm, model)
    assert not result.changed
    assert result.declined == {"MatMul output is not known to be 2-D": 1}
    assert op_counts(out) == {"MatMul": 1, "BatchNormalization": 1}


def test_fold_bn_fp16_folds_within_half_precision():
    # Tolerance rtol=1e-2, atol=2e-2: fp16 keeps ~3 significant digits and these outputs
    # reach ~20, where one fp16 step is 0.0156; the original rounds the conv and the BN
    # results to fp16, the folded model rounds W' and b' instead.
    text = CONV_BN.replace("float[", "float16[")
    weights = {k: v.astype(np.float16) for k, v in conv_bn_weights(7).items()}
    model = make_model(text, weights)
    out, result = apply_pass(FoldBatchNorm, model)
    assert result.stats == {"bn_folded": 1}
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    assert all(i.data_type == 10 for i in out.graph.initializer)  # still FLOAT16
    assert_same_outputs(model, out, rtol=1e-2, atol=2e-2)


def test_fold_bn_two_convs_in_a_chain_both_fold():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        n = BatchNormalization (c, s, t, m, v)
        r = Relu (n)
        c2 = Conv <pads = [1, 1, 1, 1]> (r, w2)
        y = BatchNormalization (c2, s2, t2, m2, v2)
    }
    """
    second = {k + "2": v for k, v in bn_weights(4, 9).items()}
    model = make_model(text, {**conv_bn_weights(), "w2": rand((4, 4, 3, 3), 8), **second})
    out, result = apply_pass(FoldBatchNorm, model)
    assert result.stats == {"bn_folded": 2}
    assert op_counts(out) == {"Conv": 2, "Relu": 1}
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


HEADER = '<ir_version: 8, opset_import: ["" : 15]>\n'
# name -> (body, extra weights, expected declined reason)
DECLINES = {
    "after-relu": ("""
        g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
            r = Relu (x)
            y = BatchNormalization (r, s, t, m, v)
        }""", {}, "BN input is not produced by Conv/Gemm/MatMul"),
    "graph-input": ("""
        g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
            y = BatchNormalization (x, s, t, m, v)
        }""", {}, "BN input is not produced by Conv/Gemm/MatMul"),
    "two-consumers": ("""
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] z) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization (c, s, t, m, v)
            z = Relu (c)
        }""", {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1)},
        "layer output has other consumers"),
    "conv-is-graph-output": ("""
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] c) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization (c, s, t, m, v)
        }""", {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1)},
        "layer output is a graph output"),
    "weight-is-graph-output": ("""
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[4, 3, 3, 3] w) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization (c, s, t, m, v)
        }""", {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1)},
        "weight is shared with another node (folding would duplicate it)"),
    "variable-weight": ("""
        g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w) => (float[1, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            y = BatchNormalization (c, s, t, m, v)
        }""", {}, "layer weight is not constant"),
    "variable-bias": ("""
        g (float[1, 3, 8, 8] x, float[4] b) => (float[1, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization (c, s, t, m, v)
        }""", {"w": rand((4, 3, 3, 3), 0)}, "layer bias is not constant"),
    "training-mode": ("""
        g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization <training_mode = 1> (c, s, t, m, v)
        }""", {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1)},
        "BatchNormalization in training mode"),
}


@pytest.mark.parametrize("case", sorted(DECLINES))
def test_fold_bn_unsafe_site_declines(case):
    body, weights, reason = DECLINES[case]
    model = make_model(HEADER + body, {**bn_weights(4), **weights})
    out, result = apply_pass(FoldBatchNorm, model)
    assert not result.changed and not result.stats
    assert result.declined == {reason: 1}
    assert op_counts(out) == op_counts(model)
    assert init_names(out) == init_names(model)


def test_fold_bn_non_constant_params_declines():
    text = HEADER + """
    g (float[1, 3, 8, 8] x, float[4] s) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = BatchNormalization (c, s, t, m, v)
    }"""
    weights = conv_bn_weights()
    del weights["s"]
    model = make_model(text, weights)
    out, result = apply_pass(FoldBatchNorm, model)
    assert not result.changed
    assert result.declined == {"BatchNormalization parameters are not constant": 1}
    assert op_counts(out) == {"Conv": 1, "BatchNormalization": 1}


def test_fold_bn_spatial_0_opset7_declines():
    # opset 7: spatial=0 normalises per (C, H, W) element, not per channel.
    text = """
    <ir_version: 4, opset_import: ["" : 7]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = BatchNormalization <spatial = 0> (c, s, t, m, v)
    }"""
    shape = (4, 8, 8)
    weights = {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1), "s": rand(shape, 2),
               "t": rand(shape, 3), "m": rand(shape, 4), "v": positive(shape, 5)}
    model = make_model(text, weights)
    out, result = apply_pass(FoldBatchNorm, model)
    assert not result.changed
    assert result.declined == {"BatchNormalization with spatial=0": 1}
    assert op_counts(out) == {"Conv": 1, "BatchNormalization": 1}


def test_fold_bn_statistics_output_used_declines():
    # opset 9 BN may expose its running mean as an output; removing BN would lose it.
    text = """
    <ir_version: 8, opset_import: ["" : 9]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[4] mean) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y, mean, var, sm, sv = BatchNormalization (c, s, t, m, v)
    }"""
    model = make_model(text, conv_bn_weights())
    out, result = apply_pass(FoldBatchNorm, model)
    assert not result.changed
    assert result.declined == {"BatchNormalization statistics outputs are used": 1}
    assert op_counts(out) == {"Conv": 1, "BatchNormalization": 1}


def test_fold_bn_shared_weight_declines():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] z) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = BatchNormalization (c, s, t, m, v)
        z = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    }
    """
    model = make_model(text, conv_bn_weights())
    out, result = apply_pass(FoldBatchNorm, model)
    assert not result.changed
    assert result.declined == {"weight is shared with another node (folding would duplicate it)": 1}
    assert op_counts(out)["Conv"] == 2
    assert op_counts(out)["BatchNormalization"] == 1


def test_fold_bn_second_run_changes_nothing():
    model = make_model(CONV_BN, conv_bn_weights())
    once, first = apply_pass(FoldBatchNorm, model)
    twice, second = apply_pass(FoldBatchNorm, once)
    assert first.changed and not second.changed
    assert not second.stats and not second.declined
    assert twice.graph.SerializeToString() == once.graph.SerializeToString()

