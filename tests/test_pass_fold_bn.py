"""fold-bn on tiny graphs: numeric equivalence under onnxruntime and structure."""

import numpy as np

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


def conv_bn_weights(seed=0):
    return {"w": rand((4, 3, 3, 3), seed), "b": rand((4,), seed + 1), "s": rand((4,), seed + 2),
            "t": rand((4,), seed + 3), "m": rand((4,), seed + 4), "v": positive((4,), seed + 5)}


def test_fold_bn_conv_folds_and_matches():
    model = make_model(CONV_BN, conv_bn_weights())
    out, result = apply_pass(FoldBatchNorm, model)
    assert result.stats["bn_folded"] == 1
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


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
    assert np.array_equal(op_counts(out)["Conv"], 2)
