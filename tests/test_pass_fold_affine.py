"""fold-affine: Conv + Add/Mul constants and MatMul + Add, exact under onnxruntime."""

import numpy as np

from onnxslim_cnn.passes.fold_affine import FoldAffine

from .helpers import apply_pass, assert_same_outputs, make_model, op_counts, rand

# CNTK style: x -> Conv(W) -> Add(c[C,1,1]) -> Mul(m[1,C,1,1]) -> Relu -> Reshape
#                -> MatMul(V) -> Add(d[1,10]) -> y
CNTK = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 1, 8, 8] x) => (float[1, 10] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    a = Add (c, bias)
    m = Mul (scale, a)
    r = Relu (m)
    f = Reshape (r, shape)
    mm = MatMul (f, v)
    y = Add (mm, d)
}
"""


def weights():
    return {"w": rand((4, 1, 3, 3), 1), "bias": rand((4, 1, 1), 2),
            "scale": rand((1, 4, 1, 1), 3), "shape": np.array([1, 256], np.int64),
            "v": rand((256, 10), 4, 0.1), "d": rand((1, 10), 5)}


def test_fold_affine_cntk_chain_folds_into_conv_and_gemm():
    model = make_model(CNTK, weights())
    out, result = apply_pass(FoldAffine, model)
    assert result.stats == {"add_folded": 2, "mul_folded": 1}
    assert op_counts(out) == {"Conv": 1, "Relu": 1, "Reshape": 1, "Gemm": 1}
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)


def test_fold_affine_spatial_constant_declines():
    text = CNTK.replace("a = Add (c, bias)", "a = Add (c, plane)")
    model = make_model(text, weights() | {"plane": rand((1, 1, 8, 8), 9)})
    out, result = apply_pass(FoldAffine, model)
    assert result.declined["Add constant does not broadcast per output channel"] == 1
    assert op_counts(out)["Add"] == 1  # the spatial Add stays; the MatMul+Add still folds
    assert_same_outputs(model, out, rtol=1e-5, atol=1e-5)
