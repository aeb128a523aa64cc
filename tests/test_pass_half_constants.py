"""half-constants: float32 constants stored as float16 + Cast folded at load.

Tolerances: float16 rounding moves each constant by at most 2^-11 of itself, so the
outputs of these small CNNs move by ~1e-3 relative at most (stated per assertion).
"""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxslim_cnn import model_io
from onnxslim_cnn.passes.base import PassContext
from onnxslim_cnn.passes.half_constants import HalfConstants

from .helpers import (
    apply_pass,
    feeds,
    make_float16,
    make_model,
    op_counts,
    optimized_ops,
    rand,
    run,
    run_pipeline,
    shared_model,
)
from .test_auto import TEXT
from .test_auto import model as small_cnn


def weights(**over):
    """test_auto's small CNN: w1[32,8,3,3], b1[32], w2[64,32,3,3], b2[64], w3[64,10]."""
    return {t.name: numpy_helper.to_array(t) for t in small_cnn().graph.initializer} | over


def cnn(**over):
    return make_model(TEXT, weights(**over))


def halved(model, compact=True):
    """The pass as a pipeline with compact-names after it runs it (or without)."""
    return apply_pass(HalfConstants, model,
                      ctx=PassContext(later=("compact-names",) if compact else ()))


def test_half_constants_outputs_within_float16_rounding():
    m = cnn()
    out, result = halved(m)
    # w1, w2, b2 and w3 (b1 has fewer than 64 values)
    assert result.stats["constants_halved"] == 4
    assert result.stats["bytes_saved"] == 2 * (8 * 32 * 9 + 64 * 32 * 9 + 64 + 640)
    assert op_counts(out)["Cast"] == 4
    kept = {t.name: t.data_type for t in out.graph.initializer}
    assert kept["b1"] == onnx.TensorProto.FLOAT  # below MIN_VALUES
    assert sum(t == onnx.TensorProto.FLOAT16 for t in kept.values()) == 4
    assert model_io.model_bytes(out) < model_io.model_bytes(m) * 0.55
    feed = feeds(m, 3)
    ref, got = run(m, feed)["y"], run(out, feed)["y"]
    # float16 constants: relative output error ~1e-4, asserted below 2e-3
    assert np.linalg.norm(got - ref) < 2e-3 * np.linalg.norm(ref)
    assert not np.array_equal(got, ref)  # the rounding is real


def test_half_constants_cast_is_folded_by_onnxruntime(tmp_path):
    out, _ = halved(cnn())
    # onnxruntime's constant folding removes every Cast of a constant at load
    assert "Cast" not in optimized_ops(out, tmp_path)


@pytest.mark.parametrize("name, values", [
    # one value > 65504 beside weights of ~0.1: no power of two keeps both
    ("w2", lambda w: np.where(np.arange(w.size).reshape(w.shape) == 5, 7e4, w)),
    ("w2", lambda w: np.where(np.arange(w.size).reshape(w.shape) == 5, np.inf, w)),
])
def test_half_constants_declines_values_float16_cannot_hold(name, values):
    w = weights()
    out, result = halved(cnn(**{name: values(w[name]).astype(np.float32)}))
    assert result.declined["values outside float16's range or precision"] == 1
    kept = {t.name: t.data_type for t in out.graph.initializer}
    assert kept[name] == onnx.TensorProto.FLOAT and result.stats["constants_halved"] == 3


@pytest.mark.parametrize("name, factor", [
    ("b2", 1e-5),  # every value in float16's subnormal range (~1 % rounding as it is)
    ("w3", 0.04),  # |w| < 1/16 with values near 0: subnormal spacing > 2^-11 of 1/1024
    ("w2", 1e6),  # every value beyond 65504
])
def test_half_constants_small_or_large_tensors_go_through_a_power_of_two(name, factor,
                                                                        tmp_path):
    w = weights()
    values = w[name] * factor
    if name == "w3":
        values.flat[:3] = [1e-9, -3e-8, 2e-7]
    m = cnn(**{name: values.astype(np.float32)})
    with np.errstate(over="ignore"):
        plain = np.asarray(values, np.float32).astype(np.float16).astype(np.float32)
    assert not np.all(np.abs(plain - values) <= 2.0 ** -11 * np.maximum(
        np.abs(values), np.abs(values).max() / 1024))  # a plain cast would not do
    out, result = halved(m)
    assert not result.declined and result.stats["constants_halved"] == 4
    assert op_counts(out)["Mul"] == 1 and op_counts(out)["Cast"] == 4
    feed = feeds(m, 3)
    ref, got = run(m, feed)["y"], run(out, feed)["y"]
    assert np.linalg.norm(got - ref) < 2e-3 * np.linalg.norm(ref)  # float16 rounding
    assert not {"Cast", "Mul"} & set(optimized_ops(out, tmp_path))  # folded at load


def test_half_constants_tiny_values_beside_large_ones_are_halved():
    w = weights()
    b2 = w["b2"].copy()
    b2[:4] = [1e-9, -1e-9, 0.0, 5e-8]  # below 1/1024 of the largest bias: negligible
    _, result = halved(cnn(b2=b2))
    assert not result.declined and result.stats["constants_halved"] == 4


def test_half_constants_leaves_qdq_scales_and_float16_models_alone():
    text = """
    <ir_version: 8, opset_import: ["" : 14]>
    g (float[2, 64] x) => (float[2, 64] y) {
        w = DequantizeLinear <axis = 1> (wq, sc)
        y = MatMul (x, w)
    }
    """
    wq = (rand((64, 64), 1, 40.0)).clip(-127, 127).astype(np.int8)
    m = make_model(text, {"wq": wq, "sc": np.full((64,), 0.02, np.float32)})
    _, result = halved(m)
    assert not result.changed
    assert result.declined["read by QuantizeLinear/DequantizeLinear"] == 1
    w = {k: v.astype(np.float16) for k, v in weights().items()}
    _, result = halved(make_float16(TEXT, w))
    assert not result.changed and not result.declined


def test_half_constants_through_the_manager_after_cluster_weights():
    m = cnn()
    plain, _ = run_pipeline(m, ["cluster-weights", "compact-names"], options={"bits": 4})
    out, report = run_pipeline(m, ["cluster-weights", "half-constants", "compact-names"],
                               options={"bits": 4})
    half = report.passes[1]
    # what clustering left in float32 (here the corrected 64-value bias b2; the 16-entry
    # codebooks are below MIN_VALUES) shrinks; the names it adds are counted as
    # compact-names leaves them, so the file is smaller
    assert half.status == "applied" and half.stats["constants_halved"] >= 1
    assert model_io.model_bytes(out) < model_io.model_bytes(plain) - half.stats["bytes_saved"] / 2
    assert report.final["cosine"] > 0.99


def test_half_constants_without_compact_names_never_grows_the_file():
    _, report = run_pipeline(cnn(), ["cluster-weights", "half-constants"], options={"bits": 4})
    half = report.passes[1]
    # the clustering's decode constants carry long names: halving a 64-value bias
    # there adds more name bytes than it saves, so it stays float32
    assert half.declined["the Cast and its names cost more than float16 saves"] >= 1
    assert half.size_after <= half.size_before


def test_half_constants_shared_efficientnet(tmp_path):
    path = shared_model("efficientnet_lite0")
    m = onnx.load(path)
    out, report = run_pipeline(m, ["fold-bn", "half-constants"])
    half = report.passes[1]
    # every float32 weight and bias: the file halves, outputs stay within 1e-3 cosine
    assert half.status == "applied"
    assert half.size_after < 0.51 * half.size_before
    assert report.final["cosine"] > 0.999
