"""svd-split on tiny graphs: exact reconstruction, geometry variants, declines, rank choice.

Tolerances: a split at the weight's own rank reproduces the layer up to float32 rounding
of the factors and of the two sums: rtol=atol=1e-4 on outputs of magnitude ~10. The
data-aware budget is checked on the calibration data itself, where the predicted
relative output error is exact (every patch is sampled), to 1e-3 relative.
"""

import numpy as np
import onnx
import pytest

from onnxslim_cnn import validate
from onnxslim_cnn.errors import UsageError
from onnxslim_cnn.manager import export_graph, import_graph
from onnxslim_cnn.passes.base import PassContext, taken_names
from onnxslim_cnn.passes.svd import SvdSplit, factor, rewrite
from onnxslim_cnn.passes.svd.site import find_site

from .helpers import (
    apply_pass,
    assert_same_outputs,
    io_types,
    make_float16,
    make_model,
    op_counts,
    optimized_ops,
    rand,
    shared_dataset,
    shared_model,
)

TOL = {"rtol": 1e-4, "atol": 1e-4}
# float16 keeps 11 significant bits and the split rounds three times (factors, the
# intermediate, the output: 2^-11 relative each, where the layer rounded once), so the
# float32 1e-4 becomes 2e-3 of the largest output (measured: one float16 step, 8e-4)
TOL16 = 2e-3

# x -> Conv(W, B) -> y, geometry from the attribute string
CONV = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, {cin}, 11, 10] x) => (float[N, {cout}, H, W] y) {{
    y = Conv <{attrs}> (x, {inputs})
}}
"""
GEOMETRY = {
    "plain": "pads = [0, 0, 0, 0]",
    "padded": "pads = [1, 1, 1, 1]",
    "stride-asym-pads": "strides = [2, 2], pads = [1, 2, 0, 1]",
    "dilated": "dilations = [2, 1], pads = [2, 0, 1, 1]",
    "stride-1x2-dilated": "strides = [1, 2], dilations = [1, 2], pads = [0, 2, 0, 2]",
}


def conv_model(attrs: str, weight: np.ndarray, bias: bool = True, seed: int = 3):
    cout, cin = weight.shape[:2]
    inputs = "w, b" if bias else "w"
    weights = {"w": weight, **({"b": rand((cout,), seed)} if bias else {})}
    return make_model(CONV.format(cin=cin, cout=cout, attrs=attrs, inputs=inputs), weights)


def low_rank(cout: int, cin: int, rank: int, seed: int = 0) -> np.ndarray:
    """A conv weight W[o] = sum_r B[o, r] A[r] of channel rank ``rank``."""
    return np.einsum("or,rcyx->ocyx", rand((cout, rank), seed),
                     rand((rank, cin, 3, 3), seed + 1)).astype(np.float32)


def split_at(model, mode: str, rank: int):
    """``model``'s only layer replaced by its ``mode`` factors at ``rank`` (no saving
    check: full rank is allowed)."""
    graph = import_graph(model)
    site = find_site(graph.nodes[0])
    fz = factor.Channel(site.matrix, None) if mode == "channel" else \
        factor.Spatial(site.matrix, site.c_in, site.kernel, None)
    rewrite.install(graph, site, factor.build(fz, rank, site.bias, None), taken_names(graph))
    graph.cleanup().toposort()
    return export_graph(graph, model), fz


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("geometry", sorted(GEOMETRY))
def test_svd_split_full_rank_reconstructs_exactly(mode, geometry):
    model = conv_model(GEOMETRY[geometry], rand((6, 5, 3, 3), 1), bias=geometry != "plain")
    full = 6 if mode == "channel" else 15  # min(C_out, C_in*k*k) / min(C_in*k, C_out*k)
    out, fz = split_at(model, mode, full)
    assert fz.max_rank == full and fz.error(full) < 1e-6
    assert op_counts(out) == {"Conv": 2}
    kernels = [list(next(a.ints for a in n.attribute if a.name == "kernel_shape"))
               for n in out.graph.node]
    assert kernels == ([[3, 3], [1, 1]] if mode == "channel" else [[3, 1], [1, 3]])
    assert_same_outputs(model, out, **TOL)


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("geometry", ["padded", "stride-asym-pads", "dilated"])
def test_svd_split_low_rank_conv_splits_exactly_and_saves(mode, geometry):
    # channel rank 3 -> spatial rank <= 3 * k = 9
    model = conv_model(GEOMETRY[geometry], low_rank(24, 8, 3))
    out, result = apply_pass(SvdSplit, model, {"energy": 1 - 1e-9, "svd_mode": mode})
    (record,) = result.layers
    assert record["mode"] == mode and record["rank"] == (3 if mode == "channel" else 9)
    assert record["params_after"] < 0.6 * record["params"]
    assert record["macs_after"] < 0.7 * record["macs"]
    assert op_counts(out) == {"Conv": 2}
    assert sum(i.dims[0] * np.prod(i.dims[1:]) for i in out.graph.initializer) == \
        record["params_after"] + 24  # + the bias
    assert_same_outputs(model, out, **TOL)


def assert_float16_split(model, out, feed, tmp_path):
    """``out`` keeps float16 weights, intermediate and interface, computes ``model``
    within TOL16 and leaves onnxruntime nothing to decode."""
    assert {i.data_type for i in out.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert io_types(out) == {onnx.TensorProto.FLOAT16}
    inferred = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    mid = [v for v in inferred.graph.value_info if "svd_mid" in v.name]
    assert [v.type.tensor_type.elem_type for v in mid] == [onnx.TensorProto.FLOAT16]
    ref = validate.run_model(model, [feed])["y"].astype(np.float64)
    got = validate.run_model(out, [feed])["y"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL16 * np.abs(ref).max())
    ops = optimized_ops(out, tmp_path)
    assert ops["Cast"] == optimized_ops(model, tmp_path)["Cast"]
    assert not {"Gather", "Mul", "DequantizeLinear"} & set(ops)


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_svd_split_float16_low_rank_conv_splits_and_stays_float16(mode, tmp_path):
    text = CONV.format(cin=8, cout=24, attrs=GEOMETRY["stride-asym-pads"], inputs="w, b")
    model = make_float16(text, {"w": low_rank(24, 8, 3), "b": rand((24,), 3)})
    # rounding W to float16 leaves ~1e-7 of its energy outside rank 3 (2^-12 squared)
    out, result = apply_pass(SvdSplit, model, {"energy": 1 - 1e-5, "svd_mode": mode})
    (record,) = result.layers
    assert record["mode"] == mode and record["rank"] == (3 if mode == "channel" else 9)
    assert op_counts(out) == {"Conv": 2}
    assert out.ByteSize() < model.ByteSize()
    assert_float16_split(model, out, {"x": rand((2, 8, 11, 10), 5, dtype=np.float16)},
                         tmp_path)


@pytest.mark.parametrize("op, inputs, transposed, opset", [
    ("Gemm <alpha = 0.5, beta = 2.0>", "w, c", False, 13),
    ("Gemm <transB = 1>", "w, c", True, 9),  # the first Gemm's zero C: float16 too
    ("MatMul", "w", False, 13)])
def test_svd_split_float16_gemm_splits_and_stays_float16(op, inputs, transposed, opset,
                                                         tmp_path):
    w = (rand((40, 4), 0) @ rand((4, 30), 1)).astype(np.float32)  # rank 4
    weights = {"w": w.T.copy() if transposed else w, "c": rand((30,), 2)}
    model = make_float16(GEMM.format(op=op, inputs=inputs, opset=opset),
                         {k: v for k, v in weights.items() if k in inputs})
    out, result = apply_pass(SvdSplit, model, {"energy": 1 - 1e-5})
    assert result.layers[0]["rank"] == 4 and op_counts(out) == {op.split()[0]: 2}
    onnx.checker.check_model(out)
    assert_float16_split(model, out, {"x": rand((3, 40), 4, dtype=np.float16)}, tmp_path)


def test_svd_split_auto_picks_fewest_macs():
    # 3x3, 8 -> 24 of channel rank 3: channel costs 3*(72+24) MACs per position,
    # spatial 9*(8*3+24*3): channel wins
    model = conv_model(GEOMETRY["padded"], low_rank(24, 8, 3))
    _, result = apply_pass(SvdSplit, model, {"energy": 1 - 1e-9})
    assert result.layers[0]["mode"] == "channel"


def test_svd_split_depthwise_declines():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 8, 8] x) => (float[1, 4, 6, 6] y) { y = Conv <group = 4> (x, w) }"""
    model = make_model(text, {"w": rand((4, 1, 3, 3), 0)})
    out, result = apply_pass(SvdSplit, model, {"rank_ratio": 0.25})
    assert not result.changed and result.declined == {"depthwise conv": 1}
    assert op_counts(out) == {"Conv": 1}


def test_svd_split_grouped_declines():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 8, 8] x) => (float[1, 8, 6, 6] y) { y = Conv <group = 2> (x, w) }"""
    model = make_model(text, {"w": rand((8, 2, 3, 3), 0)})
    _, result = apply_pass(SvdSplit, model, {"rank_ratio": 0.25})
    assert not result.changed and result.declined == {"grouped conv (group > 1)": 1}


def test_svd_split_no_saving_declines():
    # 1x1, 4 -> 4: any rank r costs 8r >= 16 only below r = 2; ratio 1 gives r = 4
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) { y = Conv (x, w) }"""
    model = make_model(text, {"w": rand((4, 4, 1, 1), 0)})
    out, result = apply_pass(SvdSplit, model, {"rank_ratio": 1.0})
    assert not result.changed and sum(result.declined.values()) == 1
    assert "saves less than" in next(iter(result.declined))
    assert result.layers[0]["mode"] == "kept" and op_counts(out) == {"Conv": 1}


GEMM = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N, 40] x) => (float[N, 30] y) {{ y = {op} (x, {inputs}) }}
"""


@pytest.mark.parametrize("op, inputs, transposed, opset", [
    ("Gemm <alpha = 0.5, beta = 2.0>", "w, c", False, 13),
    ("Gemm <transB = 1>", "w, c", True, 9),  # Gemm's C is required before opset 11
    ("MatMul", "w", False, 13)])
def test_svd_split_gemm_low_rank_splits_exactly(op, inputs, transposed, opset):
    w = (rand((40, 4), 0) @ rand((4, 30), 1)).astype(np.float32)  # rank 4
    weights = {"w": w.T.copy() if transposed else w, "c": rand((30,), 2)}
    model = make_model(GEMM.format(op=op, inputs=inputs, opset=opset),
                       {k: v for k, v in weights.items() if k in inputs})
    out, result = apply_pass(SvdSplit, model, {"energy": 1 - 1e-9})
    assert result.layers[0]["rank"] == 4
    assert op_counts(out) == {op.split()[0]: 2}
    assert result.stats["site_params_after"] == 4 * (40 + 30)
    onnx.checker.check_model(out)
    assert_same_outputs(model, out, **TOL)


# x (8 channels, but spanned by one channel plus 1% noise) -> Conv 3x3 8 -> 32 -> y
DATA_CONV = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8, 8, 8] x) => (float[N, 32, 8, 8] y) { y = Conv <pads = [1, 1, 1, 1]> (x, w, b) }
"""


def low_dim_batches(count: int = 3, seed: int = 10) -> list[dict[str, np.ndarray]]:
    mix = rand((8,), seed)
    out = []
    for i in range(count):
        z = rand((2, 1, 8, 8), seed + 1 + i)
        x = z * mix[None, :, None, None] + rand((2, 8, 8, 8), seed + 50 + i, 0.01) + 0.5
        out.append({"x": x.astype(np.float32)})
    return out


def rel_output_error(model, out, batches) -> float:
    ref = np.concatenate([validate.run_model(model, [b])["y"] for b in batches])
    got = np.concatenate([validate.run_model(out, [b])["y"] for b in batches])
    centred = ref - ref.mean(axis=(0, 2, 3), keepdims=True)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(centred))


def test_svd_split_data_aware_picks_smallest_rank_within_budget():
    model = make_model(DATA_CONV, {"w": rand((32, 8, 3, 3), 0), "b": rand((32,), 1)})
    batches = low_dim_batches()
    _, free = apply_pass(SvdSplit, model, {"energy": 1 - 0.05**2, "svd_mode": "channel"})
    assert not free.changed  # data-free: a random W needs almost full rank
    out, result = apply_pass(SvdSplit, model, {"svd_error": 0.05, "svd_mode": "channel"},
                             PassContext(calib=batches))
    (record,) = result.layers
    site = find_site(import_graph(model).nodes[0])
    free_rank = factor.Channel(site.matrix, None).energy_rank(1 - 0.05**2)
    assert record["mode"] == "channel" and record["rank"] <= free_rank / 2
    error = rel_output_error(model, out, batches)
    assert error <= 0.05 * (1 + 1e-3)
    assert error == pytest.approx(record["rel_error"], rel=1e-3, abs=1e-4)
    assert op_counts(out) == {"Conv": 2}
    # minimal: one rank less breaks the budget
    one_less = _split_model(model, batches, record["rank"] - 1)
    assert rel_output_error(model, one_less, batches) > 0.05


def _split_model(model, batches, rank):
    from onnxslim_cnn.passes.svd import stats

    graph = import_graph(model)
    site = find_site(graph.nodes[0])
    mean, sigma = stats.collect(model, [site], batches, 0)[site.key]
    fz = factor.Channel(site.matrix, sigma)
    rewrite.install(graph, site, factor.build(fz, rank, site.bias, mean), taken_names(graph))
    graph.cleanup().toposort()
    return export_graph(graph, model)


def test_svd_split_backoff_halves_budget_until_calibration_agrees():
    model = make_model(DATA_CONV, {"w": rand((32, 8, 3, 3), 0), "b": rand((32,), 1)})
    batches = low_dim_batches()
    ctx = PassContext(calib=batches, evaluate=lambda m: validate.run_model(m, batches))
    out, result = apply_pass(SvdSplit, model, {"svd_error": 0.4}, ctx)
    assert result.stats["layer_error_budget"] < 0.4
    metrics = validate.compare(ctx.evaluate(model), ctx.evaluate(out))
    assert metrics.cosine >= (1 + ctx.budget.min_cosine) / 2
    assert result.changed and op_counts(out) == {"Conv": 2}


@pytest.mark.parametrize("options", [{"rank_ratio": 1.5}, {"energy": 0.0},
                                     {"rank_ratio": 0.5, "energy": 0.9}, {"svd_mode": "x"},
                                     {"svd_target_macs": 1.0}, {"svd_target_macs": 0.0},
                                     {"svd_target_macs": 0.3, "energy": 0.9}])
def test_svd_split_bad_options_are_a_usage_error(options):
    with pytest.raises(UsageError):
        SvdSplit(options).check_options()


@pytest.mark.parametrize("flags", [["--energy", "0.999999"], ["--rank-ratio", "0.125"],
                                   ["--svd-error", "0.01", "--svd-mode", "spatial"],
                                   ["--svd-target-macs", "0.5", "--svd-mode", "channel"]])
def test_svd_split_cli_options_reach_the_pass(tmp_path, flags):
    import json

    from onnxslim_cnn.cli import main

    source, target, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(conv_model(GEOMETRY["padded"], low_rank(24, 8, 3)), source)
    assert main([str(source), str(target), "--passes", "svd-split", "--report", str(report),
                 "--quiet", *flags]) == 0
    (record,) = json.loads(report.read_text())["passes"]
    assert record["status"] == "applied" and record["stats"]["layers_split"] == 1
    assert record["metrics"]["cosine"] > 0.9999  # the weight's own rank: exact
    if "--svd-target-macs" in flags:  # any rank from the weight's own to the target's
        assert record["stats"]["macs_saved_fraction"] >= 0.5
        assert record["layers"][0]["rank"] >= 3
    else:
        assert record["layers"][0]["rank"] == (9 if "spatial" in flags else 3)
    assert op_counts(onnx.load(target)) == {"Conv": 2}


@pytest.mark.parametrize("data_aware", [False, True])
def test_svd_split_wide_1x1_conv_low_rank_splits_exactly(data_aware):
    # more outputs than inputs (40 > 6): the factors come from the D x D side
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 6, 5, 5] x) => (float[N, 40, 5, 5] y) { y = Conv (x, w, b) }"""
    w = (rand((40, 2), 0) @ rand((2, 6), 1)).reshape(40, 6, 1, 1).astype(np.float32)
    model = make_model(text, {"w": w, "b": rand((40,), 2)})
    options, ctx = {"energy": 1 - 1e-9}, PassContext()
    if data_aware:
        options = {"svd_error": 1e-4}
        ctx = PassContext(calib=[{"x": rand((2, 6, 5, 5), 3 + i)} for i in range(2)])
    out, result = apply_pass(SvdSplit, model, options, ctx)
    assert result.layers[0]["rank"] == 2 and op_counts(out) == {"Conv": 2}
    assert_same_outputs(model, out, **TOL)


# two 3x3 convs in a chain, 8 -> 12 -> 12: the first full rank (every split of it costs
# output error), the second of channel rank 2 (splits for free, whatever its input)
TWO_CONVS = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 8, 8, 8] x) => (float[N, 12, 8, 8] y) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    y = Conv <pads = [1, 1, 1, 1]> (h, w2, b2)
}
"""


def two_convs():
    return make_model(TWO_CONVS, {"w1": rand((12, 8, 3, 3), 2), "b1": rand((12,), 1),
                                  "w2": low_rank(12, 12, 2), "b2": rand((12,), 3)})


@pytest.mark.parametrize("data_aware", [False, True])
def test_svd_split_mac_target_spends_it_where_error_is_cheapest(data_aware):
    # MACs per position: 12 * 72 + 12 * 108 = 2160; the second conv at its rank 2 costs
    # 2 * (108 + 12) = 240, 49 % fewer: a 25 % target is met there, the first kept
    model = two_convs()
    batches = [{"x": rand((2, 8, 8, 8), 20 + i)} for i in range(3)]
    ctx = PassContext(calib=batches) if data_aware else PassContext()
    out, result = apply_pass(SvdSplit, model, {"svd_target_macs": 0.25}, ctx)
    first, second = result.layers
    assert result.stats["macs_saved_fraction"] >= 0.25
    assert first["mode"] == "kept" and first["why"] == "kept: the MAC target is met without it"
    assert second["mode"] != "kept" and second["rel_error"] < 1e-6
    assert (second["reach"] != 1.0) == data_aware
    assert_same_outputs(model, out, **TOL)  # the split is exact: the model is unchanged


def test_svd_split_mac_target_out_of_reach_takes_the_most_and_says_so():
    model = two_convs()
    out, result = apply_pass(SvdSplit, model, {"svd_target_macs": 0.98})
    assert result.declined == {"MAC target above what the layers allow": 1}
    # every layer at its cheapest option: the largest saving the layers allow
    assert all(r["mode"] != "kept" and r["rank"] == 1 for r in result.layers)
    assert op_counts(out) == {"Conv": 4}


@pytest.mark.parametrize("options", [{"rank_ratio": 0.1}, {"svd_target_macs": 0.3}])
def test_svd_split_ranks_of_blocked_convs_are_multiples_of_16(options):
    # 32 -> 64 of channel rank 2: rank 16 keeps onnxruntime's blocked kernels for both
    # halves (channels in multiples of 16) and still saves 1 - 16 * (288 + 64) / 18432
    model = conv_model(GEOMETRY["padded"], low_rank(64, 32, 2))
    out, result = apply_pass(SvdSplit, model, options)
    assert result.layers[0]["rank"] % 16 == 0 and result.layers[0]["rank"] < 64
    assert_same_outputs(model, out, **TOL)
    # a layer whose channels are not multiples of 16 keeps its own rank
    _, odd = apply_pass(SvdSplit, conv_model(GEOMETRY["padded"], low_rank(24, 8, 3)),
                        {"rank_ratio": 0.125})
    assert odd.layers[0]["rank"] == 3


def test_svd_split_mac_target_front_and_greedy():
    from onnxslim_cnn.passes.svd import target

    opt = target.Option
    # a dominated option (more MACs and more cost than another) leaves the front
    front = target.front([opt("kept", 0, 100, 0.0), opt("channel", 8, 60, 0.2),
                          opt("spatial", 6, 70, 0.3), opt("channel", 4, 40, 0.5)])
    assert [(o.mode, o.rank) for o in front] == [("kept", 0), ("channel", 8), ("channel", 4)]
    cheap = [opt("kept", 0, 100, 0.0), opt("channel", 2, 50, 0.01)]
    dear = [opt("kept", 0, 100, 0.0), opt("channel", 2, 50, 1.0)]
    picked, met = target.allocate([dear, cheap], [100, 100], 0.25)
    assert met and [o.rank for o in picked] == [0, 2]
    picked, met = target.allocate([dear, cheap], [100, 100], 0.5)
    assert met and [o.rank for o in picked] == [2, 2]
    _, met = target.allocate([dear, cheap], [100, 100], 0.6)
    assert not met
    assert target.grid(0) == [] and target.grid(3) == [1, 2, 3]
    assert len(target.grid(1000)) == target.GRID_POINTS and target.grid(1000)[-1] == 1000
    assert target.grid(40, 16) == [16, 32] and target.grid(15, 16) == []


def test_svd_split_mac_target_on_resnet8(tmp_path):
    from onnxslim_cnn.config import Budget, Config, DataConfig
    from onnxslim_cnn.manager import compress

    path = shared_model("resnet8_cifar10_mlperf_tiny")
    images = shared_dataset("cifar10_test_jpeg_5000")
    report = compress(path, tmp_path / "s.onnx", Config(
        passes=("fold-bn", "svd-split"), options={"svd_target_macs": 0.25},
        data=DataConfig(path=images, calib_count=100, val_count=300),
        budget=Budget(max_top1_drop=100, min_cosine=0)))
    split = report.passes[-1]
    assert split.status == "applied" and split.stats["macs_saved_fraction"] >= 0.25
    # measured on the 1000 images after the run's 200 (seed 0): 26 % fewer MACs,
    # agreement 0.80, cosine 0.88 (a uniform per-layer budget cutting 33 %: 0.67, 0.78)
    assert split.metrics["top1_agreement"] >= 0.7 and split.metrics["cosine"] >= 0.8


@pytest.mark.parametrize("data_aware", [False, True])
def test_svd_split_mac_target_spatial_only_keeps_1x1_convs(data_aware):
    # spatial mode has nothing to offer a 1x1 conv: kept with its reason, no failure
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 8, 8] x) => (float[N, 16, 8, 8] y) {
        h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        y = Conv (h, w2, b2)
    }"""
    model = make_model(text, {"w1": low_rank(16, 8, 2), "b1": rand((16,), 1),
                              "w2": rand((16, 16, 1, 1), 2), "b2": rand((16,), 3)})
    batches = [{"x": rand((2, 8, 8, 8), 20 + i)} for i in range(3)]
    ctx = PassContext(calib=batches) if data_aware else PassContext()
    out, result = apply_pass(SvdSplit, model, {"svd_target_macs": 0.3, "svd_mode": "spatial"},
                             ctx)
    first, second = result.layers
    assert first["mode"] == "spatial" and second["mode"] == "kept"
    assert second["why"].startswith("no rank saves") and second["reach"] == 1.0
    assert result.stats["macs_saved_fraction"] >= 0.3


def output_error(m: np.ndarray, approx: np.ndarray, sigma: np.ndarray) -> float:
    """err(M') of factor.py's docstring, straight from its definition."""
    delta = m - approx
    return float(np.sqrt(np.sum((delta @ sigma) * delta) / np.sum((m @ sigma) * m)))


def random_covariance(dim: int, seed: int) -> np.ndarray:
    x = rand((3 * dim, dim), seed) @ rand((dim, dim), seed + 1)
    return np.cov(x.T)


@pytest.mark.parametrize("kernel", [(3, 3), (5, 3), (1, 3)])
def test_svd_split_spatial_error_of_every_rank_under_the_full_covariance(kernel):
    # err(r) of all ranks from one K x K matrix (factor._dropped) equals the error of
    # the rank-r weight measured directly under the full patch covariance
    c_out, c_in = 12, 5
    m = rand((c_out, c_in * kernel[0] * kernel[1]), 0).astype(np.float64)
    sigma = random_covariance(m.shape[1], 2)
    fz = factor.Spatial(m, c_in, kernel, sigma)
    for rank in range(1, fz.max_rank + 1):
        direct = output_error(m, fz.approx(rank), sigma)
        assert fz.error(rank) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert fz.error(fz.max_rank) == 0.0 and fz.error(1) > 0.1


def test_svd_split_statistics_keep_the_rows_while_fewer_than_dimensions():
    # a Gemm sees one row per sample: fewer rows than inputs are kept as rows (the
    # covariance is never formed); past the dimension they become the D x D sums
    from onnxslim_cnn.passes.svd import stats

    rows = rand((40, 30), 5) + 1.0
    few = stats.Moments(30)
    for part in np.split(rows[:20], 4):
        few.add(part)
    mean, sigma = few.result()
    assert isinstance(sigma, factor.Samples) and few.outer is None
    np.testing.assert_allclose(mean, rows[:20].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(sigma.dense(), np.cov(rows[:20].T, bias=True), atol=1e-5)
    many = stats.Moments(30)
    for part in np.split(rows, 4):
        many.add(part)
    _, dense = many.result()
    assert isinstance(dense, np.ndarray)
    np.testing.assert_allclose(dense, np.cov(rows.T, bias=True), atol=1e-5)
    # the channel factoriser sees the same covariance either way
    m = rand((8, 30), 6).astype(np.float64)
    kept = factor.Channel(m, sigma)
    formed = factor.Channel(m, sigma.dense())
    np.testing.assert_allclose(kept.residual, formed.residual, atol=1e-9)


def test_svd_split_blocked_conv_whose_aligned_rank_saves_too_little_says_so():
    # 16 -> 16 of channel rank 2: rank 2 meets any budget, but rounded up to 16 (both
    # halves blocked) it costs 16 * (144 + 16) = 2560 > 0.8 * 2304: kept, with that reason
    model = conv_model(GEOMETRY["padded"], low_rank(16, 16, 2))
    batches = [{"x": rand((2, 16, 11, 10), 20 + i)} for i in range(2)]
    out, result = apply_pass(SvdSplit, model, {"svd_mode": "channel"},
                             PassContext(calib=batches))
    assert not result.changed and op_counts(out) == {"Conv": 1}
    assert result.declined == {"the rank meeting the error budget, rounded up to a "
                               "multiple of 16 (blocked kernels), saves less than 20%": 1}
    _, target = apply_pass(SvdSplit, model, {"svd_mode": "channel", "svd_target_macs": 0.2},
                           PassContext(calib=batches))
    assert target.declined == {"no rank that is a multiple of 16 (blocked kernels) saves "
                               "20% of params and FLOPs": 1,
                               "MAC target above what the layers allow": 1}
    # the same weight on 8 -> 24 channels (not blocked) splits at its own rank
    _, odd = apply_pass(SvdSplit, conv_model(GEOMETRY["padded"], low_rank(24, 8, 2)),
                        {"svd_mode": "channel"},
                        PassContext(calib=[{"x": rand((2, 8, 11, 10), 30)}]))
    assert odd.layers[0]["rank"] == 2
