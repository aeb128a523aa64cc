"""Presets: names, options, the default run's size and error, and interruption.

Error is checked against the default budget (cosine >= 0.99 on the validation samples,
seeded random inputs since no data is given); size ratios on models/examples.
"""

import pytest

from onnxslim_cnn import cli, manager
from onnxslim_cnn.config import Budget, Config
from onnxslim_cnn.manager import DEFAULT_PRESET, PRESETS, build_pipeline, compress

from .helpers import ROOT

EXAMPLE = ROOT / "models" / "examples" / "resnet_block.onnx"


def example():
    if not EXAMPLE.is_file():
        pytest.skip(f"{EXAMPLE} does not exist yet (built by models/build.py)")
    return EXAMPLE


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_their_passes(name):
    assert tuple(p.name for p in build_pipeline(Config(preset=name))) == PRESETS[name]


def test_presets_default_is_safe_int8_weights():
    assert DEFAULT_PRESET == "safe"
    pipeline = build_pipeline(Config())
    qdq = next(p for p in pipeline if p.name == "qdq-int8")
    assert qdq.options.weights_only == "int8"
    assert "int8" in PRESETS and "equalize" in PRESETS["int8"]  # static int8 kept


def test_presets_user_options_override_the_preset():
    pipeline = build_pipeline(Config(preset="safe", options={"weights_only": "int4"}))
    assert next(p for p in pipeline if p.name == "qdq-int8").options.weights_only == "int4"
    auto = next(p for p in build_pipeline(Config(preset="balanced")) if p.name == "auto-compress")
    assert auto.options.auto_budget_share == 0.5


def test_presets_default_run_shrinks_example_3_5x_within_budget(tmp_path):
    out = tmp_path / "out.onnx"
    report = compress(example(), out, Config())
    assert report.written and report.ratio >= 3.5, report.ratio
    assert report.final["cosine"] >= Budget().min_cosine
    assert report.final["top1_agreement"] == 1.0


def test_presets_max_is_smaller_than_safe_within_budget(tmp_path):
    safe = compress(example(), tmp_path / "safe.onnx", Config(preset="safe"))
    fast = {"auto_candidates": ("int8", "c4")}  # two candidates keep the test quick
    best = compress(example(), tmp_path / "max.onnx", Config(preset="max", options=fast))
    assert best.written and best.size_out < safe.size_out
    assert best.final["cosine"] >= Budget().min_cosine
    layers = next(p for p in best.passes if p.name == "auto-compress").layers
    assert layers and all({"applied", "bytes_before", "bytes_after", "sqnr_db"} <= set(r)
                          for r in layers)
    assert any(p["within_budget"] for p in best.explored if p["kind"] == "measured")
    if best.write_plot(tmp_path / "r.png"):  # False only without matplotlib (optional)
        assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_presets_listed_by_cli(capsys):
    assert cli.main(["--list-passes"]) == 0
    text = capsys.readouterr().out
    assert all(f"preset {name}:" in text for name in PRESETS)


def test_presets_ctrl_c_leaves_no_output(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(manager.Manager, "run", interrupted)
    out = tmp_path / "out.onnx"
    code = cli.main([str(example()), str(out), "--report", str(tmp_path / "r.json")])
    assert code == cli.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output, no report, no temp file


def test_presets_cli_flags_reach_auto_compress():
    from onnxslim_cnn import passes

    argv = ["in.onnx", "out.onnx", "--target-size", "1.5MB", "--auto-candidates", "int8, c3",
            "--auto-budget-share", "0.3"]
    args = cli._parser(PRESETS, DEFAULT_PRESET).parse_args(argv)
    pipeline = cli._pipeline(args, PRESETS, DEFAULT_PRESET, passes.get_pass)
    config = cli._config(args, pipeline, DEFAULT_PRESET)
    assert config.preset == "max" and pipeline == PRESETS["max"]  # implied by the target
    auto = next(p for p in build_pipeline(config) if p.name == "auto-compress")
    assert auto.options.auto_candidates == ("int8", "c3")
    assert auto.options.auto_budget_share == 0.3 and auto.options.target_size == 1_500_000
