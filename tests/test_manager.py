"""The pass manager: validation against the original, rollback, reports, ``compress()``.

Deliberately wrong or crashing passes are registered by a fixture and removed from
``passes.base.REGISTRY`` afterwards. Lossless results are compared with the original at
the manager's own lossless tolerance (``Tolerance.for_dtype``: rtol=1e-4, atol=1e-5 x
max(1, max|ref|) for float32, rtol=1e-2, atol=2e-3 x ... for float16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxslim_cnn import compress, model_io, validate
from onnxslim_cnn.calibration import load_dataset
from onnxslim_cnn.config import Config, DataConfig
from onnxslim_cnn.errors import PassError, PreconditionError, UsageError, ValidationError
from onnxslim_cnn.manager import PRESETS, Manager, build_pipeline
from onnxslim_cnn.passes import base
from onnxslim_cnn.passes.base import Pass, PassResult
from onnxslim_cnn.report import Report

from .helpers import (
    ROOT,
    SHARED_MODELS,
    feeds,
    make_model,
    op_counts,
    positive,
    rand,
    run,
    run_pipeline,
    shared_model,
)

# x -> Conv(w, b) -> BN -> Identity -> Relu -> y
CONV_BN_ID = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    n = BatchNormalization (c, s, t, m, v)
    u = Identity (n)
    y = Relu (u)
}
"""
# The same network at opset 7 (IR 4: initializers need not be graph inputs).
CONV_RELU_OPSET7 = """
<ir_version: 4, opset_import: ["" : 7]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu (c)
}
"""


def weights(seed=0):
    return {"w": rand((4, 3, 3, 3), seed), "b": rand((4,), seed + 1), "s": rand((4,), seed + 2),
            "t": rand((4,), seed + 3), "m": rand((4,), seed + 4), "v": positive((4,), seed + 5)}


def conv_bn_id():
    return make_model(CONV_BN_ID, weights())


def opset7_model():
    w = weights()
    return make_model(CONV_RELU_OPSET7, {"w": w["w"], "b": w["b"]})


def statuses(report) -> list[str]:
    return [p.status for p in report.passes]


# ---------------------------------------------------------------- test passes


def _scale_first_conv_weight(graph: gs.Graph, factor: float) -> None:
    conv = next(n for n in graph.nodes if n.op == "Conv")
    w = conv.inputs[1]
    conv.inputs[1] = gs.Constant(w.name + "_scaled", np.asarray(w.values) * np.float32(factor))


class WrongLossless(Pass):
    """Claims to be lossless but scales a conv weight by 1.01."""

    name = "test-wrong-lossless"

    def run(self, graph, ctx):
        _scale_first_conv_weight(graph, 1.01)
        return PassResult(changed=True, stats={"scaled": 1})


class Crashing(Pass):
    name = "test-crash"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


@dataclass(frozen=True)
class NoiseOptions:
    noise: float = 0.0


class NoisyLossy(Pass):
    """A lossy pass: adds seeded relative noise of size ``noise`` to a conv weight."""

    name = "test-noisy"
    lossless = False
    Options = NoiseOptions

    def run(self, graph, ctx):
        conv = next(n for n in graph.nodes if n.op == "Conv")
        w = np.asarray(conv.inputs[1].values)
        noise = rand(w.shape, 99) * np.abs(w).mean() * self.options.noise
        conv.inputs[1] = gs.Constant(conv.inputs[1].name + "_noisy", w + noise)
        return PassResult(changed=True)


class NeedsOpset13(Pass):
    """Lossless, needs opset 13; renames the first node (a harmless change)."""

    name = "test-needs-13"
    min_opset = 13

    def run(self, graph, ctx):
        graph.nodes[0].name = graph.nodes[0].name + "_seen"
        return PassResult(changed=True, stats={"opset_seen": graph.opset})


class NeedsOpset13Wrong(WrongLossless):
    name = "test-needs-13-wrong"
    min_opset = 13


class NeedsOpset13Idle(Pass):
    """Needs opset 13 and then finds nothing to do."""

    name = "test-needs-13-idle"
    min_opset = 13

    def run(self, graph, ctx):
        return PassResult(changed=False, stats={"opset_seen": graph.opset})


class Refuses(Pass):
    name = "test-refuses"

    def check(self, graph, ctx):
        raise PreconditionError("needs a Gemm")

    def run(self, graph, ctx):  # pragma: no cover - never reached
        raise AssertionError("run() after a failed check()")


class AfterFoldBn(Pass):
    name = "test-after-fold-bn"
    after = ("fold-bn",)

    def run(self, graph, ctx):
        return PassResult(changed=False)


TEST_PASSES = (WrongLossless, Crashing, NoisyLossy, NeedsOpset13, NeedsOpset13Wrong,
               NeedsOpset13Idle, Refuses, AfterFoldBn)


@pytest.fixture(autouse=True)
def test_passes():
    """Register the test passes for one test, then remove them from the registry."""
    for cls in TEST_PASSES:
        base.register(cls)
    yield
    for cls in TEST_PASSES:
        base.REGISTRY.pop(cls.name, None)


# ---------------------------------------------------------------- rollback


def test_manager_wrong_lossless_pass_rolled_back_and_run_goes_on():
    model = conv_bn_id()
    out, report = run_pipeline(model, ["remove-identity", "test-wrong-lossless", "fold-bn"])
    assert statuses(report) == ["applied", "rolled-back", "applied"]
    wrong = report.passes[1]
    assert "differs by up to" in wrong.reason
    assert wrong.size_after == wrong.size_before
    assert wrong.stats == {"scaled": 1}
    # The pass after the rolled-back one saw the model as it was before it.
    expected, _ = run_pipeline(model, ["remove-identity", "fold-bn"])
    assert out.SerializeToString() == expected.SerializeToString()
    assert op_counts(out) == {"Conv": 1, "Relu": 1}


def test_manager_crashing_pass_failed_and_run_goes_on():
    out, report = run_pipeline(conv_bn_id(), ["remove-identity", "test-crash", "fold-bn"])
    assert statuses(report) == ["applied", "failed", "applied"]
    reason = report.passes[1].reason
    assert "test-crash" in reason and "boom" in reason and "remove-identity" in reason
    assert op_counts(out) == {"Conv": 1, "Relu": 1}


def test_manager_crashing_pass_debug_raises_pass_error():
    # Every pass that ran before is named, the no-op dedup-initializers included.
    model = conv_bn_id()
    config = Config(passes=("remove-identity", "dedup-initializers", "fold-bn", "test-crash"))
    manager = Manager(config, debug=True)
    with pytest.raises(PassError) as info:
        manager.run(model, load_dataset(config.data, model), Report(input="", output=""))
    error = info.value
    assert error.pass_name == "test-crash"
    assert error.before == ("remove-identity", "dedup-initializers", "fold-bn")
    assert isinstance(error.cause, RuntimeError)
    assert "pass 'test-crash' failed after [remove-identity -> dedup-initializers -> " \
        "fold-bn]: RuntimeError: boom" in str(error)


def test_manager_lossy_pass_within_budget_applied():
    model = conv_bn_id()
    out, report = run_pipeline(model, ["test-noisy"], options={"noise": 1e-3})
    record = report.passes[0]
    assert record.status == "applied"
    assert record.metrics["cosine"] >= 0.99
    assert report.final["cosine"] == record.metrics["cosine"]
    assert report.failure is None
    # It is lossy: the outputs did change.
    feed = feeds(model)
    assert not np.array_equal(run(out, feed)["y"], run(model, feed)["y"])


def test_manager_lossy_pass_outside_budget_rolled_back():
    model = conv_bn_id()
    out, report = run_pipeline(model, ["test-noisy", "remove-identity"], options={"noise": 3.0})
    assert statuses(report) == ["rolled-back", "applied"]
    assert report.passes[0].reason.startswith("cosine ")
    assert report.passes[0].metrics["cosine"] < 0.99
    assert op_counts(out) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}


# ---------------------------------------------------------------- pipeline building


def test_manager_ordering_constraint_violated_raises_usage_error():
    with pytest.raises(UsageError, match="'test-after-fold-bn' must run after fold-bn"):
        build_pipeline(Config(passes=("test-after-fold-bn", "fold-bn")))
    with pytest.raises(UsageError):
        Manager(Config(passes=("remove-identity", "test-after-fold-bn", "fold-bn")))
    # The right order, or without fold-bn at all, is fine.
    assert [p.name for p in build_pipeline(Config(passes=("fold-bn", "test-after-fold-bn")))] \
        == ["fold-bn", "test-after-fold-bn"]
    assert len(build_pipeline(Config(passes=("test-after-fold-bn",)))) == 1


def test_manager_compact_names_before_a_storage_pass_raises_usage_error():
    # decode subgraphs are recognised by the storage tag compact-names removes
    for late in ("fold-constants", "cluster-weights", "qdq-int8"):
        with pytest.raises(UsageError, match=f"'compact-names' must run after {late}"):
            build_pipeline(Config(passes=("compact-names", late)))
    assert len(build_pipeline(Config(passes=("qdq-int8", "compact-names")))) == 2


def test_manager_unknown_or_repeated_pass_raises_usage_error():
    with pytest.raises(UsageError, match="unknown pass 'no-such-pass'"):
        build_pipeline(Config(passes=("no-such-pass",)))
    with pytest.raises(UsageError, match="listed twice"):
        build_pipeline(Config(passes=("fold-bn", "fold-bn")))


def test_manager_default_pipeline_is_safe_preset():
    assert tuple(p.name for p in build_pipeline(Config())) == PRESETS["safe"]


# ---------------------------------------------------------------- opset upgrades


def test_manager_min_opset_pass_upgrades_opset7_model():
    model = opset7_model()
    out, report = run_pipeline(model, ["test-needs-13"])
    record = report.passes[0]
    assert record.status == "applied"
    assert record.stats == {"opset_seen": 13}
    assert model_io.opset(out) == 13 and model_io.opset(model) == 7
    onnx.checker.check_model(out)
    feed = feeds(model)
    np.testing.assert_allclose(run(out, feed)["y"], run(model, feed)["y"], rtol=0, atol=0)


def test_manager_min_opset_pass_rolled_back_keeps_opset():
    out, report = run_pipeline(opset7_model(), ["test-needs-13-wrong"])
    assert statuses(report) == ["rolled-back"]
    assert model_io.opset(out) == 7


def test_manager_min_opset_pass_without_change_is_no_op():
    # An opset upgrade alone is not applied: the model keeps opset 7.
    model = opset7_model()
    out, report = run_pipeline(model, ["test-needs-13-idle"])
    assert statuses(report) == ["no-op"]
    assert report.passes[0].stats == {"opset_seen": 13}
    assert model_io.opset(out) == 7


def test_manager_failed_precondition_skipped():
    out, report = run_pipeline(conv_bn_id(), ["test-refuses", "fold-bn"])
    assert statuses(report) == ["skipped", "applied"]
    assert report.passes[0].reason == "needs a Gemm"
    assert op_counts(out) == {"Conv": 1, "Identity": 1, "Relu": 1}


# ---------------------------------------------------------------- compress() and the report


def save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_compress_report_json_round_trips(tmp_path):
    src = save(conv_bn_id(), tmp_path / "in.onnx")
    report = compress(src, tmp_path / "out.onnx",
                      Config(passes=("remove-identity", "test-wrong-lossless", "fold-bn")))
    report.write_json(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert [p["name"] for p in data["passes"]] == ["remove-identity", "test-wrong-lossless",
                                                   "fold-bn"]
    assert [p["status"] for p in data["passes"]] == ["applied", "rolled-back", "applied"]
    fold = data["passes"][2]
    assert fold["stats"] == {"bn_folded": 1}
    assert fold["size_after"] < fold["size_before"]
    assert fold["metrics"]["max_abs"] <= 1e-4 and fold["metrics"]["cosine"] > 0.999999
    assert data["written"] is True
    assert data["size_out"] == (tmp_path / "out.onnx").stat().st_size
    assert data["opset_in"] == data["opset_out"] == 13


def _fail_everything(ref, cand, tolerance=None):
    return "forced failure"


def test_compress_failing_final_validation_writes_nothing(tmp_path, monkeypatch):
    src = save(conv_bn_id(), tmp_path / "in.onnx")
    before, mtime = src.read_bytes(), src.stat().st_mtime_ns
    monkeypatch.setattr(validate, "check_lossless", _fail_everything)
    with pytest.raises(ValidationError, match="forced failure") as info:
        compress(src, tmp_path / "out.onnx", Config(preset="lossless"))
    report = info.value.report
    assert set(statuses(report)) <= {"rolled-back", "no-op"}
    assert report.failure == "forced failure" and not report.written
    assert not (tmp_path / "out.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]  # no temp files left
    assert src.read_bytes() == before and src.stat().st_mtime_ns == mtime


def test_compress_failing_final_validation_forced_writes(tmp_path, monkeypatch):
    model = conv_bn_id()
    src = save(model, tmp_path / "in.onnx")
    monkeypatch.setattr(validate, "check_lossless", _fail_everything)
    report = compress(src, tmp_path / "out.onnx", Config(force=True, preset="lossless"))
    assert report.written and report.failure == "forced failure"
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert op_counts(out) == op_counts(model)  # every pass was rolled back


def test_compress_never_touches_input(tmp_path):
    src = save(conv_bn_id(), tmp_path / "in.onnx")
    before, mtime = src.read_bytes(), src.stat().st_mtime_ns
    report = compress(src, tmp_path / "out.onnx")
    assert report.written
    assert src.read_bytes() == before and src.stat().st_mtime_ns == mtime
    with pytest.raises(UsageError, match="output is the input file"):
        compress(src, src)
    assert src.read_bytes() == before


# ---------------------------------------------------------------- real and example models


def _lossless_pipeline_checks(src: Path, out_path: Path) -> tuple[onnx.ModelProto, object]:
    """Run ``compress`` with the lossless preset and check what holds for any model."""
    before, mtime = src.read_bytes(), src.stat().st_mtime_ns
    # 2+2 seeded random samples keep EfficientNet at a few seconds.
    report = compress(src, out_path, Config(data=DataConfig(random_count=2),
                                            preset="lossless"))
    assert set(statuses(report)) <= {"applied", "no-op"}, report.table()
    assert report.failure is None and report.written
    assert src.read_bytes() == before and src.stat().st_mtime_ns == mtime
    original, out = onnx.load(str(src)), onnx.load(str(out_path))
    onnx.checker.check_model(out)
    assert out_path.stat().st_size <= src.stat().st_size
    bn = op_counts(original).get("BatchNormalization", 0)
    fold = next(p for p in report.passes if p.name == "fold-bn")
    assert fold.stats.get("bn_folded", 0) == bn
    assert op_counts(out).get("BatchNormalization", 0) == 0
    feed = feeds(original, seed=3)
    ref, got = run(original, feed), run(out, feed)
    assert validate.check_lossless(ref, got) is None
    return out, report


SHARED = sorted(p.parent.name for p in SHARED_MODELS.glob("*/model.onnx")) or ["<absent>"]


@pytest.mark.parametrize("name", SHARED)
def test_compress_shared_model_lossless_pipeline_matches(name, tmp_path):
    src = shared_model(name)
    _lossless_pipeline_checks(src, tmp_path / "out.onnx")


EXAMPLES = ROOT / "models" / "examples"
EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("*.onnx")) or ["<absent>"]


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_compress_example_model_lossless_pipeline_matches(name, tmp_path):
    src = EXAMPLES / name
    if not src.is_file():
        pytest.skip(f"{src} not available")
    _lossless_pipeline_checks(src, tmp_path / "out.onnx")


def test_manager_same_input_and_options_give_byte_identical_output(tmp_path):
    from onnxslim_cnn import Config, compress

    example = Path(__file__).resolve().parents[1] / "models" / "examples" / "resnet_block.onnx"
    config = Config(passes=("fold-bn", "qdq-int8", "compact-names"))
    compress(example, tmp_path / "a.onnx", config)
    compress(example, tmp_path / "b.onnx", config)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
