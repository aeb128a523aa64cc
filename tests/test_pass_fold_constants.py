"""fold-constants on tiny graphs: exact outputs and structure, and the file-size veto.

Tolerance: rtol=atol=0 everywhere. onnxruntime evaluates the folded nodes with the same
float32 kernels it would run at inference, so the model computes bit for bit the same.
"""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from onnxslim_cnn import storage
from onnxslim_cnn.manager import export_graph
from onnxslim_cnn.passes.base import PassContext
from onnxslim_cnn.passes.fold_constants import FoldConstants

from .helpers import apply_pass, assert_same_outputs, make_model, op_counts, rand, run

HEADER = '<ir_version: 8, opset_import: ["" : 13]>\n'


def init_bytes(model) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def fold(model):
    out, result = apply_pass(FoldConstants, model)
    assert init_bytes(out) <= init_bytes(model), "the file grew"
    return out, result


def test_fold_constants_transposed_weight_folded():
    # wt -> Transpose -> Conv   =>   wt_T -> Conv
    text = HEADER + """
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        w = Transpose <perm = [1, 0, 2, 3]> (wt)
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
    }"""
    model = make_model(text, {"wt": rand((3, 4, 3, 3), 0)})
    out, result = fold(model)
    assert result.stats["tensors_folded"] == 1
    assert op_counts(out) == {"Conv": 1}
    assert init_bytes(out) == init_bytes(model)
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_fold_constants_scaled_weight_folded():
    # w * s -> Conv (the product replaces both constants)
    text = HEADER + """
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        ws = Mul (w, s)
        y = Conv <pads = [1, 1, 1, 1]> (x, ws)
    }"""
    model = make_model(text, {"w": rand((4, 3, 3, 3), 1), "s": rand((4, 1, 1, 1), 2)})
    out, result = fold(model)
    assert result.stats["tensors_folded"] == 1
    assert op_counts(out) == {"Conv": 1}
    assert init_bytes(out) == 4 * 3 * 3 * 3 * 4
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_fold_constants_chain_transpose_mul_folded():
    # wt -> Transpose -> Mul(s) -> Conv: the intermediate is freed too.
    text = HEADER + """
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        w = Transpose <perm = [1, 0, 2, 3]> (wt)
        ws = Mul (w, s)
        y = Conv <pads = [1, 1, 1, 1]> (x, ws)
    }"""
    model = make_model(text, {"wt": rand((3, 4, 3, 3), 1), "s": rand((4, 1, 1, 1), 2)})
    out, result = fold(model)
    assert not result.declined
    assert op_counts(out) == {"Conv": 1}
    assert len(out.graph.initializer) == 1
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_fold_constants_narrowing_cast_folded():
    # float64 weight -> Cast(float) -> Conv: the result is half the size.
    text = HEADER + """
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        w = Cast <to = 1> (w64)
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
    }"""
    model = make_model(text, {"w64": rand((4, 3, 3, 3), 3, dtype=np.float64)})
    out, result = fold(model)
    assert result.stats["tensors_folded"] == 1
    assert op_counts(out) == {"Conv": 1}
    assert init_bytes(out) == init_bytes(model) // 2
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_fold_constants_static_shape_chain_folded():
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape  =>  Reshape(x, [2, -1])
    text = HEADER + """
    g (float[2, 4, 8, 8] x) => (float[2, 256] y) {
        s = Shape (x)
        b = Gather <axis = 0> (s, i0)
        bu = Unsqueeze (b, ax)
        shp = Concat <axis = 0> (bu, m1)
        y = Reshape (x, shp)
    }"""
    model = make_model(text, {"i0": np.array(0, np.int64), "ax": np.array([0], np.int64),
                              "m1": np.array([-1], np.int64)})
    out, result = fold(model)
    assert result.stats["tensors_folded"] == 4
    assert op_counts(out) == {"Reshape": 1}
    shape = numpy_helper.to_array(out.graph.initializer[0])
    np.testing.assert_array_equal(shape, [2, -1])
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_fold_constants_static_dims_of_dynamic_batch_folded():
    # x[N, 4, 8, 8]: Shape(x)[1:4] are static even though N is not.
    text = HEADER + """
    g (float[N, 4, 8, 8] x) => (float[N, 256] y) {
        s = Shape (x)
        c = Gather <axis = 0> (s, i1)
        hw = Gather <axis = 0> (s, i23)
        p = ReduceProd <keepdims = 1> (hw)
        cu = Unsqueeze (c, ax)
        q = Mul (cu, p)
        shp = Concat <axis = 0> (m1, q)
        y = Reshape (x, shp)
    }"""
    model = make_model(text, {"i1": np.array(1, np.int64), "i23": np.array([2, 3], np.int64),
                              "ax": np.array([0], np.int64), "m1": np.array([-1], np.int64)})
    out, result = fold(model)
    assert op_counts(out) == {"Reshape": 1}
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), [-1, 256])
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_fold_constants_shape_arithmetic_through_float_untouched():
    # Cast(int->float) -> Mul(0.5) -> Cast(int): must stay a float Mul by 0.5 (an
    # integer rewrite would multiply by 0). The batch is dynamic, so nothing folds.
    text = HEADER + """
    g (float[N, 4, 8, 8] x) => (float[N, 4, 4, 16] y) {
        s = Shape (x)
        f = Cast <to = 1> (s)
        h = Mul (f, k)
        i = Cast <to = 7> (h)
        y = Reshape (x, i)
    }"""
    model = make_model(text, {"k": np.array([1, 1, 0.5, 2], np.float32)})
    out, result = fold(model)
    assert not result.changed
    assert op_counts(out) == op_counts(model)
    assert_same_outputs(model, out, rtol=0, atol=0)


# name -> (graph, weights, expected declined reason); each would grow the file
REFUSED = {
    "tile": ("""
        g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
            wt = Tile (w, r)
            y = Conv <pads = [1, 1, 1, 1]> (x, wt)
        }""", {"w": rand((4, 1, 3, 3), 0), "r": np.array([1, 4, 1, 1], np.int64)},
        "Tile would grow the file"),
    "expand": ("""
        g (float[N, 3, 8, 8] x) => (float[N, 8, 8, 8] y) {
            we = Expand (w, shp)
            y = Conv <pads = [1, 1, 1, 1]> (x, we)
        }""", {"w": rand((1, 3, 3, 3), 0), "shp": np.array([8, 3, 3, 3], np.int64)},
        "Expand would grow the file"),
    "constant-of-shape": ("""
        g (float[N, 64, 64] x) => (float[N, 64, 64] y) {
            ones = ConstantOfShape <value = float[1] {1.0}> (shp)
            y = Add (x, ones)
        }""", {"shp": np.array([64, 64], np.int64)}, "ConstantOfShape would grow the file"),
    "transpose-of-shared-weight": ("""
        g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y, float[N, 4, 8, 8] z) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w)
            wt = Transpose <perm = [1, 0, 2, 3]> (w)
            z = Conv <pads = [1, 1, 1, 1]> (x, wt)
        }""", {"w": rand((4, 4, 3, 3), 0)}, "Transpose would grow the file"),
    "widening-cast-of-weight": ("""
        g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
            w = Cast <to = 1> (w16)
            y = Conv <pads = [1, 1, 1, 1]> (x, w)
        }""", {"w16": rand((4, 4, 3, 3), 0, dtype=np.float16)}, "Cast would grow the file"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fold_constants_growing_node_declines(case):
    body, weights, reason = REFUSED[case]
    model = make_model(HEADER + body, weights)
    out, result = fold(model)
    assert not result.changed
    assert result.declined == {reason: 1}  # counted once per node
    assert op_counts(out) == op_counts(model)
    assert init_bytes(out) == init_bytes(model)


def test_fold_constants_decode_subgraph_declines():
    # A storage decode node (tag in its name) would fold without growing: still kept.
    name = f"conv1_{storage.DECODE_TAG}_scale"
    text = HEADER + """
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        ws = Mul (w, s)
        y = Conv <pads = [1, 1, 1, 1]> (x, ws)
    }"""
    model = make_model(text, {"w": rand((4, 3, 3, 3), 1), "s": rand((4, 1, 1, 1), 2)})
    model.graph.node[0].name = name
    out, result = fold(model)
    assert not result.changed
    reason = "part of a weight-decode subgraph (folded by the runtime at load)"
    assert result.declined == {reason: 1}
    assert op_counts(out) == {"Mul": 1, "Conv": 1}
    assert out.graph.node[0].name == name


def test_fold_constants_inside_if_branch_uses_the_veto():
    # The then-branch tiles a constant (refused) and transposes one (folded).
    text = HEADER + """
    g (float[2, 64] x, bool k) => (float[2, 64] y) {
        y = If (k) <
            then_branch = g1 () => (float[2, 64] a) {
                big = Tile (row, r)
                a = Add (x, big)
            },
            else_branch = g2 () => (float[2, 64] e) {
                col = Transpose (row_t)
                e = Mul (x, col)
            }>
    }"""
    weights = {"row": rand((1, 64), 0), "r": np.array([2, 1], np.int64),
               "row_t": rand((64, 1), 1)}
    model = make_model(text, weights)
    # Tile's 512-byte output exceeds SMALL_BYTES (256) and the 256-byte row it frees;
    # whether onnx infers its shape inside the branch decides which reason is given.
    out, result = fold(model)
    assert sum(result.declined.values()) == 1
    assert set(result.declined) <= {"Tile would grow the file",
                                    "output size unknown; the op may grow"}
    then_ops = [n.op_type for n in out.graph.node[0].attribute[0].g.node]
    else_ops = [n.op_type for n in out.graph.node[0].attribute[1].g.node]
    assert sorted([then_ops, else_ops]) == [["Mul"], ["Tile", "Add"]]
    for flag in (True, False):
        feed = {"x": rand((2, 64), 5), "k": np.array(flag)}
        np.testing.assert_array_equal(run(out, feed)["y"], run(model, feed)["y"])


def test_fold_constants_unknown_sizes_are_bounded_or_declined():
    # Without shape inference: Reshape(w) is bounded by w and folds; Tile declines.
    text = HEADER + """
    g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
        wr = Reshape (w, shp)
        wt = Tile (wr, r)
        y = Conv <pads = [1, 1, 1, 1]> (x, wt)
    }"""
    weights = {"w": rand((36,), 0), "shp": np.array([4, 1, 3, 3], np.int64),
               "r": np.array([1, 4, 1, 1], np.int64)}
    model = make_model(text, weights)
    graph = gs.import_onnx(model)  # no inferred shapes on purpose
    result = FoldConstants().run(graph, PassContext())
    graph.cleanup().toposort()
    out = export_graph(graph, model)
    assert result.declined == {"output size unknown; the op may grow": 1}
    assert op_counts(out) == {"Tile": 1, "Conv": 1}
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_fold_constants_second_run_changes_nothing():
    text = HEADER + """
    g (float[2, 3, 8, 8] x) => (float[2, 256] y) {
        w = Transpose <perm = [1, 0, 2, 3]> (wt)
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        s = Shape (c)
        b = Gather <axis = 0> (s, i0)
        bu = Unsqueeze (b, ax)
        shp = Concat <axis = 0> (bu, m1)
        y = Reshape (c, shp)
    }"""
    model = make_model(text, {"wt": rand((3, 4, 3, 3), 0), "i0": np.array(0, np.int64),
                              "ax": np.array([0], np.int64), "m1": np.array([-1], np.int64)})
    once, first = fold(model)
    twice, second = fold(once)
    assert first.changed and op_counts(once) == {"Conv": 1, "Reshape": 1}
    assert not second.changed and second.stats["tensors_folded"] == 0
    assert twice.graph.SerializeToString() == once.graph.SerializeToString()
    assert_same_outputs(model, once, rtol=0, atol=0)
