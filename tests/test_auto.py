"""auto-compress: patches cut from whole-model variants, splicing, allocation, search.

Tolerances are stated at each assertion. The small CNN below runs in milliseconds, so
the full search (variants, sensitivity, allocation, validation) stays fast.
"""

import numpy as np
import onnx
import pytest

from onnxslim_cnn import cli, model_io
from onnxslim_cnn.auto import allocate, patches, sensitivity, variants
from onnxslim_cnn.config import Budget, Config, parse_size
from onnxslim_cnn.errors import UsageError, ValidationError
from onnxslim_cnn.manager import compress
from onnxslim_cnn.passes.base import PassContext

from .helpers import (
    feeds,
    io_types,
    layer_params,
    make_float16,
    make_model,
    op_counts,
    optimized_ops,
    rand,
    run,
    run_pipeline,
)

# x[2,8,12,12] -> Conv(w1[32,8,3,3], b1, pad 1) -> Relu -> Conv(w2[64,32,3,3], b2)
#   -> Relu -> GlobalAveragePool -> Flatten -> Gemm(w3[64,10], transB=0) -> y[2,10]
TEXT = """
<ir_version: 8, opset_import: ["" : 14]>
g (float[2, 8, 12, 12] x) => (float[2, 10] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv (r1, w2, b2)
    r2 = Relu (c2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    y = Gemm (f, w3)
}
"""


def model():
    weights = {"w1": rand((32, 8, 3, 3), 1, 0.3), "b1": rand((32,), 2, 0.1),
               "w2": rand((64, 32, 3, 3), 3, 0.1), "b2": rand((64,), 4, 0.1),
               "w3": rand((64, 10), 5, 0.3)}
    m = make_model(TEXT, weights)
    for node, name in zip(m.graph.node, ("conv1", "relu1", "conv2"), strict=False):
        node.name = name
    m.graph.node[-1].name = "fc"
    return m


def calib(m, count=3):
    return [feeds(m, 10 + i) for i in range(count)]


def variant(m, tag):
    ctx = PassContext(calib=calib(m))
    return variants.make_variant(m, variants.candidate(tag), {}, ctx)


def test_auto_splice_of_every_patch_equals_the_variant():
    m = model()
    v = variant(m, "c4")
    found = patches.extract(m, v, "c4")
    assert set(found) == {"conv1", "conv2", "fc"}
    spliced = patches.splice(m, list(found.values()))
    feed = feeds(m, 99)
    # Same decode ops and constants, renamed: equal outputs up to float rounding (1e-5).
    np.testing.assert_allclose(run(spliced, feed)["y"], run(v, feed)["y"], rtol=1e-5,
                               atol=1e-5)
    assert op_counts(spliced) == op_counts(v)
    assert {t.name for t in m.graph.initializer} & \
        {t.name for t in spliced.graph.initializer} == set()  # every float weight replaced


def test_auto_splice_one_patch_changes_only_that_layer():
    m = model()
    found = patches.extract(m, variant(m, "int8"), "int8")
    spliced = patches.splice(m, [found["conv2"]])
    names = {t.name for t in spliced.graph.initializer}
    assert {"w1", "b1", "w3"} <= names and "w2" not in names
    assert found["conv2"].bytes < found["conv2"].base_bytes / 3  # int8 + scales
    feed = feeds(m, 7)
    # int8 weights of one layer: relative output error well below 1 % (rtol 0.02).
    ref, got = run(m, feed)["y"], run(spliced, feed)["y"]
    assert np.linalg.norm(got - ref) < 0.02 * np.linalg.norm(ref)


def test_auto_extract_declines_layers_the_variant_left_alone():
    m = model()
    assert patches.extract(m, m, "same") == {}


def option(tag, size, error):
    return allocate.Option(tag, None, size, error, sensitivity.to_db(error))


def test_auto_pareto_drops_dominated_options():
    front = allocate.pareto([option("float", 100, 0.0), option("a", 50, 0.01),
                             option("b", 60, 0.02), option("c", 20, 0.1)])
    assert [o.tag for o in front] == ["float", "a", "c"]


def test_auto_greedy_path_takes_best_bytes_per_error_first():
    fronts = {"cheap": [option("float", 100, 0.0), option("x", 10, 1e-4)],
              "costly": [option("float", 100, 0.0), option("x", 10, 1e-1)]}
    path = allocate.greedy_path(fronts)
    assert path == [{"cheap": 0, "costly": 0}, {"cheap": 1, "costly": 0},
                    {"cheap": 1, "costly": 1}]
    assert allocate.back_off(fronts, path[-1]) == {"cheap": 1, "costly": 0}
    assert allocate.size_of(fronts, path[1], 1000) == 910


def test_auto_hold_out_keeps_labels_aligned():
    batches = [{"x": np.zeros((4, 1))} for _ in range(3)]
    fit, held, labels = sensitivity.hold_out(batches, np.arange(12))
    assert len(fit) == 2 and len(held) == 1
    assert labels.tolist() == [8, 9, 10, 11]


def test_auto_compress_shrinks_within_budget():
    m = model()
    budget = Budget(min_cosine=0.999)
    out, report = run_pipeline(m, ["auto-compress"], budget=budget,
                               options={"auto_candidates": ("int8", "c4", "c2")})
    rec = report.passes[0]
    assert rec.status == "applied", rec.reason
    assert rec.size_after < rec.size_before / 4
    assert report.final["cosine"] >= 0.999  # the budget, on the validation samples
    assert {r["layer"] for r in rec.layers} == {"conv1", "conv2", "fc"}
    assert all(r["bytes_after"] < r["bytes_before"] for r in rec.layers)
    assert any(p["within_budget"] for p in report.explored if p["kind"] == "measured")


def test_auto_compress_float16_chooses_codebooks_and_stays_float16(tmp_path):
    fp32 = model()
    m = make_float16(TEXT, {i.name: onnx.numpy_helper.to_array(i)
                            for i in fp32.graph.initializer})
    for node, source in zip(m.graph.node, fp32.graph.node, strict=True):
        node.name = source.name
    budget = Budget(min_cosine=0.99)
    out, report = run_pipeline(m, ["auto-compress"], budget=budget,
                               options={"auto_candidates": ("int8", "c4", "c2")})
    rec = report.passes[0]
    assert rec.status == "applied", rec.reason
    chosen = {r["layer"]: r["applied"] for r in rec.layers}
    assert set(chosen) == {"conv1", "conv2", "fc"}
    assert {"c4", "c2"} & set(chosen.values())  # float16 weights get codebooks too
    assert report.final["cosine"] >= 0.99  # the budget, on the validation samples
    assert rec.size_after < rec.size_before / 3  # float32: / 4; float16 has half to save
    assert {v.dtype for v in layer_params(out).values()} == {np.dtype(np.float16)}
    assert io_types(out) == {onnx.TensorProto.FLOAT16}
    # every layer's decode folds at load: onnxruntime runs the dense float16 graph
    assert optimized_ops(out, tmp_path) == optimized_ops(m, tmp_path)


def test_auto_compress_tighter_budget_gives_larger_file():
    m = model()
    options = {"auto_candidates": ("int8", "c4", "c2")}
    _, loose = run_pipeline(m, ["auto-compress"], budget=Budget(min_cosine=0.98),
                            options=options)
    _, tight = run_pipeline(m, ["auto-compress"], budget=Budget(min_cosine=0.99999),
                            options=options)
    assert loose.passes[0].size_after < tight.passes[0].size_after
    assert tight.final["cosine"] >= 0.99999


@pytest.mark.parametrize("text, size", [("2MB", 2_000_000), ("500 kb", 500_000),
                                        ("1.5KiB", 1536), ("123", 123), ("7B", 7)])
def test_auto_parse_size_accepts_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "-1MB", "2XB", "0"])
def test_auto_parse_size_rejects_garbage(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_auto_target_size_reached(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    src.write_bytes(model().SerializeToString())
    target = 12_000  # the float model is ~101 KB, int8 everywhere ~27 KB
    config = Config(preset="max", target_size=target, budget=Budget(min_cosine=0.9),
                    options={"auto_candidates": ("int8", "c4", "c2")})
    report = compress(src, out, config)
    assert report.written and out.stat().st_size <= target
    assert report.final["cosine"] >= 0.9
    # the search stops at the first allocation reaching the target: not all 2-bit
    assert report.passes[6].stats.get("target_reached") == 1


def test_auto_target_size_impossible_writes_nothing(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    src.write_bytes(model().SerializeToString())
    config = Config(preset="max", target_size=3_000, budget=Budget(min_cosine=0.9999),
                    options={"auto_candidates": ("int8", "c4")})
    with pytest.raises(ValidationError, match="target size 3000 B not reached"):
        compress(src, out, config)
    assert not out.exists()


def test_auto_cli_bad_target_size_is_usage_error(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(model().SerializeToString())
    code = cli.main([str(src), str(tmp_path / "o.onnx"), "--target-size", "big"])
    assert code == 2
    assert "not a size" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_auto_target_size_needs_auto_compress():
    from onnxslim_cnn.manager import build_pipeline

    with pytest.raises(UsageError, match="auto-compress"):
        build_pipeline(Config(passes=("fold-bn",), target_size=1000))


def test_auto_sensitivity_is_measured_once_per_layer_and_candidate(monkeypatch):
    m = model()
    found = patches.extract(m, variant(m, "int8"), "int8")
    sens = sensitivity.Sensitivity(m, calib(m, 1), lambda message: None)
    calls = []
    monkeypatch.setattr(sensitivity, "splice", lambda *a: calls.append(a) or m)
    for _ in range(3):
        sens.error(found["conv1"])
    assert len(calls) == 1


def test_auto_validation_failure_backs_off_worst_layer(monkeypatch):
    """The manager's validation refuses the first auto-compress candidate: the pass
    retreats one layer step and the next candidate is accepted (not rolled back)."""
    from onnxslim_cnn import manager

    real, refused = manager.Manager._validate, []

    def refuse_first_lossy(self, candidate, lossless):
        if not lossless and not refused:
            refused.append(candidate)
            return "refused by the test", None
        return real(self, candidate, lossless)

    monkeypatch.setattr(manager.Manager, "_validate", refuse_first_lossy)
    m = model()
    _, report = run_pipeline(m, ["auto-compress"], budget=Budget(min_cosine=0.9),
                             options={"auto_candidates": ("int8", "c2")})
    rec = report.passes[0]
    assert rec.status == "applied" and rec.stats["validation_back_offs"] == 1
    assert "refused by the test" in rec.reason
    assert rec.size_before > rec.size_after > model_io.model_bytes(refused[0])  # safer
    assert report.final["cosine"] >= 0.9


def test_auto_top1_only_search_steps_back_along_its_path_then_to_the_cosine_floor():
    """Judged by top-1 alone (a stated --max-top1-drop; here one no flip can exceed) on
    all calibration samples, the search takes the cheapest mix; while validation keeps
    refusing, back-off s moves 2^(s-1) states back along the allocation path, then lands
    exactly where the same search stops with the cosine floor back, and layer steps go
    on from there."""
    from onnxslim_cnn.auto import AutoCompress, allocate
    from onnxslim_cnn.manager import export_graph, import_graph

    m = model()
    batches = calib(m, 12)
    labels = np.random.default_rng(0).integers(0, 10, 24)
    options = {"auto_candidates": ("int8", "c4", "c2")}
    top1_only = Budget(max_top1_drop=100.0, min_cosine=0.999, top1_replaces_cosine=True)
    floored = Budget(max_top1_drop=100.0, min_cosine=0.999)

    def start(budget):
        graph = import_graph(m)
        p = AutoCompress(options)
        p.run(graph, PassContext(calib=batches, calib_labels=labels, budget=budget))
        return graph, p

    _, plain = start(floored)
    floor_state = plain._last[3]
    graph, p = start(top1_only)
    # top-1 alone is judged on every calibration sample (the held-out third resolves
    # only ~3 points per flip); the cosine floor on the held-out third
    assert len(p._last[2].batches) == 12 and len(plain._last[2].batches) == 4
    path = allocate.greedy_path(p._last[0])
    at, floor = path.index(p._last[3]), path.index(floor_state)
    assert at == len(path) - 1 and floor < at - 1  # the cheapest mix, far past the floor
    sizes, steps = [model_io.model_bytes(export_graph(graph, m))], 0
    while p._path is not None:
        steps += 1
        assert p.back_off(graph) is not None
        sizes.append(model_io.model_bytes(export_graph(graph, m)))
        expect = at - (1 << steps) + 1
        assert p._last[3] == (path[expect] if expect > floor else floor_state)
    assert sizes == sorted(sizes) and steps >= 2
    assert p.back_off(graph) is not None  # a layer step from the cosine-floor choice
    assert model_io.model_bytes(export_graph(graph, m)) > sizes[-1]




def test_auto_f16_candidate_halves_each_layer_at_tiny_error():
    m = model()
    found = patches.extract(m, variant(m, "f16"), "f16")
    assert set(found) == {"conv1", "conv2", "fc"}
    conv2 = found["conv2"]
    assert conv2.bytes < 0.55 * conv2.base_bytes  # float16 values plus a Cast
    assert {t.data_type for t in conv2.initializers} == {onnx.TensorProto.FLOAT16}
    feed = feeds(m, 5)
    ref, got = run(m, feed)["y"], run(patches.splice(m, [conv2]), feed)["y"]
    # float16 rounding of one layer's weight and bias: ~1e-4 relative, asserted 1e-3
    assert 0 < np.linalg.norm(got - ref) < 1e-3 * np.linalg.norm(ref)


def test_auto_candidates_store_float32_leftovers_of_their_layers_as_float16():
    m = model()
    ctx = PassContext(calib=calib(m), later=("compact-names",))
    v = variants.make_variant(m, variants.candidate("int8"), {}, ctx)
    conv2 = patches.extract(m, v, "int8")["conv2"]
    # per-channel scales (64) and the bias (64) as float16: no float32 left
    types = [t.data_type for t in conv2.initializers if t.data_type != onnx.TensorProto.INT8]
    assert onnx.TensorProto.FLOAT not in types and onnx.TensorProto.FLOAT16 in types
    spliced = patches.splice(m, [conv2])
    assert op_counts(spliced)["Cast"] >= 2  # int8 -> float and float16 -> float


def test_auto_changed_constants_are_those_of_the_changed_layers_only():
    import onnx_graphsurgeon as gs

    m = model()
    graph = gs.import_onnx(m)
    conv2 = next(n for n in graph.nodes if n.name == "conv2")
    stored = gs.Constant("w2_half", np.asarray(conv2.inputs[1].values, np.float16))
    decoded = gs.Variable("w2_decoded", dtype=np.float32)
    graph.nodes.append(gs.Node("Cast", "w2_cast", {"to": 1}, [stored], [decoded]))
    conv2.inputs[1] = decoded
    # conv2's new weight source and its (unchanged) bias; conv1 and fc are untouched
    assert variants._changed_constants(m, graph) == {"w2_half", "b2"}


def test_auto_size_search_backs_off_along_its_path():
    """With a target size, validation failures step 1, 2, 4, ... states back along the
    allocation path (the least bytes per error undone first), not layer by layer."""
    from onnxslim_cnn.auto import AutoCompress, allocate
    from onnxslim_cnn.manager import import_graph

    m = model()
    graph = import_graph(m)
    p = AutoCompress({"auto_candidates": ("int8", "c4", "c2"), "target_size": 12_000})
    p.run(graph, PassContext(calib=calib(m, 6), budget=Budget(min_cosine=0.9)))
    path = allocate.greedy_path(p._last[0])
    at = path.index(p._last[3])
    assert at > 3
    for steps, back in enumerate((1, 3), start=1):
        assert p.back_off(graph) is not None
        assert p._last[3] == path[at - back], steps


def test_auto_labelled_search_under_a_weak_cosine_floor_backs_off_along_its_path():
    """Top-1 verdicts on the held-out third (~3 points a flip) under a floor that holds
    nothing (--min-cosine 0) take the cheapest mix; validation failures then step 1, 2,
    4, ... states back along the path (12 layer steps had not reached SqueezeNet's
    budget and nothing was compressed), where the unlabelled search steps layer by
    layer."""
    from onnxslim_cnn.auto import AutoCompress, allocate
    from onnxslim_cnn.manager import import_graph

    m = model()
    batches = calib(m, 12)
    labels = np.random.default_rng(0).integers(0, 10, 24)
    weak = Budget(max_top1_drop=100.0, min_cosine=0.0)

    def start(labelled):
        graph = import_graph(m)
        p = AutoCompress({"auto_candidates": ("int8", "c4", "c2")})
        p.run(graph, PassContext(calib=batches, calib_labels=labels if labelled else None,
                                 budget=weak))
        return graph, p

    graph, p = start(True)
    assert len(p._last[2].batches) == 4  # the held-out third
    path = allocate.greedy_path(p._last[0])
    at = path.index(p._last[3])
    assert at == len(path) - 1 and at > 3
    for back in (1, 3):
        assert p.back_off(graph) is not None
        assert p._last[3] == path[at - back]
    graph, p = start(False)  # layer by layer: the worst layer one setting safer
    layer = allocate.back_off(p._last[0], path[-1])
    for expect in (layer, allocate.back_off(p._last[0], layer)):
        assert p.back_off(graph) is not None
        assert p._last[3] == expect
    assert p._last[3] != path[at - 3]


def test_auto_cluster_candidates_share_their_input_moments(monkeypatch):
    from onnxslim_cnn.passes.cluster import refine

    m = model()
    gathered = []
    original = refine.collect_grams
    monkeypatch.setattr(refine, "collect_grams",
                        lambda *a, **k: gathered.append(1) or original(*a, **k))
    ctx = PassContext(calib=calib(m), memo={})
    shared = {tag: variants.make_variant(m, variants.candidate(tag), {}, ctx)
              for tag in ("c4", "c3")}
    assert len(gathered) == 1
    alone = variants.make_variant(m, variants.candidate("c3"), {}, PassContext(calib=calib(m)))
    assert len(gathered) == 2  # no memo: gathered again, and the same result
    assert shared["c3"].SerializeToString() == alone.SerializeToString()
    other = variants.make_variant(m, variants.candidate("c3"), {},
                                  PassContext(calib=calib(m, 2), memo=ctx.memo))
    assert len(gathered) == 3 and other is not None  # other samples: not reused
