"""canonicalize: Sum -> Add / Identity, exact under onnxruntime."""

from onnxslim_cnn.passes.canonicalize import Canonicalize

from .helpers import apply_pass, assert_same_outputs, make_model, op_counts, rand

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    s = Sum (c, x)
    one = Sum (s)
    y = Sum (one, x, c)
}
"""


def test_canonicalize_sums_become_add_and_identity():
    model = make_model(TEXT, {"w": rand((4, 4, 3, 3), 1, 0.3), "b": rand((4,), 2)})
    out, result = apply_pass(Canonicalize, model)
    assert result.stats == {"sum_to_add": 1, "sum_to_identity": 1}
    assert result.declined == {"Sum with more than two inputs": 1}
    assert op_counts(out) == {"Conv": 1, "Add": 1, "Identity": 1, "Sum": 1}
    assert_same_outputs(model, out, rtol=0, atol=0)
