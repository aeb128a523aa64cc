"""Models with If/Loop bodies through every pass and every preset: the result passes the
checker, runs in onnxruntime and matches the original on inputs taking each branch.

Bodies read outer-scope tensors (an activation, initializers, one initializer
duplicated bit for bit in the outer graph, an Identity output read only by a body), so
a pass that renames, merges or drops outer tensors without looking inside the bodies
breaks the model. Passes may process the bodies or leave them alone; either way the
If/Loop node and its bodies must survive.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim_cnn import validate
from onnxslim_cnn.calibration import load_dataset
from onnxslim_cnn.config import Budget, Config, Tolerance
from onnxslim_cnn.errors import ValidationError
from onnxslim_cnn.manager import PRESETS, compress
from onnxslim_cnn.passes import REGISTRY

from .helpers import make_model, positive, rand
from .test_properties import DATA, apply_as_manager, context

#   x -> Conv -> BN -> Relu -> r0 -> Identity -> r1 (read only by the bodies)
#   cond = mean(x) > 0
#   If(cond): then  Conv1x1(r1, w_then) -> Identity -> Relu
#             else  Conv3x3(r1, w_else) -> BN -> Mul(0.5 const inside the body)
#   -> Conv1x1(w_dup == w_then) -> GlobalAveragePool -> Flatten -> Gemm -> y
IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 3, 8, 8] x) => (float[N, 5] y) {
    c0 = Conv <pads = [1, 1, 1, 1]> (x, w0, b0)
    n0 = BatchNormalization (c0, g, beta, mean, var)
    r0 = Relu (n0)
    r1 = Identity (r0)
    m = ReduceMean <keepdims = 0> (x)
    zero = Constant <value = float {0.0}> ()
    cond = Greater (m, zero)
    h = If (cond) <
        then_branch = then_g () => (float[N, 4, 8, 8] t_out) {
            t1 = Conv (r1, w_then)
            t_id = Identity (t1)
            t_out = Relu (t_id)
        },
        else_branch = else_g () => (float[N, 4, 8, 8] e_out) {
            e1 = Conv <pads = [1, 1, 1, 1]> (r1, w_else)
            e2 = BatchNormalization (e1, g, beta, mean, var)
            half = Constant <value = float {0.5}> ()
            e_out = Mul (e2, half)
        }
    >
    z = Conv (h, w_dup)
    p = GlobalAveragePool (z)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, fc_w, fc_b)
}
"""

#   x -> Conv -> BN -> Relu -> r0
#   Loop 3 times: v = Relu(BN(Conv3x3(v, w_loop, b_loop))) + Identity inside the body
#   -> GlobalAveragePool -> Flatten -> Gemm -> y
LOOP_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 3, 8, 8] x) => (float[N, 5] y) {
    c0 = Conv <pads = [1, 1, 1, 1]> (x, w0, b0)
    n0 = BatchNormalization (c0, g, beta, mean, var)
    r0 = Relu (n0)
    trip = Constant <value = int64 {3}> ()
    go = Constant <value = bool {1}> ()
    v = Loop (trip, go, r0) <
        body = loop_body (int64 i, bool c_in, float[N, 4, 8, 8] v_in)
                => (bool c_out, float[N, 4, 8, 8] v_out) {
            c_out = Identity (c_in)
            l1 = Conv <pads = [1, 1, 1, 1]> (v_in, w_loop, b_loop)
            l2 = BatchNormalization (l1, g, beta, mean, var)
            l3 = Identity (l2)
            v_out = Relu (l3)
        }
    >
    p = GlobalAveragePool (v)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, fc_w, fc_b)
}
"""


# The same If with a condition known when the graph is built: fold-constants may inline
# the taken branch (then the If is gone, legitimately).
CONST_IF_MODEL = IF_MODEL.replace("m = ReduceMean <keepdims = 0> (x)",
                                  "m = Constant <value = float {1.0}> ()")
MODELS = {"if": IF_MODEL, "loop": LOOP_MODEL, "if-const": CONST_IF_MODEL}


def shared_weights() -> dict[str, np.ndarray]:
    w_then = rand((4, 4, 1, 1), 5, 0.5)
    return {
        "w0": rand((4, 3, 3, 3), 1, 0.3), "b0": rand((4,), 2, 0.1),
        "g": positive((4,), 3), "beta": rand((4,), 4, 0.1),
        "mean": rand((4,), 6, 0.1), "var": positive((4,), 7),
        "w_then": w_then, "w_dup": w_then.copy(), "w_else": rand((4, 4, 3, 3), 8, 0.2),
        "w_loop": rand((4, 4, 3, 3), 9, 0.2), "b_loop": rand((4,), 10, 0.1),
        "fc_w": rand((5, 4), 11, 0.5), "fc_b": rand((5,), 12, 0.1),
    }


def build(kind: str) -> onnx.ModelProto:
    text = MODELS[kind]
    model = onnx.parser.parse_model(text)
    used = _names_read(model.graph)
    weights = {k: v for k, v in shared_weights().items() if k in used}
    return make_model(text, weights)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _names_read(attr.g)
    return names


def branch_feeds() -> list[dict[str, np.ndarray]]:
    """Inputs taking the then branch (mean > 0) and the else branch (mean < 0), close to
    the standard normal calibration data (mean +-0.25, the batch mean's std is 0.05)."""
    x = rand((2, 3, 8, 8), 50)
    x -= x.mean()
    return [{"x": x + 0.25}, {"x": x - 0.25}]


def subgraph_ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node if n.op_type in ("If", "Loop")}


def assert_structure(original, candidate, kind: str) -> None:
    onnx.checker.check_model(candidate, full_check=True)
    if kind == "if-const":
        assert subgraph_ops(candidate) <= subgraph_ops(original)
    else:
        assert subgraph_ops(candidate) == subgraph_ops(original)


def assert_matches(original, candidate, lossless: bool) -> None:
    for feed in branch_feeds():
        ref = validate.run_model(original, [feed], optimization="disable")
        got = validate.run_model(candidate, [feed], optimization="disable")
        if lossless:
            assert validate.check_lossless(ref, got, Tolerance()) is None
        else:
            assert validate.check_budget(validate.compare(ref, got), Budget()) is None


@pytest.mark.parametrize("kind", ["if", "loop"])
def test_subgraph_models_take_both_paths(kind):
    outputs = [validate.run_model(build(kind), [f])["y"] for f in branch_feeds()]
    assert outputs[0].shape == (2, 5) and not np.allclose(outputs[0], outputs[1], atol=1e-3)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_pass_subgraph_model_intact_and_matches(kind, name):
    model = build(kind)
    candidate, _ = apply_as_manager(name, model, context(load_dataset(DATA, model)))
    if candidate is None:
        return  # declined: nothing to break
    assert_structure(model, candidate, kind)
    for feed in branch_feeds():
        got = validate.run_model(candidate, [feed], optimization="disable")
        assert all(np.isfinite(v).all() for v in got.values())
    if REGISTRY[name].lossless:
        assert_matches(model, candidate, lossless=True)


def pipelines() -> list:
    params, seen = [], set()
    for preset, names in sorted(PRESETS.items()):
        if names not in seen:
            seen.add(names)
            params.append(pytest.param(names, id=f"preset-{preset}"))
    return params


@pytest.mark.parametrize("pipeline", pipelines())
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_presets_subgraph_model_written_result_matches(kind, pipeline, tmp_path):
    model = build(kind)
    onnx.save(model, tmp_path / "in.onnx")
    try:
        report = compress(tmp_path / "in.onnx", tmp_path / "out.onnx",
                          Config(passes=pipeline, data=DATA))
    except ValidationError:
        assert not (tmp_path / "out.onnx").exists()
        return
    assert report.written
    written = onnx.load(tmp_path / "out.onnx")
    assert_structure(model, written, kind)
    assert_matches(model, written, all(REGISTRY[n].lossless for n in pipeline))
