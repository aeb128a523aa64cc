"""remove-identity on tiny graphs: exact outputs (rtol=atol=0) and structure.

Removing an Identity or an inference-mode Dropout computes nothing differently, so the
outputs must be bit-identical.
"""

import numpy as np
import pytest

from onnxslim_cnn.passes.remove_identity import RemoveIdentity

from .helpers import apply_pass, assert_same_outputs, make_model, op_counts, rand, run

WEIGHTS = {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1)}


def output_names(model) -> list[str]:
    return [o.name for o in model.graph.output]


def test_remove_identity_middle_removed():
    # x -> Conv -> c -> Identity -> u -> Relu -> y
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        u = Identity (c)
        y = Relu (u)
    }"""
    model = make_model(text, WEIGHTS)
    out, result = apply_pass(RemoveIdentity, model)
    assert result.changed and result.stats == {"identity_removed": 1}
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    assert out.graph.node[1].input[0] == "c"
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_remove_identity_graph_output_keeps_name():
    # x -> Conv -> c -> Identity -> y (graph output); c also feeds Relu -> z
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y, float[N, 4, 8, 8] z) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Identity (c)
        z = Relu (c)
    }"""
    model = make_model(text, WEIGHTS)
    out, result = apply_pass(RemoveIdentity, model)
    assert result.stats == {"identity_removed": 1}
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    assert output_names(out) == ["y", "z"]
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert list(conv.output) == ["y"]  # the producer took over the output name
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_remove_identity_chain_to_graph_output_removed():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        u = Identity (c)
        y = Identity (u)
    }"""
    model = make_model(text, WEIGHTS)
    out, result = apply_pass(RemoveIdentity, model)
    assert result.stats == {"identity_removed": 2}
    assert op_counts(out) == {"Conv": 1}
    assert output_names(out) == ["y"] and list(out.graph.node[0].output) == ["y"]
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_remove_identity_two_unnamed_on_one_tensor_removed():
    # c -> Identity -> u -> Relu -> y and c -> Identity -> v -> Neg -> z, nodes unnamed:
    # once bypassed, the two Identities must not be confused with each other.
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y, float[N, 4, 8, 8] z) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        u = Identity (c)
        v = Identity (c)
        y = Relu (u)
        z = Neg (v)
    }"""
    model = make_model(text, WEIGHTS)
    out, result = apply_pass(RemoveIdentity, model)
    assert result.stats == {"identity_removed": 2}
    assert op_counts(out) == {"Conv": 1, "Relu": 1, "Neg": 1}
    assert_same_outputs(model, out, rtol=0, atol=0)


# opset -> Dropout line; all are inference-mode Dropouts
DROPOUTS = {
    "opset7-ratio-attr": (7, "d = Dropout <ratio = 0.3> (c)", {}),
    "opset7-unused-mask": (7, "d, mask = Dropout (c)", {}),
    "opset12-no-inputs": (12, "d = Dropout (c)", {}),
    "opset12-ratio": (12, "d = Dropout (c, r)", {"r": np.array(0.3, np.float32)}),
    "opset12-training-false": (12, "d, mask = Dropout (c, r, tm)",
                               {"r": np.array(0.3, np.float32), "tm": np.array(False)}),
    "opset13-training-false": (13, "d = Dropout (c, r, tm)",
                               {"r": np.array(0.5, np.float32), "tm": np.array(False)}),
}


@pytest.mark.parametrize("case", sorted(DROPOUTS))
def test_remove_identity_inference_dropout_removed(case):
    opset, line, extra = DROPOUTS[case]
    text = f"""
    <ir_version: 7, opset_import: ["" : {opset}]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        {line}
        y = Relu (d)
    }}"""
    model = make_model(text, {**WEIGHTS, **extra})
    out, result = apply_pass(RemoveIdentity, model)
    assert result.stats == {"dropout_removed": 1}
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    assert len(out.graph.initializer) == 2  # ratio / training_mode constants gone
    assert_same_outputs(model, out, rtol=0, atol=0)


HEADER = '<ir_version: 8, opset_import: ["" : 13]>\n'
# name -> (graph, extra weights, expected reason)
DECLINES = {
    "dropout-mask-output": ("""
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y, bool[N, 4, 8, 8] mask) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y, mask = Dropout (c)
        }""", {}, "Dropout mask output is used"),
    "dropout-mask-consumed": ("""
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y, float[N, 4, 8, 8] z) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y, mask = Dropout (c)
            z = Cast <to = 1> (mask)
        }""", {}, "Dropout mask output is used"),
    "dropout-training-input": ("""
        g (float[N, 3, 8, 8] x, bool tm) => (float[N, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = Dropout (c, r, tm)
        }""", {"r": np.array(0.5, np.float32)}, "Dropout may run in training mode"),
    "dropout-training-true": ("""
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = Dropout (c, r, tm)
        }""", {"r": np.array(0.5, np.float32), "tm": np.array(True)},
        "Dropout may run in training mode"),
    "input-to-output": ("""
        g (float[N, 3, 8, 8] x) => (float[N, 3, 8, 8] y) {
            y = Identity (x)
        }""", {}, "connects a graph input or constant directly to a graph output"),
    "constant-to-output": ("""
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y, float[4] z) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            z = Identity (b)
        }""", {}, "connects a graph input or constant directly to a graph output"),
    "output-to-output": ("""
        g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y, float[N, 4, 8, 8] z) {
            y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            z = Identity (y)
        }""", {}, "input and output are both graph outputs"),
}


@pytest.mark.parametrize("case", sorted(DECLINES))
def test_remove_identity_unsafe_site_declines(case):
    body, extra, reason = DECLINES[case]
    model = make_model(HEADER + body, {**WEIGHTS, **extra})
    out, result = apply_pass(RemoveIdentity, model)
    assert not result.changed and not result.stats
    assert result.declined == {reason: 1}
    assert op_counts(out) == op_counts(model)
    assert output_names(out) == output_names(model)


def test_remove_identity_captured_by_if_subgraph_declines():
    # u = Identity(x) is read by name inside the else branch of the If.
    text = HEADER + """
    g (float[2, 4] x, bool k) => (float[2, 4] y) {
        u = Identity (x)
        v = Relu (u)
        y = If (k) <then_branch = g1 () => (float[2, 4] a) { a = Relu (v) },
                    else_branch = g2 () => (float[2, 4] e) { e = Neg (u) }>
    }"""
    model = make_model(text)
    out, result = apply_pass(RemoveIdentity, model)
    assert not result.changed
    assert result.declined == {"output is referenced inside a subgraph": 1}
    assert op_counts(out) == {"Identity": 1, "Relu": 1, "If": 1}
    for flag in (True, False):
        feed = {"x": rand((2, 4), 3), "k": np.array(flag)}
        np.testing.assert_array_equal(run(out, feed)["y"], run(model, feed)["y"])


def test_remove_identity_second_run_changes_nothing():
    text = HEADER + """
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        u = Identity (c)
        y = Dropout (u)
    }"""
    model = make_model(text, WEIGHTS)
    once, first = apply_pass(RemoveIdentity, model)
    twice, second = apply_pass(RemoveIdentity, once)
    assert first.stats == {"identity_removed": 1, "dropout_removed": 1}
    assert not second.changed and not second.stats and not second.declined
    assert twice.graph.SerializeToString() == once.graph.SerializeToString()
