"""qdq-int8: placement, onnxruntime int8 fusion, saturation safety, ranges, real models."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from onnxslim_cnn import Budget, Config, DataConfig, compress
from onnxslim_cnn.passes.base import PassContext
from onnxslim_cnn.passes.qdq import QdqInt8, calibrate, saturation

from .helpers import (
    apply_pass,
    make_model,
    op_counts,
    rand,
    run,
    shared_dataset,
    shared_model,
)

# x -> Conv -> Relu -> MaxPool -> Conv -> Relu -> GAP -> Flatten -> Gemm -> y
CNN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 16, 16] x) => (float[N, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
    c2 = Conv <pads = [1, 1, 1, 1]> (p1, w2, b2)
    r2 = Relu (c2)
    g2 = GlobalAveragePool (r2)
    f2 = Flatten (g2)
    y = Gemm <transB = 1> (f2, w3, b3)
}
"""


def cnn_weights(seed=0):
    return {"w1": rand((8, 3, 3, 3), seed, 0.3), "b1": rand((8,), seed + 1, 0.1),
            "w2": rand((16, 8, 3, 3), seed + 2, 0.2), "b2": rand((16,), seed + 3, 0.1),
            "w3": rand((10, 16), seed + 4, 0.3), "b3": rand((10,), seed + 5, 0.1)}


# x -> Conv -> Relu -> GAP -> Flatten -> Gemm -> y (wide enough for codebooks to pay)
CONV_GEMM = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[N, 16, 8, 8] x) => (float[N, 64] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (c)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, w2, b2)
}
"""


def conv_gemm_weights():
    return {"w1": rand((32, 16, 3, 3), 0, 0.2), "b1": rand((32,), 1, 0.1),
            "w2": rand((64, 32), 2, 0.3), "b2": rand((64,), 3, 0.1)}


def calib(model_shape=(4, 3, 16, 16), batches=4, seed=100):
    return [{"x": rand(model_shape, seed + i)} for i in range(batches)]


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter:
    """Op types in onnxruntime's optimized graph (all optimisations, as deployed)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_qdq_cnn_fuses_into_int8_kernels_and_matches(tmp_path):
    model = make_model(CNN, cnn_weights())
    out, result = apply_pass(QdqInt8, model, ctx=PassContext(calib=calib()))
    assert result.changed and result.stats["weights"] == 3
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0 and ops.get("FusedConv", 0) == 0
    assert ops["QGemm"] == 1
    feed = {"x": rand((8, 3, 16, 16), 999)}  # not calibration data
    ref, got = run(model, feed)["y"], run(out, feed, optimization="all")["y"]
    assert cosine(ref, got) > 0.999  # stated tolerance for int8 vs fp32 logits


def test_qdq_float16_model_runs_int8_inside_and_keeps_float16_io(tmp_path):
    """float16 in, float16 out; float32 (then int8) inside: onnxruntime fuses QDQ only
    around float32 tensors."""
    text = CNN.replace("float[", "float16[")
    weights = {k: v.astype(np.float16) for k, v in cnn_weights().items()}
    model = make_model(text, weights)
    batches = [{"x": b["x"].astype(np.float16)} for b in calib()]
    out, result = apply_pass(QdqInt8, model, ctx=PassContext(calib=batches))
    assert result.stats["float16_tensors_upcast"] > 0
    assert out.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert out.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1
    feed = {"x": rand((8, 3, 16, 16), 999, dtype=np.float16)}
    ref, got = run(model, feed)["y"], run(out, feed, optimization="all")["y"]
    assert got.dtype == np.float16
    assert cosine(ref, got) > 0.999  # same bound as the float32 model


def _cluster_then_qdq(model, ctx, granularity, bits):
    """cluster-weights then qdq-int8 on the CONV_GEMM net: (clustered, out, int8 bytes,
    packed index bytes), both layers' codebooks turned into int8 ones."""
    from onnxslim_cnn.passes.cluster import ClusterWeights

    clustered, cres = apply_pass(ClusterWeights, model,
                                 {"bits": bits, "granularity": granularity}, ctx)
    assert cres.stats["layers_clustered"] == 2
    out, result = apply_pass(QdqInt8, clustered, ctx=ctx)
    coded = [r for r in result.layers if "weight_codebook" in r]
    assert len(coded) == 2 and {r["weight_codebook"] for r in coded} == {
        "int8 scaled per channel" if granularity == "scaled" else f"int8 per {granularity}"}
    int8 = sum(onnx.numpy_helper.to_array(t).size for t in out.graph.initializer
               if t.data_type == onnx.TensorProto.INT8)
    packed = sum(onnx.numpy_helper.to_array(t).size for t in out.graph.initializer
                 if t.data_type == onnx.TensorProto.UINT8 and "packed" in t.name)
    return clustered, out, int8, packed


@pytest.mark.parametrize(("granularity", "bits"), [("tensor", 5), ("channel", 4),
                                                   ("scaled", 3)])
def test_qdq_after_cluster_keeps_packed_indices_and_runs_int8_kernels(tmp_path, granularity,
                                                                       bits):
    """cluster-weights then qdq-int8: the codebook becomes int8 (per tensor: one scale
    for the shared entries; per channel: one per row; scaled per channel: the shared
    entries, the channel scales in the DequantizeLinear), the packed indices stay, and
    onnxruntime folds Gather and fuses the DQ into QLinearConv/QGemm."""
    model = make_model(CONV_GEMM, conv_gemm_weights())
    ctx = PassContext(calib=calib((4, 16, 8, 8)))
    clustered, out, int8, packed = _cluster_then_qdq(model, ctx, granularity, bits)
    weights = 32 * 16 * 9 + 64 * 32
    # codebooks only; indices packed (5 bits: a 4-bit and a 1-bit plane, added as uint8)
    assert int8 < weights / 4 and packed == weights * bits // 8
    if granularity == "scaled":  # 2 shared 8-entry codebooks + per-channel zero points
        assert int8 == 2 * 8 + 32 + 64 and op_counts(out).get("Mul", 0) == 0
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1
    assert not {"Conv", "Gather", "BitShift", "DequantizeLinear"} & set(ops), ops
    assert ops["QuantizeLinear"] == 1  # the graph input's only: no decode tensor quantized
    feed = {"x": rand((8, 16, 8, 8), 999)}  # not calibration data
    ref, got = run(clustered, feed)["y"], run(out, feed, optimization="all")["y"]
    assert cosine(ref, got) > 0.999  # the same bound as int8 of a float model


@pytest.mark.parametrize(("granularity", "bits"), [("tensor", 5), ("channel", 2),
                                                   ("scaled", 3)])
def test_qdq_after_cluster_float16_model_runs_int8_kernels(tmp_path, granularity, bits):
    """The float16 twin of the test above: cluster-weights keeps the model float16 (a
    scaled codebook's decode ends in Cast(to=FLOAT16)); qdq-int8 computes it in float32
    (Cast(to=FLOAT)), recognises the codebooks through that Cast and makes them int8.
    (2-bit per-channel codebooks: at 4 bits the Gemm's 4 kB of float16 would not pay.)"""
    model = make_model(CONV_GEMM.replace("float[", "float16["),
                       {k: v.astype(np.float16) for k, v in conv_gemm_weights().items()})
    ctx = PassContext(calib=[{"x": b["x"].astype(np.float16)} for b in calib((4, 16, 8, 8))])
    clustered, out, int8, packed = _cluster_then_qdq(model, ctx, granularity, bits)
    weights = 32 * 16 * 9 + 64 * 32
    assert int8 < weights / 4 and packed == -(-weights * bits // 8)
    # Casts left: the float16 input's and output's, and the two index Casts; no decode
    # Cast (nor Mul) of a scaled codebook, its scale is in the DequantizeLinear's
    casts = sorted(next(a.i for a in n.attribute if a.name == "to")
                   for n in out.graph.node if n.op_type == "Cast")
    assert casts == sorted([onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                            onnx.TensorProto.INT32, onnx.TensorProto.INT32])
    assert op_counts(out).get("Mul", 0) == 0
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1
    assert not {"Conv", "Gather", "BitShift", "DequantizeLinear"} & set(ops), ops
    assert ops["QuantizeLinear"] == 1  # the graph input's only: no decode tensor quantized
    feed = {"x": rand((8, 16, 8, 8), 999, dtype=np.float16)}  # not calibration data
    ref, got = run(clustered, feed)["y"], run(out, feed, optimization="all")["y"]
    assert got.dtype == np.float16
    assert cosine(ref, got) > 0.999  # the same bound as the float32 model


# MobileNetV3-style block: 1x1 expand -> HardSwish -> depthwise -> HardSwish ->
# squeeze-excite (GAP -> Conv -> Relu -> Conv -> HardSigmoid -> Mul) -> 1x1 project
# -> Swish (x * Sigmoid(x)) -> residual Add
MBV3 = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[N, 8, 12, 12] x) => (float[N, 8, 12, 12] y) {
    e = Conv (x, we, be)
    h = HardSwish (e)
    d = Conv <group = 16, pads = [1, 1, 1, 1]> (h, wd, bd)
    hd = HardSwish (d)
    s = GlobalAveragePool (hd)
    s1 = Conv (s, ws1, bs1)
    r1 = Relu (s1)
    s2 = Conv (r1, ws2, bs2)
    gate = HardSigmoid <alpha = 0.1666667, beta = 0.5> (s2)
    m = Mul (hd, gate)
    p = Conv (m, wp, bp)
    sg = Sigmoid (p)
    q = Mul (p, sg)
    y = Add (q, x)
}
"""


def test_qdq_mobilenetv3_block_fuses_convs_mul_sigmoid_pool(tmp_path):
    shapes = {"we": (16, 8, 1, 1), "wd": (16, 1, 3, 3), "ws1": (4, 16, 1, 1),
              "ws2": (16, 4, 1, 1), "wp": (8, 16, 1, 1)}
    weights = {}
    for i, (name, shape) in enumerate(shapes.items()):
        weights[name] = rand(shape, 2 * i, 0.3)
        weights["b" + name[1:]] = rand((shape[0],), 2 * i + 1, 0.1)
    model = make_model(MBV3, weights)
    batches = [{"x": rand((4, 8, 12, 12), 100 + i)} for i in range(4)]
    out, result = apply_pass(QdqInt8, model, ctx=PassContext(calib=batches))
    assert result.stats["weights"] == 5 and not result.declined
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 5 and ops.get("Conv", 0) == 0
    assert ops["QLinearMul"] == 2 and ops["QLinearSigmoid"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1
    feed = {"x": rand((8, 8, 12, 12), 999)}
    ref, got = run(model, feed)["y"], run(out, feed, optimization="all")["y"]
    assert cosine(ref, got) > 0.999  # stated bound for a 5-conv int8 block


def test_qdq_maxpool_output_shares_input_params():
    model = make_model(CNN, cnn_weights())
    out, _ = apply_pass(QdqInt8, model, ctx=PassContext(calib=calib()))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    q_nodes = {n.input[0]: n for n in out.graph.node if n.op_type == "QuantizeLinear"}
    before, after = q_nodes["r1"], q_nodes["p1"]
    assert inits[before.input[1]] == inits[after.input[1]]
    assert inits[before.input[2]] == inits[after.input[2]]


def test_qdq_residual_add_and_concat_fuse(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 8, 8] x) => (float[N, 16, 8, 8] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        r = Relu (a)
        b = Conv (r, wb, bb)
        s = Add (b, x)
        c1 = Conv (s, wc, bc)
        c2 = Conv <pads = [1, 1, 1, 1]> (s, wd, bd)
        r1 = Relu (c1)
        r2 = Relu (c2)
        k = Concat <axis = 1> (r1, r2)
        y = Conv (k, we, be)
    }
    """
    weights = {"wa": rand((4, 4, 3, 3), 1, 0.3), "ba": rand((4,), 2, 0.1),
               "wb": rand((4, 4, 1, 1), 3, 0.3), "bb": rand((4,), 4, 0.1),
               "wc": rand((8, 4, 1, 1), 5, 0.3), "bc": rand((8,), 6, 0.1),
               "wd": rand((8, 4, 3, 3), 7, 0.3), "bd": rand((8,), 8, 0.1),
               "we": rand((16, 16, 1, 1), 9, 0.3), "be": rand((16,), 10, 0.1)}
    model = make_model(text, weights)
    out, _ = apply_pass(QdqInt8, model, ctx=PassContext(calib=calib((4, 4, 8, 8))))
    ops = optimized_ops(out, tmp_path)
    # The last Conv writes the graph output in float (no Q after it): 4 of 5 fuse.
    assert ops["QLinearConv"] == 4 and ops["QLinearAdd"] == 1
    assert ops["QLinearConcat"] + ops.get("Concat", 0) == 1
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    scales = {n.input[0]: float(inits[n.input[1]]) for n in out.graph.node
              if n.op_type == "QuantizeLinear"}
    assert scales["r1"] == scales["r2"]  # Concat inputs share one range
    feed = {"x": rand((4, 4, 8, 8), 777)}
    assert cosine(run(model, feed)["y"], run(out, feed, optimization="all")["y"]) > 0.999


# A 1x1 conv whose 8-bit weights make pairs of uint8 x int8 products overflow int16 on
# AVX2: input channels near their maximum, same-sign weights near the range limit. The
# Add after it gives the conv a quantized consumer, so onnxruntime runs QLinearConv.
SATURATING = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8, 4, 4] x) => (float[N, 4, 4, 4] y) {
    c = Conv (x, w, b)
    y = Add (c, c)
}
"""


def _saturating_model():
    w = np.full((4, 8, 1, 1), 0.9, np.float32)
    w[:, ::2] = 1.0
    return make_model(SATURATING, {"w": w, "b": np.zeros(4, np.float32)})


def _saturating_calib():
    rng = np.random.default_rng(5)
    return [{"x": rng.uniform(0.0, 1.0, (4, 8, 4, 4)).astype(np.float32)} for _ in range(2)]


@pytest.mark.parametrize("reduce_range", ["auto", "on"])
def test_qdq_saturation_safe_ranges_match_emulation(reduce_range):
    model = _saturating_model()
    out, _ = apply_pass(QdqInt8, model, {"reduce_range": reduce_range, "calib_method": "minmax"},
                        PassContext(calib=_saturating_calib()))
    feed = {"x": np.full((1, 8, 4, 4), 0.7, np.float32)}  # uint8 level ~178 everywhere
    kernel = run(out, feed, optimization="all")["y"]
    emulated = run(out, feed, optimization="disable")["y"]
    np.testing.assert_allclose(kernel, emulated, rtol=0, atol=0.05)
    np.testing.assert_allclose(kernel, run(model, feed)["y"], rtol=0.02)


def test_qdq_activation_levels_pay_for_the_pair_bound_when_cheaper():
    """Equal-magnitude weights and activations: 7-bit activations with 8-bit weights
    cost less output error than 8-bit activations with 7-bit weights (levels.py), and
    the int8 kernel still computes what the QDQ graph says."""
    feed = {"x": np.full((1, 8, 4, 4), 0.7, np.float32)}
    records = {}
    for mode in ("auto", "full"):
        out, result = apply_pass(QdqInt8, _saturating_model(),
                                 {"calib_method": "minmax", "activation_levels": mode},
                                 PassContext(calib=_saturating_calib()))
        records[mode] = result.layers[0]
        kernel = run(out, feed, optimization="all")["y"]
        np.testing.assert_allclose(kernel, run(out, feed, optimization="disable")["y"],
                                   rtol=0, atol=0.05)
        np.testing.assert_allclose(kernel, run(_saturating_model(), feed)["y"], rtol=0.02)
    assert records["full"]["input_levels"] == 255 and records["full"]["min_qmax"] < 127
    assert records["auto"]["input_levels"] < 255
    assert records["auto"]["min_qmax"] > records["full"]["min_qmax"]


def test_qdq_full_range_weights_saturate_only_where_the_host_kernel_does():
    """The trap the auto mode avoids: with 8-bit weights everywhere, an AVX2 int8 kernel
    (int16 pair sums) computes something else than the QDQ graph says; a VNNI kernel
    (int32 sums) computes the same. The host probe must tell which one runs here."""
    options = {"reduce_range": "off", "calib_method": "minmax"}
    out, result = apply_pass(QdqInt8, _saturating_model(), options,
                             PassContext(calib=_saturating_calib()))
    feed = {"x": np.full((1, 8, 4, 4), 0.7, np.float32)}
    kernel = run(out, feed, optimization="all")["y"]
    emulated = run(out, feed, optimization="disable")["y"]
    gap = float(np.max(np.abs(kernel - emulated)))
    saturates = saturation.host_kernel_saturates()
    assert result.stats["host_int8_pairs_saturate"] is saturates
    if saturates:
        assert gap > 1.0
    else:
        assert gap <= 0.05


TAIL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x) => (float[N, 6, 1, 1] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    r = Relu (c)
    p = GlobalAveragePool (r)
    y = Softmax <axis = 1> (p)
}
"""


def test_qdq_tail_pool_after_conv_runs_the_conv_in_int8(tmp_path):
    """x -> Conv -> Relu -> GAP -> Softmax: Q/DQ before the pool so the conv fuses into
    QLinearConv; the pool runs in float on the dequantized tensor."""
    model = make_model(TAIL, {"w": rand((6, 3, 3, 3), 1, 0.3), "b": rand((6,), 2, 0.1)})
    out, result = apply_pass(QdqInt8, model, ctx=PassContext(calib=calib((4, 3, 8, 8))))
    quantized = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "r"}
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["GlobalAveragePool"] == 1
    feed = {"x": rand((2, 3, 8, 8), 7)}
    got, want = run(out, feed, optimization="all")["y"], run(model, feed)["y"]
    assert np.max(np.abs(got - want)) < 2e-3  # softmax of 6 classes, averaged noise


def test_qdq_tail_pool_stays_float_without_int8_tails():
    model = make_model(TAIL, {"w": rand((6, 3, 3, 3), 1, 0.3), "b": rand((6,), 2, 0.1)})
    out, result = apply_pass(QdqInt8, model, {"int8_tails": False},
                             PassContext(calib=calib((4, 3, 8, 8))))
    quantized = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x"}
    assert result.stats["activations"] == 1


@pytest.mark.parametrize("int8_tails", [True, False])
def test_qdq_conv_read_only_by_float_ops_runs_int8(tmp_path, int8_tails):
    """Inception v1's pattern: Conv -> Relu -> MaxPool -> LRN -> Conv. No quantized op
    reads the first conv's output, yet it gets a Q/DQ so onnxruntime runs the conv as
    an int8 kernel (LRN and the pool stay float); without int8 tails it stays float."""
    text = CNN.replace("p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)",
                       "m1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)\n"
                       "    p1 = LRN <size = 3> (m1)")
    model = make_model(text, cnn_weights())
    out, _ = apply_pass(QdqInt8, model, {"int8_tails": int8_tails},
                        PassContext(calib=calib()))
    ops = optimized_ops(out, tmp_path)
    assert ops["LRN"] == 1
    assert ops["QLinearConv"] == (2 if int8_tails else 1), ops
    feed = {"x": rand((8, 3, 16, 16), 999)}  # not calibration data
    assert cosine(run(model, feed)["y"], run(out, feed, optimization="all")["y"]) > 0.999


def test_qdq_fp32_layers_declines_named_layer():
    model = make_model(CNN, cnn_weights())
    conv2 = model.graph.node[3]
    conv2.name = "conv2"
    out, result = apply_pass(QdqInt8, model, {"fp32_layers": ("conv2",)},
                             PassContext(calib=calib()))
    assert result.stats["kept_float"] == 1
    assert {"layer": "conv2", "op": "Conv", "kept_float": True,
            "why": "listed in fp32_layers"} in result.layers
    node = next(n for n in out.graph.node if n.name == "conv2")
    assert node.input[1] == "w2"  # the float weight, not a DequantizeLinear output


def test_qdq_check_declines_without_calibration_data():
    from onnxslim_cnn.errors import PreconditionError
    from onnxslim_cnn.manager import import_graph

    with pytest.raises(PreconditionError, match="calibration"):
        QdqInt8().check(import_graph(make_model(CNN, cnn_weights())), PassContext())


def test_qdq_old_opset_model_is_upgraded(tmp_path):
    text = """
    <ir_version: 3, opset_import: ["" : 7]>
    g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }
    """
    model = onnx.parser.parse_model(text)
    for name, value in {"w": rand((4, 3, 3, 3), 1, 0.3), "b": rand((4,), 2, 0.1)}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
        # IR 3: initializers are also graph inputs
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, 1, value.shape))
    onnx.checker.check_model(model)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    report = compress(src, dst, Config(passes=("qdq-int8",), budget=Budget(min_cosine=0.99)))
    assert report.passes[0].status == "applied"
    result = onnx.load(dst)
    assert next(o.version for o in result.opset_import if o.domain == "") >= 13
    assert Counter(n.op_type for n in result.graph.node)["DequantizeLinear"] >= 3


def test_qdq_ranges_methods_on_known_distribution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:3] = [40.0, -35.0, 30.0]  # outliers a good method clips
    stats = calibrate.TensorStats()
    stats.update(x.reshape(1, -1))
    stats.add_histogram(x)
    lo, hi = calibrate.choose_range(stats, "minmax")
    assert (lo, hi) == (float(x.min()), float(x.max()))
    for method in ("percentile", "entropy", "mse"):
        lo_m, hi_m = calibrate.choose_range(stats, method, 99.99)
        assert lo_m <= 0 <= hi_m
        assert 3.0 < hi_m < 30.0, method  # clips the outliers, keeps the bulk (|x| < ~4.5)
    edges = np.linspace(x.min(), x.max(), calibrate.BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    mse = calibrate.choose_range(stats, "mse")
    assert calibrate.quant_error(stats.hist, centers, *mse) < \
        calibrate.quant_error(stats.hist, centers, lo, hi)


def test_qdq_entropy_range_of_a_relu_output_keeps_the_bulk():
    """Half the values of a ReLU output are exact zeros; as a spike in the first bin
    they used to make the divergence pick the smallest threshold (1/16 of the range,
    cutting into the bulk) on every such tensor."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal(400_000), 0).astype(np.float32)
    x[:2] = [40.0, 35.0]
    stats = calibrate.TensorStats()
    stats.update(x.reshape(1, -1))
    stats.add_histogram(x)
    assert stats.zeros == int(np.count_nonzero(x == 0))
    lo, hi = calibrate.choose_range(stats, "entropy")
    assert lo == 0.0
    assert 3.5 < hi < 30.0  # 99.98 % of the mass lies below 3.5; the outliers are clipped


def test_qdq_ranges_for_int8_activations_fit_the_symmetric_grid():
    """On the int8 grid a ReLU output gets 127 levels, not the uint8 grid's 255: its
    steps are twice as coarse, so the mse and entropy ranges clip more, and the mse
    range chosen for it has the lower error on that grid."""
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal(400_000), 0).astype(np.float32) ** 1.5
    stats = calibrate.TensorStats()
    stats.update(x.reshape(1, -1))
    stats.add_histogram(x)
    edges = np.linspace(0.0, float(x.max()), calibrate.BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    for method in ("mse", "entropy"):
        wide = calibrate.choose_range(stats, method)
        narrow = calibrate.choose_range(stats, method, symmetric=True)
        assert narrow[0] == 0.0 and 0 < narrow[1] < wide[1], method
    wide, narrow = calibrate.choose_range(stats, "mse"), \
        calibrate.choose_range(stats, "mse", symmetric=True)
    assert calibrate.quant_error(stats.hist, centers, *narrow, symmetric=True) < \
        calibrate.quant_error(stats.hist, centers, *wide, symmetric=True)


def test_qdq_folds_batchnorm_so_the_conv_relu_pair_runs_int8(tmp_path):
    text = CNN.replace("r1 = Relu (c1)", "n1 = BatchNormalization (c1, g1, be1, m1, v1)\n"
                       "    r1 = Relu (n1)")
    weights = cnn_weights() | {"g1": rand((8,), 7, 0.2) + 1, "be1": rand((8,), 8, 0.1),
                               "m1": rand((8,), 9, 0.1), "v1": np.abs(rand((8,), 10)) + 0.5}
    model = make_model(text, weights)
    out, result = apply_pass(QdqInt8, model, ctx=PassContext(calib=calib()))
    assert result.stats["bn_folded"] == 1
    assert "BatchNormalization" in op_counts(model) and "BatchNormalization" not in op_counts(out)
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["Conv"] == 0
    feed = {"x": rand((8, 3, 16, 16), 999)}
    assert cosine(run(model, feed)["y"], run(out, feed, optimization="all")["y"]) > 0.999


def test_qdq_bias_correction_reduces_output_bias():
    model = make_model(CNN, cnn_weights(3))
    data = calib(batches=8, seed=300)
    feed = {"x": rand((32, 3, 16, 16), 4242)}
    ref = run(model, feed)["y"]
    errors = {}
    for mode in ("off", "empirical"):
        out, _ = apply_pass(QdqInt8, model, {"bias_correction": mode, "calib_method": "minmax"},
                            PassContext(calib=data))
        errors[mode] = float(np.abs((run(out, feed, optimization="all")["y"] - ref).mean(0)).mean())
    assert errors["empirical"] < errors["off"]


def test_qdq_bias_correction_waves_group_parallel_branches():
    """Fire module: squeeze -> (expand1x1 | expand3x3) -> Concat -> conv. The two
    expands depend on squeeze, not on each other: one wave, one run for both."""
    from onnxslim_cnn.manager import import_graph
    from onnxslim_cnn.passes.qdq.bias_correct import _waves

    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 8, 8] x) => (float[N, 4, 8, 8] y) {
        s = Conv (x, ws, bs)
        rs = Relu (s)
        e1 = Conv (rs, w1, b1)
        e3 = Conv <pads = [1, 1, 1, 1]> (rs, w3, b3)
        c = Concat <axis = 1> (e1, e3)
        y = Conv (c, wy, by)
    }
    """
    weights = {"ws": rand((4, 8, 1, 1), 1), "bs": rand((4,), 2), "w1": rand((4, 4, 1, 1), 3),
               "b1": rand((4,), 4), "w3": rand((4, 4, 3, 3), 5), "b3": rand((4,), 6),
               "wy": rand((4, 8, 1, 1), 7), "by": rand((4,), 8)}
    graph = import_graph(make_model(text, weights))
    assert _waves(graph, ["s", "e1", "e3", "y"]) == [["s"], ["e1", "e3"], ["y"]]


@pytest.mark.real_latency
def test_qdq_resnet8_real_images_agree():
    path = shared_model("resnet8_cifar10_mlperf_tiny")
    images = shared_dataset("cifar10_test_jpeg_5000")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        report = compress(path, Path(tmp) / "q.onnx", Config(
            passes=("fold-bn", "qdq-int8"),
            data=DataConfig(path=images, calib_count=64, val_count=400),
            budget=Budget(max_top1_drop=2.0, min_cosine=0.99)))
    qdq = report.passes[-1]
    assert qdq.status == "applied"
    assert qdq.metrics["top1_agreement"] >= 0.95  # measured 0.978 on 2000 images
    assert report.ratio > 3.3




@pytest.mark.parametrize("measured", [2.0, 0.5])
def test_qdq_latency_guard_keeps_float_compute_when_int8_is_slower(monkeypatch, tmp_path,
                                                                     measured):
    from onnxslim_cnn.passes.qdq import latency

    monkeypatch.setattr(latency, "ratio", lambda *args, **kwargs: measured)
    model = make_model(CNN, cnn_weights())
    out, result = apply_pass(QdqInt8, model, ctx=PassContext(calib=calib()))
    ops = optimized_ops(out, tmp_path)
    feed = {"x": rand((8, 3, 16, 16), 999)}
    ref, got = run(model, feed)["y"], run(out, feed, optimization="all")["y"]
    assert result.stats["int8_latency_ratio"] == measured
    if measured > latency.SLOWER:
        assert "int8_declined" in result.stats and ops.get("QLinearConv", 0) == 0
        assert sum(i.data_type == onnx.TensorProto.INT8 for i in out.graph.initializer) == 3
        assert np.max(np.abs(ref - got)) < 0.05  # int8 weights only, float compute
    else:
        assert ops["QLinearConv"] == 2 and "int8_declined" not in result.stats
        assert cosine(ref, got) > 0.999


@pytest.mark.real_latency
def test_qdq_latency_ratio_of_a_model_against_itself_is_near_one():
    from onnxslim_cnn.passes.qdq import latency

    model = make_model(CNN, cnn_weights())
    value = latency.ratio(model, model, {"x": rand((1, 3, 16, 16), 5)}, rounds=9)
    assert 0.5 < value < 2.0  # same work: the median ratio sits near 1 even under load


@pytest.mark.parametrize(("bits", "atol"), [("int8", 0.05), ("int4", 0.6)])
def test_qdq_weights_only_stores_integers_and_folds(tmp_path, bits, atol):
    from onnxslim_cnn import model_io

    model = make_model(CNN, cnn_weights())
    qdq = QdqInt8({"weights_only": bits})
    model = model_io.upgrade_opset(model, qdq.min_opset)  # as the manager does: 21 for int4
    out, result = apply_pass(QdqInt8, model, {"weights_only": bits}, PassContext())
    assert result.stats["weights"] == 3
    types = {onnx.TensorProto.DataType.Name(i.data_type) for i in out.graph.initializer}
    assert {"INT8"} <= types if bits == "int8" else {"INT4"} <= types
    assert "FLOAT" in types and all(
        i.data_type != onnx.TensorProto.FLOAT or i.dims != [16, 8, 3, 3]
        for i in out.graph.initializer)
    feed = {"x": rand((2, 3, 16, 16), 5)}
    np.testing.assert_allclose(run(out, feed)["y"], run(model, feed)["y"], atol=atol)
    ops = optimized_ops(out, tmp_path)  # the decode folds at load: plain float convs
    assert ops.get("Cast", 0) == 0 and ops.get("Mul", 0) == 0


def test_qdq_gptq_identity_hessian_equals_nearest_rounding():
    from onnxslim_cnn.passes.qdq import gptq

    w = rand((6, 20), 1).astype(np.float64)
    qmax = np.full(6, 127)
    scale = np.abs(w).max(axis=1) / 127
    q = gptq.gptq_round(w, np.eye(20) * 3.0, scale, qmax)
    np.testing.assert_array_equal(q, np.clip(np.round(w / scale[:, None]), -127, 127))


def test_qdq_gptq_lowers_output_error_on_correlated_inputs():
    from onnxslim_cnn.passes.qdq import gptq

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 4)) @ rng.standard_normal((4, 32))  # rank-4 inputs
    x += 0.05 * rng.standard_normal(x.shape)
    w = rng.standard_normal((16, 32))
    qmax = np.full(16, 7)  # a coarse grid makes the difference visible
    scale = np.abs(w).max(axis=1) / 7
    near = np.clip(np.round(w / scale[:, None]), -7, 7) * scale[:, None]
    opt = gptq.gptq_round(w, x.T @ x, scale, qmax) * scale[:, None]
    err = lambda wq: np.linalg.norm((w - wq) @ x.T)  # noqa: E731
    assert err(opt) < 0.7 * err(near)


def _chain_with_outlier_channel(layers: int = 10):
    """x -> Conv_0 -> ... -> Conv_{n-1}; Conv_4 writes one channel 1000x larger than the
    others and Conv_5 reads only the small ones, so one uint8 scale for Conv_5's input
    leaves them a few levels: Conv_5's output SQNR is far below every other layer's."""
    lines, weights = [], {}
    for i in range(layers):
        src = "x" if i == 0 else f"r{i - 1}"
        lines.append(f"c{i} = Conv ({src}, w{i}, b{i})")
        lines.append(f"r{i} = Relu (c{i})")
        w = np.abs(rand((4, 4, 1, 1), 10 + i, 0.5)) + 0.1
        if i == 4:
            w[0] *= 1000.0
        if i == 5:
            w[:, 0] = 0.0
        weights[f"w{i}"], weights[f"b{i}"] = w, np.full(4, 0.01, np.float32)
    body = "\n        ".join(lines[:-1] + [f"y = Relu (c{layers - 1})"])
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 4, 4] x) => (float[N, 4, 4, 4] y) {{
        {body}
    }}
    """
    return make_model(text, weights)


def test_qdq_sqnr_fallback_keeps_the_sensitive_layer_float_with_int8_storage():
    model = _chain_with_outlier_channel()
    data = [{"x": np.abs(rand((4, 4, 4, 4), 70 + i))} for i in range(2)]
    out, result = apply_pass(QdqInt8, model, {"fallback_sqnr_db": 30.0},
                             PassContext(calib=data))
    kept = [r for r in result.layers if r.get("kept_float")]
    assert [r["layer"] for r in kept] == ["c5"]  # at most 10 % of 10 layers, worst first
    assert kept[0]["why"] == "output SQNR < 30.0 dB"
    assert kept[0]["weight_storage"].startswith("int8")
    conv5 = next(n for n in out.graph.node if n.op_type == "Conv" and n.output[0] == "c5")
    producer = next(n for n in out.graph.node if conv5.input[1] in n.output)
    assert producer.op_type == "Mul"  # Cast+Mul int8 decode, folded by onnxruntime at load
    sqnr = {r["layer"]: r["sqnr_db"] for r in result.layers if "sqnr_db" in r}
    assert "c5" not in sqnr and len(sqnr) == 9 and min(sqnr.values()) > 30.0
    plain, _ = apply_pass(QdqInt8, model, {"fallback_sqnr_db": 0.0}, PassContext(calib=data))
    feed = {"x": np.abs(rand((2, 4, 4, 4), 99))}  # not calibration data
    ref = run(model, feed)["y"].astype(np.float64)
    snr = lambda m: -np.log10(np.sum((run(m, feed, "all")["y"] - ref) ** 2))  # noqa: E731
    assert snr(out) > snr(plain) + 1.0  # the fallback cuts the output error > 10x


# x -> Conv(1x1) -> Clip(0, 6) -> Conv(1x1, saturating weights) -> Add -> y
# The Clip output is what the second conv reads: a coarser activation grid there would
# let the saturating weights keep their range (levels.py) but reach past 6, so
# onnxruntime could no longer fold the Clip and the first conv would run in float.
CLIPPED_SATURATING = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8, 4, 4] x) => (float[N, 4, 4, 4] y) {
    c1 = Conv (x, w1, b1)
    r = Clip (c1, lo, hi)
    c2 = Conv (r, w2, b2)
    y = Add (c2, c2)
}
"""


def test_qdq_activation_levels_keep_a_clip_foldable(tmp_path):
    w2 = np.full((4, 8, 1, 1), 0.9, np.float32)
    w2[:, ::2] = 1.0
    model = make_model(CLIPPED_SATURATING, {
        "w1": np.eye(8, dtype=np.float32).reshape(8, 8, 1, 1), "b1": np.zeros(8, np.float32),
        "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32),
        "w2": w2, "b2": np.zeros(4, np.float32)})
    rng = np.random.default_rng(5)
    calib = [{"x": rng.uniform(0.0, 7.0, (4, 8, 4, 4)).astype(np.float32)} for _ in range(2)]
    # Without the Clip rule, auto gives c2's input 159 levels and c1 runs as float FusedConv.
    out, result = apply_pass(QdqInt8, model, {"calib_method": "minmax", "latency_guard": False,
                                              "activation_levels": "auto"},
                             PassContext(calib=calib))
    records = {r["layer"]: r for r in result.layers}
    assert records["c2"]["input_levels"] == 255
    ops = optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 2 and ops.get("FusedConv", 0) == 0 and ops.get("Clip", 0) == 0
    feed = {"x": np.random.default_rng(6).uniform(0.0, 7.0, (2, 8, 4, 4)).astype(np.float32)}
    kernel = run(out, feed, optimization="all")["y"]
    np.testing.assert_allclose(kernel, run(out, feed, optimization="disable")["y"],
                               rtol=0, atol=0.2)
    assert cosine(kernel, run(model, feed)["y"]) > 0.999
