"""dedup-initializers on tiny graphs: exact outputs (rtol=atol=0) and bytes saved.

Merging bit-identical constants computes exactly the same thing.
"""

import numpy as np
from onnx import numpy_helper

from onnxslim_cnn.passes.dedup_initializers import DedupInitializers

from .helpers import apply_pass, assert_same_outputs, make_model, op_counts, rand

HEADER = '<ir_version: 8, opset_import: ["" : 13]>\n'

# x -> Conv(w1) -> y ; x -> Conv(w2) -> z ; x -> Conv(w3) -> u
THREE_CONVS = HEADER + """
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y, float[N, 4, 8, 8] z, float[N, 4, 8, 8] u) {
    y = Conv <pads = [1, 1, 1, 1]> (x, w1)
    z = Conv <pads = [1, 1, 1, 1]> (x, w2)
    u = Conv <pads = [1, 1, 1, 1]> (x, w3)
}"""


def init_bytes(model) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def test_dedup_initializers_identical_weights_merged():
    w = rand((4, 3, 3, 3), 0)
    model = make_model(THREE_CONVS, {"w1": w, "w2": w.copy(), "w3": rand((4, 3, 3, 3), 1)})
    out, result = apply_pass(DedupInitializers, model)
    assert result.changed
    assert result.stats == {"duplicates_merged": 1, "bytes_saved": w.nbytes}
    assert sorted(i.name for i in out.graph.initializer) == ["w1", "w3"]
    assert init_bytes(out) == init_bytes(model) - w.nbytes
    assert [n.input[1] for n in out.graph.node] == ["w1", "w1", "w3"]
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_dedup_initializers_three_copies_merged_into_one():
    w = rand((4, 3, 3, 3), 0)
    model = make_model(THREE_CONVS, {"w1": w, "w2": w.copy(), "w3": w.copy()})
    out, result = apply_pass(DedupInitializers, model)
    assert result.stats == {"duplicates_merged": 2, "bytes_saved": 2 * w.nbytes}
    assert [i.name for i in out.graph.initializer] == ["w1"]
    assert op_counts(out) == {"Conv": 3}
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_dedup_initializers_same_bytes_other_shape_declines():
    text = HEADER + """
    g (float[2, 3] x, float[3, 2] t) => (float[2, 3] y, float[3, 2] z) {
        y = Add (x, a)
        z = Add (t, b)
    }"""
    a = rand((2, 3), 0)
    model = make_model(text, {"a": a, "b": a.reshape(3, 2).copy()})
    out, result = apply_pass(DedupInitializers, model)
    assert not result.changed and not result.stats
    assert sorted(i.name for i in out.graph.initializer) == ["a", "b"]


def test_dedup_initializers_same_bytes_other_dtype_declines():
    text = HEADER + """
    g (float[4] x, int32[4] k) => (float[4] y, int32[4] z) {
        y = Add (x, a)
        z = Add (k, b)
    }"""
    a = rand((4,), 0)
    model = make_model(text, {"a": a, "b": a.view(np.int32).copy()})
    out, result = apply_pass(DedupInitializers, model)
    assert not result.changed
    assert sorted(i.name for i in out.graph.initializer) == ["a", "b"]


def test_dedup_initializers_signed_zero_declines():
    # 0.0 and -0.0 compare equal but are different bits: not merged.
    text = HEADER + """
    g (float[4] x) => (float[4] y, float[4] z) {
        y = Div (x, a)
        z = Div (x, b)
    }"""
    model = make_model(text, {"a": np.zeros(4, np.float32), "b": -np.zeros(4, np.float32)})
    out, result = apply_pass(DedupInitializers, model)
    assert not result.changed
    assert len(out.graph.initializer) == 2


def test_dedup_initializers_graph_output_constant_untouched():
    # w1 is also a graph output: it keeps its name and value, and w2 is not merged in.
    text = HEADER + """
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y, float[N, 4, 8, 8] z,
                                float[4, 3, 3, 3] w1) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w1)
        z = Conv <pads = [1, 1, 1, 1]> (x, w2)
    }"""
    w = rand((4, 3, 3, 3), 0)
    model = make_model(text, {"w1": w, "w2": w.copy()})
    out, result = apply_pass(DedupInitializers, model)
    assert not result.changed
    assert [o.name for o in out.graph.output] == ["y", "z", "w1"]
    assert sorted(i.name for i in out.graph.initializer) == ["w1", "w2"]
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_dedup_initializers_second_run_changes_nothing():
    w = rand((4, 3, 3, 3), 0)
    model = make_model(THREE_CONVS, {"w1": w, "w2": w.copy(), "w3": rand((4, 3, 3, 3), 1)})
    once, first = apply_pass(DedupInitializers, model)
    twice, second = apply_pass(DedupInitializers, once)
    assert first.changed and not second.changed and not second.stats
    assert twice.graph.SerializeToString() == once.graph.SerializeToString()


def test_dedup_initializers_scalar_duplicates_merged():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4] x) => (float[1, 4] y) {
        a = Clip (x, lo1, hi1)
        y = Clip (a, lo2, hi2)
    }
    """
    weights = {"lo1": np.array(0.0, np.float32), "hi1": np.array(6.0, np.float32),
               "lo2": np.array(0.0, np.float32), "hi2": np.array(6.0, np.float32)}
    model = make_model(text, weights)
    out, result = apply_pass(DedupInitializers, model)
    assert result.stats["duplicates_merged"] == 2
    assert len(out.graph.initializer) == 2
    assert_same_outputs(model, out, rtol=0, atol=0)
