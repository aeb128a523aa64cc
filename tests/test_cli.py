"""The command line through a subprocess: exit codes, one-line errors, atomic output.

Every failure must exit with its documented code (2 bad input or usage, 1 validation
failed, 3 internal error), print exactly one line on stderr and no traceback, leave the
input byte-identical and leave nothing (no output, no temp file) in the output folder.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxslim_cnn import cli
from onnxslim_cnn.passes import REGISTRY

from .helpers import ROOT, make_model, op_counts, positive, rand, run

PROG = "onnxslim-cnn: "

# x -> Conv(w, b) -> BatchNormalization -> Relu -> y
CONV_BN = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    n = BatchNormalization <epsilon = 0.001> (c, s, t, m, v)
    y = Relu (n)
}
"""


def conv_bn_model() -> onnx.ModelProto:
    return make_model(CONV_BN, {
        "w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1), "s": rand((4,), 2),
        "t": rand((4,), 3), "m": rand((4,), 4), "v": positive((4,), 5),
    })


def run_cli(*args, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m onnxslim_cnn ARGS`` (or, with ``prelude``, cli.main after it)."""
    argv = [str(a) for a in args]
    if prelude:
        code = f"{prelude}\nfrom onnxslim_cnn.cli import main\nraise SystemExit(main({argv!r}))"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "onnxslim_cnn", *argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(), path)
    return path


def assert_one_line_failure(proc, code: int, expect: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(PROG) and expect in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# --- bad input and usage: exit 2, one line, input untouched, nothing written --------

def _write_bytes(data: bytes):
    def make(tmp_path, model_path):
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(data)
        return bad, []
    return make


def _missing(tmp_path, model_path):
    return tmp_path / "missing.onnx", []


def _truncated(tmp_path, model_path):
    bad = tmp_path / "half.onnx"
    data = model_path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad, []


def _tensor_proto(tmp_path, model_path):
    bad = tmp_path / "tensor.onnx"
    bad.write_bytes(numpy_helper.from_array(rand((4, 4), 7), "t").SerializeToString())
    return bad, []


def _fails_checker(tmp_path, model_path):
    model = onnx.load(model_path)
    model.graph.node[1].op_type = "NoSuchOp"
    bad = tmp_path / "unchecked.onnx"
    bad.write_bytes(model.SerializeToString())
    return bad, []


def _with(*extra):
    return lambda tmp_path, model_path: (model_path, list(extra))


def _data_without_images(tmp_path, model_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here\n")
    return model_path, ["--data", tmp_path / "notes"]


def _images_without_preproc(tmp_path, model_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return model_path, ["--data", folder]


BAD_INPUTS = {
    "missing_file": (_missing, "no such file"),
    "empty_file": (_write_bytes(b""), "file is empty"),
    "random_bytes": (_write_bytes(np.random.default_rng(3).bytes(2000)), "bad.onnx"),
    "truncated": (_truncated, "not a readable ONNX model"),
    "tensor_proto": (_tensor_proto, "tensor.onnx"),
    "fails_checker": (_fails_checker, "fails the ONNX checker"),
    "unknown_option": (_with("--bogus"), "unrecognized arguments: --bogus"),
    "unknown_pass": (_with("--passes", "nonexistent"), "unknown pass 'nonexistent'"),
    "data_missing": (_with("--data", "nothing_here"), "no such file or folder"),
    "data_without_images": (_data_without_images, "no images"),
    "images_without_preproc": (_images_without_preproc, "preprocessing spec"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_input_exits_2_with_one_line(tmp_path, model_file, case):
    make, expect = BAD_INPUTS[case]
    source, extra = make(tmp_path, model_file)
    before = source.read_bytes() if source.exists() else None
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli(source, out_dir / "slim.onnx", *extra, cwd=tmp_path)
    assert_one_line_failure(proc, 2, expect)
    assert (source.read_bytes() if source.exists() else None) == before
    assert os.listdir(out_dir) == []


# Usage errors: the same code path as above, so run in-process (a subprocess costs ~1 s).
USAGE_ERRORS = {
    "abbreviated_option": (["--forc"], "unrecognized arguments: --forc"),
    "bad_option_value": (["--calib-count", "many"], "--calib-count"),
    "zero_calib_count": (["--calib-count", "0"], "--calib-count must be"),
    "zero_val_count": (["--val-count", "0"], "--val-count must be"),
    "negative_rtol": (["--rtol", "-1"], "--rtol must be"),
    "nan_atol": (["--atol", "nan"], "--atol must be"),
    "empty_passes": (["--passes", ""], "empty name"),
    "empty_pass_name": (["--passes", "fold-bn,,remove-dead"], "empty name"),
    "unknown_skip": (["--skip", "nonexistent"], "unknown pass 'nonexistent'"),
    "skip_everything": (["--passes", "fold-bn", "--skip", "fold-bn"], "no pass to run"),
    "passes_and_preset": (["--passes", "fold-bn", "--preset", "lossless"], "not both"),
    "unknown_preset": (["--preset", "tiny"], "invalid choice"),
    "report_folder_missing": (["--report", "nowhere/r.json"], "does not exist"),
    "report_is_output": (["--report", "out/slim.onnx"], "is the output file"),
    "no_output": (None, "need an input and an output"),
    # a pass option out of range is the user's error, found before anything runs
    "sparsity_out_of_range": (["--passes", "prune-weights", "--sparsity", "2"],
                              "--sparsity must be in [0, 1), got 2.0"),
    "negative_distill_steps": (["--passes", "cluster-weights", "--distill-steps", "-3"],
                               "--distill-steps must be 0 or more"),
    "bits_out_of_range": (["--passes", "cluster-weights", "--bits", "9"], "--bits must be"),
    "rank_ratio_out_of_range": (["--passes", "svd-split", "--rank-ratio", "1.5"],
                                "--rank-ratio must be in (0, 1]"),
    "channel_ratio_out_of_range": (["--passes", "prune-channels", "--channel-ratio", "1"],
                                   "--channel-ratio must be in (0, 1)"),
    "budget_share_out_of_range": (["--preset", "max", "--auto-budget-share", "0"],
                                  "--auto-budget-share must be in (0, 1]"),
    "unknown_candidate": (["--preset", "max", "--auto-candidates", "int8,c9"], "c9"),
    # an option no pass of the pipeline reads would be silently ignored
    "option_no_pass_reads": (["--preset", "safe", "--avg-bits", "4"], "reads --avg-bits"),
    # auto-compress chooses bits per layer itself: a global --bits is not forwarded
    "bits_with_auto": (["--preset", "max", "--bits", "3"], "reads --bits"),
    "flag_named_apart": (["--passes", "fold-bn", "--no-refine"], "reads --no-refine"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_cli_usage_error_exits_2_in_process(tmp_path, model_file, monkeypatch, capsys, case):
    extra, expect = USAGE_ERRORS[case]
    monkeypatch.chdir(tmp_path)
    before = model_file.read_bytes()
    (tmp_path / "out").mkdir()
    args = ["in.onnx"] if extra is None else ["in.onnx", "out/slim.onnx", *extra]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()]
    assert captured.err.startswith(PROG + "error: ") and expect in captured.err
    assert model_file.read_bytes() == before
    assert os.listdir(tmp_path / "out") == []


def test_cli_missing_output_folder_exits_2(tmp_path, model_file):
    before = model_file.read_bytes()
    proc = run_cli(model_file, tmp_path / "no_such_dir" / "slim.onnx", cwd=tmp_path)
    assert_one_line_failure(proc, 2, "does not exist")
    assert model_file.read_bytes() == before
    assert not (tmp_path / "no_such_dir").exists()


def test_cli_output_is_input_exits_2_and_keeps_input(tmp_path, model_file):
    before = sorted(os.listdir(tmp_path)), model_file.read_bytes()
    proc = run_cli("in.onnx", "in.onnx", cwd=tmp_path)
    assert_one_line_failure(proc, 2, "output is the input file")
    assert (sorted(os.listdir(tmp_path)), model_file.read_bytes()) == before


@pytest.mark.parametrize("args", [["in.onnx", "./sub/../in.onnx"],
                                  ["in.onnx", "slim.onnx", "--report", "sub/../in.onnx"]],
                         ids=["other_spelling", "report_is_input"])
def test_cli_input_never_overwritten_in_process(tmp_path, model_file, monkeypatch, capsys,
                                                args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    before = sorted(os.listdir(tmp_path)), model_file.read_bytes()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "input" in err
    assert (sorted(os.listdir(tmp_path)), model_file.read_bytes()) == before


def test_cli_onnxruntime_load_failure_exits_2(tmp_path, model_file):
    # Checker-valid, but onnxruntime refuses an opset from the future.
    model = onnx.load(model_file)
    model.opset_import[0].version = 99
    future = tmp_path / "future.onnx"
    onnx.save(model, future)
    proc = run_cli(future, tmp_path / "slim.onnx", cwd=tmp_path)
    assert_one_line_failure(proc, 2, "onnxruntime cannot load the model")
    assert "onnxruntime_src" not in proc.stderr  # C++ source locations are stripped
    assert not (tmp_path / "slim.onnx").exists()


def test_cli_onnxruntime_run_failure_exits_2(tmp_path):
    # Loads fine but cannot run: 8 random samples of [3] do not reshape to [5].
    model = make_model("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 3] x) => (float[5] y) { y = Reshape (x, s) }
    """, {"s": np.array([5], dtype=np.int64)})
    onnx.save(model, tmp_path / "reshape.onnx")
    proc = run_cli("reshape.onnx", "slim.onnx", cwd=tmp_path)
    assert_one_line_failure(proc, 2, "onnxruntime cannot run the model")
    assert not (tmp_path / "slim.onnx").exists()


def test_cli_optional_module_import_error_is_one_line(tmp_path, model_file):
    # Pillow is imported only to read images: without it, one line and exit 3.
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not decoded: PIL is unavailable")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"resize": 0, "crop": 8}))
    proc = run_cli(model_file, tmp_path / "slim.onnx", "--data", folder, "--preproc", spec,
                   cwd=tmp_path, prelude="import sys; sys.modules['PIL'] = None")
    assert_one_line_failure(proc, 3, "cannot be imported")
    assert not (tmp_path / "slim.onnx").exists()


def test_cli_missing_core_dependency_is_one_line(tmp_path, model_file):
    code = ("import runpy, sys; sys.modules['onnxruntime'] = None; "
            "sys.argv = ['onnxslim_cnn', 'in.onnx', 'slim.onnx']; "
            "runpy.run_module('onnxslim_cnn', run_name='__main__')")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=env)
    assert_one_line_failure(proc, 3, "onnxruntime")


# --- good runs ---------------------------------------------------------------------

def test_cli_good_run_writes_output_and_report(tmp_path, model_file):
    proc = run_cli("in.onnx", "slim.onnx", "--report", "r.json", "--preset", "lossless",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "r.json", "slim.onnx"]  # no temp left
    report = json.loads((tmp_path / "r.json").read_text())
    names = [p["name"] for p in report["passes"]]
    assert names == ["canonicalize", "remove-identity", "fold-constants", "fold-bn",
                     "fold-affine", "dedup-initializers", "remove-dead"]
    assert {p["name"]: p["status"] for p in report["passes"]}["fold-bn"] == "applied"
    assert report["written"] is True
    assert report["size_out"] == (tmp_path / "slim.onnx").stat().st_size
    out = onnx.load(tmp_path / "slim.onnx")
    onnx.checker.check_model(out)
    assert op_counts(out) == {"Conv": 1, "Relu": 1}
    feed = {"x": rand((2, 3, 8, 8), 9)}
    np.testing.assert_allclose(run(out, feed)["y"], run(conv_bn_model(), feed)["y"],
                               rtol=1e-5, atol=1e-5)
    assert "fold-bn" in proc.stdout and "written" in proc.stdout  # the table


def test_cli_quiet_success_prints_nothing(tmp_path, model_file):
    proc = run_cli("in.onnx", "slim.onnx", "--quiet", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert (tmp_path / "slim.onnx").is_file()


def test_cli_list_passes_lists_every_pass_with_summary(tmp_path):
    proc = run_cli("--list-passes", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    for name, cls in REGISTRY.items():
        assert cls.summary.strip(), f"pass {name} has no summary"
        assert any(line.split() and line.split()[0] == name and cls.summary in line
                   for line in lines), name


def test_cli_zero_tolerance_rolls_back_fold_bn(tmp_path, model_file):
    # Folding BN changes float rounding (a few ulp): rtol = atol = 0 must refuse it.
    proc = run_cli("in.onnx", "slim.onnx", "--rtol", "0", "--atol", "0", "--report", "r.json",
                   "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = next(p for p in json.loads((tmp_path / "r.json").read_text())["passes"]
                  if p["name"] == "fold-bn")
    assert record["status"] == "rolled-back"
    assert record["metrics"]["max_abs"] > 0 and "differs by up to" in record["reason"]
    assert op_counts(onnx.load(tmp_path / "slim.onnx"))["BatchNormalization"] == 1


# Every applied pass is validated against the original, and the lossless passes are
# exact up to rounding, so no honest input reaches "the result fails validation". A
# checker that refuses every candidate and the result stands in for one.
REFUSE_ALL = ("import onnxslim_cnn.validate as v\n"
              "v.check_lossless = lambda *a, **k: 'refused by the test'")


def test_cli_validation_failure_exits_1_and_writes_nothing(tmp_path, model_file):
    proc = run_cli("in.onnx", "slim.onnx", "--quiet", "--preset", "lossless", cwd=tmp_path,
                   prelude=REFUSE_ALL)
    assert_one_line_failure(proc, 1, "fails validation")
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]
    loud = run_cli("in.onnx", "slim.onnx", "--preset", "lossless", cwd=tmp_path,
                   prelude=REFUSE_ALL)
    assert loud.returncode == 1 and "Traceback" not in loud.stderr
    assert loud.stderr.splitlines()[-1].startswith(PROG + "error: result fails validation")
    assert "NOT written" in loud.stdout  # the report table still goes to stdout


def test_cli_validation_failure_with_force_writes(tmp_path, model_file):
    proc = run_cli("in.onnx", "slim.onnx", "--quiet", "--force", "--report", "r.json",
                   "--preset", "lossless", cwd=tmp_path, prelude=REFUSE_ALL)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["written"] is True and report["failure"] == "refused by the test"
    assert {p["status"] for p in report["passes"]} <= {"no-op", "rolled-back"}
    onnx.checker.check_model(onnx.load(tmp_path / "slim.onnx"))


# --- in-process: interrupts and crashes ----------------------------------------------

def test_cli_keyboard_interrupt_exits_130_one_line(tmp_path, model_file, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("onnxslim_cnn.manager.compress", interrupted)
    assert cli.main([str(model_file), str(tmp_path / "slim.onnx")]) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(PROG + "interrupted")


def test_cli_internal_error_exits_3_and_debug_raises(tmp_path, model_file, monkeypatch,
                                                     capsys):
    def crash(path):
        raise ZeroDivisionError("boom\nsecond line")
    monkeypatch.setattr("onnxslim_cnn.model_io.load", crash)
    args = [str(model_file), str(tmp_path / "slim.onnx"), "--quiet"]
    assert cli.main(args) == 3
    err = capsys.readouterr().err
    assert err.splitlines() == [PROG + "internal error: ZeroDivisionError: boom second line "
                                "(rerun with --debug)"]
    with pytest.raises(ZeroDivisionError):
        cli.main([*args, "--debug"])
    assert not (tmp_path / "slim.onnx").exists()


# --- the JSON report ------------------------------------------------------------------

def test_report_json_plain_types_and_atomic(tmp_path):
    from collections import Counter

    from onnxslim_cnn.errors import OutputError
    from onnxslim_cnn.report import PassRecord, Report

    record = PassRecord(name="p", status="applied", stats={"folded": np.int64(3),
                        "ratio": np.float32(0.5)}, declined=Counter({"shared weight": 2}),
                        metrics={"sqnr_db": float("inf"), "per_layer": np.array([1.0, 2.0])})
    report = Report(input="in.onnx", output=tmp_path / "out.onnx", passes=[record])
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passes"][0]["stats"] == {"folded": 3, "ratio": 0.5}
    assert data["passes"][0]["declined"] == {"shared weight": 2}
    assert data["passes"][0]["metrics"] == {"sqnr_db": None, "per_layer": [1.0, 2.0]}
    assert data["output"] == str(tmp_path / "out.onnx") and data["ratio"] == 0.0
    assert os.listdir(tmp_path) == ["r.json"]  # no temp file left
    assert "folded: 3" in report.table() and "declined x2: shared weight" in report.table()
    with pytest.raises(OutputError, match="cannot write the report"):
        report.write_json(tmp_path / "missing" / "r.json")


def test_cli_check_mode_gates_on_budget(tmp_path):
    from .helpers import make_model, rand

    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4] x) => (float[N, 3] y) { y = Gemm <transB = 1> (x, w, b) }
    """
    good, bad = rand((3, 4), 1), rand((3, 4), 1)
    bad[0] *= -1.0  # computes something else
    onnx.save(make_model(text, {"w": good, "b": rand((3,), 2)}), tmp_path / "a.onnx")
    onnx.save(make_model(text, {"w": good, "b": rand((3,), 2)}), tmp_path / "same.onnx")
    onnx.save(make_model(text, {"w": bad, "b": rand((3,), 2)}), tmp_path / "bad.onnx")
    before = (tmp_path / "same.onnx").read_bytes()
    ok = run_cli("a.onnx", "same.onnx", "--check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["within_budget"] and result["cosine"] == pytest.approx(1.0)
    assert (tmp_path / "same.onnx").read_bytes() == before  # --check writes nothing
    failed = run_cli("a.onnx", "bad.onnx", "--check", cwd=tmp_path)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["within_budget"] is False


def test_cli_qdq_flags_reach_the_pass_options():
    args = cli._parser({"lossless": ()}, "lossless").parse_args(
        ["in.onnx", "out.onnx", "--weight-rounding", "nearest", "--activation-levels", "full",
         "--int8-tails", "off", "--latency-guard", "on", "--reduce-range", "on"])
    options = cli._options(args)
    assert options == {"weight_rounding": "nearest", "activation_levels": "full",
                       "int8_tails": False, "latency_guard": True, "reduce_range": "on"}
    qdq = REGISTRY["qdq-int8"](options).options
    assert (qdq.weight_rounding, qdq.activation_levels, qdq.int8_tails, qdq.latency_guard) == \
        ("nearest", "full", False, True)


@pytest.mark.parametrize(("flags", "expect"), [
    ([], (1.0, 0.99, False)),
    (["--max-top1-drop", "0.5"], (0.5, 0.99, True)),
    (["--max-top1-drop", "0.5", "--min-cosine", "0.98"], (0.5, 0.98, False)),
    (["--min-cosine", "0.9"], (1.0, 0.9, False)),
])
def test_cli_stated_top1_drop_alone_replaces_cosine_floor(flags, expect):
    args = cli._parser({"lossless": ()}, "lossless").parse_args(["in.onnx", "out.onnx", *flags])
    budget = cli._budget(args)
    assert (budget.max_top1_drop, budget.min_cosine, budget.top1_replaces_cosine) == expect


def test_cli_options_forwarded_by_auto_compress_are_read():
    from onnxslim_cnn.config import Config
    from onnxslim_cnn.errors import UsageError
    from onnxslim_cnn.manager import build_pipeline

    # auto-compress hands --granularity to its codebook candidates; with int8 alone
    # no pass reads it
    build_pipeline(Config(preset="max", options={"granularity": "tensor"}))
    with pytest.raises(UsageError, match="reads --granularity"):
        build_pipeline(Config(preset="max", options={"granularity": "tensor",
                                                     "auto_candidates": ("int8",)}))


# --- progress lines ------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _series(progress, head: str, n: int) -> None:
    for k in range(1, n + 1):
        progress(f"{head} {k}/{n} layer_{k}")


def test_cli_progress_in_a_log_writes_a_series_as_five_lines():
    out = io.StringIO()
    progress = cli.ProgressLines(out)
    progress("[fold-bn] applied in 0.1s")
    _series(progress, "cluster-weights: activations of batch", 67)
    progress("[cluster-weights] applied in 9.0s")
    lines = out.getvalue().splitlines()
    steps = [line.split("batch ")[1].split()[0] for line in lines if "batch" in line]
    assert steps == ["1/67", "17/67", "34/67", "51/67", "67/67"]
    assert lines[0].endswith("[fold-bn] applied in 0.1s")
    assert lines[-1].endswith("[cluster-weights] applied in 9.0s") and len(lines) == 7


def test_cli_progress_on_a_terminal_redraws_one_line_with_a_bar():
    out = _Terminal()
    progress = cli.ProgressLines(out)
    _series(progress, "sensitivity", 4)
    _series(progress, "sensitivity", 2)  # the same series again: a new line
    progress("[auto-compress] sensitivity 3/8")  # cut short by other output
    progress("[auto-compress] applied in 1.0s")
    text = out.getvalue()
    lines = text.split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # series, series, cut series, message
    last = lines[0].split("\r")[-1]
    assert "sensitivity [########################] 4/4 layer_4" in last
    assert lines[0].count("\r") == 4 and "[############............] 2/4" in lines[0]
    assert "[#########...............] 3/8" in lines[2]
    assert lines[3].endswith("[auto-compress] applied in 1.0s")


def test_cli_progress_line_ends_before_an_error(capsys, tmp_path, model_file, monkeypatch):
    from onnxslim_cnn.errors import ValidationError

    def refuse(*args, progress=None, **kwargs):
        progress("calibration sweep 1: batch 1/3")
        raise ValidationError("result fails validation: refused by the test")
    monkeypatch.setattr("onnxslim_cnn.manager.compress", refuse)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert cli.main([str(model_file), str(tmp_path / "slim.onnx")]) == 1
    lines = sys.stderr.getvalue().split("\n")
    assert "[########................] 1/3" in lines[0]
    assert lines[1].startswith(PROG + "error: result fails validation")
