"""remove-dead through the manager: the exported model loses dead nodes, initializers
and unused inputs; outputs are compared exactly (rtol=atol=0).
"""

import numpy as np

from onnxslim_cnn.passes.remove_dead import RemoveDead

from .helpers import (
    apply_pass,
    assert_same_outputs,
    make_model,
    op_counts,
    rand,
    run,
    run_pipeline,
)

HEADER = '<ir_version: 8, opset_import: ["" : 13]>\n'

# x -> Conv(w) -> y            (live)
# x -> Conv(wd) -> d -> Relu   (dead: reaches no output)
# extra                        (input nothing reads)
DEAD = HEADER + """
g (float[N, 3, 8, 8] x, float[N, 2] extra) => (float[N, 4, 8, 8] y) {
    y = Conv <pads = [1, 1, 1, 1]> (x, w)
    d = Conv <pads = [1, 1, 1, 1]> (x, wd)
    r = Relu (d)
}"""


def dead_model():
    return make_model(DEAD, {"w": rand((4, 3, 3, 3), 0), "wd": rand((4, 3, 3, 3), 1)})


def test_remove_dead_chain_and_unused_input_removed():
    model = dead_model()
    out, report = run_pipeline(model, ["remove-dead"])
    record = report.passes[0]
    assert record.status == "applied"
    assert record.stats == {"dead_nodes": 2, "dead_initializers": 1, "unused_inputs_removed": 1}
    assert record.size_after < record.size_before
    assert op_counts(out) == {"Conv": 1}
    assert [i.name for i in out.graph.initializer] == ["w"]
    assert [i.name for i in out.graph.input] == ["x"]
    feed = {"x": rand((2, 3, 8, 8), 5)}
    np.testing.assert_array_equal(run(out, feed)["y"], run(model, {**feed, "extra": rand(
        (2, 2), 6)})["y"])


def test_remove_dead_input_read_only_by_dead_nodes_removed():
    # k feeds only the dead Add: one run removes the Add and the input.
    text = HEADER + """
    g (float[N, 4] x, float[N, 4] k) => (float[N, 4] y) {
        y = Relu (x)
        d = Add (x, k)
    }"""
    model = make_model(text)
    out, result = apply_pass(RemoveDead, model)
    assert result.stats == {"dead_nodes": 1, "dead_initializers": 0, "unused_inputs_removed": 1}
    assert [i.name for i in out.graph.input] == ["x"]
    assert op_counts(out) == {"Relu": 1}
    _, again = apply_pass(RemoveDead, out)
    assert not again.changed


def test_remove_dead_if_subgraph_captures_kept():
    # p = Relu(x2) and the input x2 are read only inside the If branches (one nested).
    text = HEADER + """
    g (float[2, 4] x, float[2, 4] x2, float[2, 4] x3, bool k) => (float[2, 4] y) {
        p = Relu (x2)
        q = Neg (x3)
        y = If (k) <
            then_branch = g1 () => (float[2, 4] a) { a = Add (x, p) },
            else_branch = g2 () => (float[2, 4] e) {
                e = If (k) <
                    then_branch = g3 () => (float[2, 4] f) { f = Mul (x, q) },
                    else_branch = g4 () => (float[2, 4] h) { h = Sub (x, q) }>
            }>
    }"""
    model = make_model(text)
    out, result = apply_pass(RemoveDead, model)
    assert not result.changed
    assert result.stats == {"dead_nodes": 0, "dead_initializers": 0, "unused_inputs_removed": 0}
    assert [i.name for i in out.graph.input] == ["x", "x2", "x3", "k"]
    assert op_counts(out) == {"Relu": 1, "Neg": 1, "If": 1}
    for flag in (True, False):
        feed = {"x": rand((2, 4), 1), "x2": rand((2, 4), 2), "x3": rand((2, 4), 3),
                "k": np.array(flag)}
        np.testing.assert_array_equal(run(out, feed)["y"], run(model, feed)["y"])


def test_remove_dead_clean_model_is_no_op():
    model = make_model(HEADER + """
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w)
    }""", {"w": rand((4, 3, 3, 3), 0)})
    out, report = run_pipeline(model, ["remove-dead"])
    assert report.passes[0].status == "no-op"
    assert out.SerializeToString() == model.SerializeToString()
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_remove_dead_second_run_changes_nothing():
    once, report = run_pipeline(dead_model(), ["remove-dead"])
    twice, second = run_pipeline(once, ["remove-dead"])
    assert report.passes[0].status == "applied"
    assert second.passes[0].status == "no-op"
    assert twice.SerializeToString() == once.SerializeToString()
