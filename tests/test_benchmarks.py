"""The benchmark harness (benchmarks/run.py) must keep working: run its quick mode on one
tiny model and check that every tool of the table gets a plausible row.

The end-to-end run takes ~15 s on 2 cores (ResNet-8, 10 calibration / 20 validation
images, 5 latency rounds). Peers that are not installed give skipped rows, not failures.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks import peers
from benchmarks.run import TOOLS
from benchmarks.tools import Job, ours, peer, run_tool
from tests.helpers import ROOT, SHARED_MODELS

STATUSES = {"ok", "skipped", "failed"}


def _tiny_model() -> tuple[str, bool]:
    """(model argument, has labels): shared ResNet-8, else the repo's example block."""
    if (SHARED_MODELS / "resnet8_cifar10_mlperf_tiny" / "model.onnx").is_file():
        return "resnet8_cifar10_mlperf_tiny", True
    example = ROOT / "models" / "examples" / "resnet_block.onnx"
    if example.is_file():
        return str(example), False
    pytest.skip("neither ../shared/models nor models/examples/resnet_block.onnx is present")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    model, labelled = _tiny_model()
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "benchmarks/run.py", "--quick", "--models", model,
           "--calib-count", "10", "--val-count", "20", "--latency-runs", "5", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    return out, results, labelled


def _rows(results: dict) -> dict[str, dict]:
    (model,) = results["models"]
    return {row["tool"]: row for row in model["rows"]}


def test_quick_run_every_tool_has_a_row(quick_run):
    _, results, _ = quick_run
    rows = _rows(results)
    assert list(rows) == list(TOOLS)
    assert {row["status"] for row in rows.values()} <= STATUSES
    for row in rows.values():
        assert row["status"] == "ok" or row["note"], f"{row['tool']} gives no reason"


def test_quick_run_fp32_row_is_the_identity(quick_run):
    _, results, labelled = quick_run
    fp32 = _rows(results)["fp32"]
    assert fp32["status"] == "ok"
    assert fp32["size_ratio"] == 1.0 and fp32["gzip_ratio"] == 1.0
    assert fp32["max_abs"] == 0.0 and fp32["top1_agreement"] == 1.0
    assert fp32["delta_top1"] == (0.0 if labelled else None)
    assert fp32["int8_convs"] == 0 and fp32["float_convs"] > 0
    for threads in ("1", "2"):
        # fp32 against itself: only noise, so within a factor of 5 even on a busy machine
        timing = fp32["latency"][threads]
        assert timing["ms"] > 0 and timing["fp32_ms"] > 0
        assert 0.2 < timing["ratio"] < 5, timing


def test_quick_run_measured_rows_are_plausible(quick_run):
    _, results, _ = quick_run
    for row in _rows(results).values():
        if row["status"] != "ok":
            continue
        assert 0 < row["size_ratio"] <= 1.01, row["tool"]  # no tool here grows the model
        assert -1.0 <= row["cosine"] <= 1.0 + 1e-9
        assert 0.0 <= row["top1_agreement"] <= 1.0
        assert all(v["ms"] > 0 and v["ratio"] > 0 for v in row["latency"].values())
        assert row["startup_ms"] > 0
        if row["tool"] != "fp32":
            assert row["tool_s"] > 0 and row["tool_peak_mb"] > 10


def test_quick_run_lossless_tools_keep_outputs(quick_run):
    _, results, _ = quick_run
    rows = _rows(results)
    lossless = rows["ours-lossless"]
    assert lossless["status"] == "ok"
    assert lossless["top1_agreement"] == 1.0 and lossless["cosine"] > 0.99999
    assert lossless["int8_convs"] == 0


def test_quick_run_macs_follow_structure_not_encoding(quick_run):
    """MACs × is 1 for the original and for weight encodings (int8, codebooks), below 1
    where prune-channels removed channels (its MACs equal the pass's own count)."""
    _, results, labelled = quick_run
    rows = _rows(results)
    assert rows["fp32"]["macs"] > 0 and rows["fp32"]["macs_ratio"] == 1.0
    for tool in ("ours-int8", "ours-cluster4", "ours-prune50"):
        assert rows[tool]["macs_ratio"] == 1.0, tool
    channels = rows["ours-channels25"]
    assert channels["status"] == "ok" and channels["macs_ratio"] <= 1.0
    if labelled:  # ResNet-8: a quarter of its channels go
        assert 0.3 < channels["macs_ratio"] < 0.9


def test_benchmarks_macs_count_convs_and_gemms(tmp_path):
    """A Conv 3x3 (C_in 4 -> 8, 6x6 output, group 2) and a Gemm (K 8 -> 5): the counts by
    hand, with the batch size of the feed (the file's dims are symbolic)."""
    from benchmarks import measure
    from tests.helpers import make_model, rand

    m = make_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 8, 8] x) => (float[N, 5] y) {
        c = Conv <group = 2> (x, w)
        p = GlobalAveragePool (c)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, v)
    }""", {"w": rand((8, 2, 3, 3), 0), "v": rand((5, 8), 1)})
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    conv = 3 * 8 * 6 * 6 * (2 * 3 * 3)
    gemm = 3 * 5 * 8
    assert measure.macs(path, {"x": np.zeros((3, 4, 8, 8), np.float32)}) == conv + gemm
    # the same weights through DequantizeLinear in an IR 3 file that does not list its
    # initializers as inputs (the peers' output for opset 7 models): onnx infers no
    # shapes there unless read as IR 4 (it counted every conv as 1 MAC)
    q = make_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 4, 8, 8] x) => (float[N, 5] y) {
        w = DequantizeLinear <axis = 0> (wq, ws)
        c = Conv <group = 2> (x, w)
        p = GlobalAveragePool (c)
        f = Flatten (p)
        y = Gemm <transB = 1> (f, v)
    }""", {"wq": np.ones((8, 2, 3, 3), np.int8), "ws": np.ones(8, np.float32),
           "v": rand((5, 8), 1)})
    q.ir_version = 3
    onnx.save(q, path)
    assert measure.macs(path, {"x": np.zeros((3, 4, 8, 8), np.float32)}) == conv + gemm


def test_quick_run_static_quantizer_runs_int8_convs(quick_run):
    _, results, _ = quick_run
    row = _rows(results)["ort-static-minmax"]
    assert row["status"] == "ok", row["note"]
    assert row["int8_convs"] > 0 and row["size_ratio"] < 0.5


def test_quick_run_markdown_lists_every_tool(quick_run):
    out, results, labelled = quick_run
    text = (out / "RESULTS.md").read_text()
    assert results["meta"]["command"] in text
    assert "VNNI" in text and "onnxruntime " in text
    for row in _rows(results).values():
        shown = f"| {row['label']} |" if row["status"] == "ok" else f"- **{row['label']}**"
        assert shown in text, row["label"]
    name = results["models"][0]["name"]
    plotted = labelled and importlib.util.find_spec("matplotlib") is not None  # optional extra
    assert (out / "plots" / f"{name}.png").is_file() == plotted


def _job(tmp_path) -> Job:
    return Job(tmp_path / "in.onnx", 13, tmp_path, (), None, timeout=10)


def test_run_tool_unregistered_pass_skipped(tmp_path):
    run = run_tool("ours-future", ours("fold-bn,no-such-pass"), _job(tmp_path), {"fold-bn"})
    assert run.status == "skipped" and "no-such-pass not registered" in run.note


def test_run_tool_missing_peer_skipped(tmp_path, monkeypatch):
    monkeypatch.setitem(peers.REQUIRES, "onnxslim", "no_such_module_for_the_benchmark")
    run = run_tool("onnxslim", peer("onnxslim"), _job(tmp_path), set())
    assert run.status == "skipped" and "not installed" in run.note


def test_peer_unknown_name_declines():
    with pytest.raises(ValueError, match="unknown peer"):
        peer("no-such-peer")


def test_run_measured_peak_memory_is_the_child_own():
    import numpy as np

    from benchmarks.tools import run_measured

    ballast = np.ones(300 * 2**20, np.uint8)  # the harness's memory must not count
    touch = "x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096])"
    small = run_measured([sys.executable, "-c", "pass"], timeout=60)
    big = run_measured([sys.executable, "-c", touch], timeout=60)
    assert ballast.sum() > 0
    assert small[0] == 0 and big[0] == 0
    assert small[3] < 100 < 200 < big[3] < 300, (small, big)


def test_benchmarks_merge_and_summary_lines():
    from benchmarks import report
    from benchmarks.run import merge

    def row(tool, **values):
        return {"tool": tool, "label": tool, "status": "ok", "notes": [], **values}

    first = {"meta": {"command": "run A"}, "models": [{"name": "m", "rows": [
        row("fp32", size_ratio=1.0), row("ours-int8", size_ratio=0.26, delta_top1=0.0,
                                         top1_agreement=0.99)]}]}
    second = {"meta": {"command": "run B"}, "models": [{"name": "m", "rows": [
        row("ort-static-minmax", size_ratio=0.27, delta_top1=-3.7, top1_agreement=0.89),
        row("ours-int8", size_ratio=0.25, delta_top1=0.0, top1_agreement=0.99)]}]}
    merged = merge([first, second])
    assert merged["meta"]["command"] == "run A ; run B"
    rows = merged["models"][0]["rows"]
    assert [r["tool"] for r in rows] == ["fp32", "ours-int8", "ort-static-minmax"]
    assert rows[1]["size_ratio"] == 0.25  # the later measurement replaces the earlier
    (line,) = report._summary(rows)
    assert "ahead on Δtop-1 (+0.0 pt vs -3.7 pt), agreement (99.0% vs 89.0%)" in line
    assert "size (0.250× vs 0.270×)" in line and line.endswith("behind on nothing")
    failed = {**row("nncf"), "status": "failed", "note": "cannot run its output"}
    skipped = {**row("onnxslim"), "status": "skipped", "note": "not installed"}
    assert report._summary(rows + [failed, skipped])[1:] == [
        "- summary **ours-int8 vs nncf**: ahead, the peer failed to give a usable model "
        "(see above)"]


def test_benchmarks_merge_never_mixes_machines_or_image_counts_in_one_table():
    from benchmarks.run import merge

    def run(command, vnni, val_count, tools):
        machine = {"cpu": "EPYC", "cores": 2, "vnni": vnni, "platform": "x"}
        rows = [{"tool": t, "label": t, "status": "ok", "notes": []} for t in tools]
        return {"meta": {"command": command, "date": "d", "machine": machine}, "models": [
            {"name": "m", "val_count": val_count, "rows": rows},
            {"name": "n" + command, "val_count": val_count, "rows": rows}]}

    merged = merge([run("A", [], 300, ["fp32", "light"]), run("B", [], 300, ["nncf"]),
                    run("C", ["avx512_vnni"], 300, ["fp32", "ours-int8"])])
    tables = {m["name"]: m for m in merged["models"]}
    assert [r["tool"] for r in tables["m"]["rows"]] == ["fp32", "ours-int8"]
    assert tables["m"]["runs"] == [2] and tables["nA"]["runs"] == [0]
    assert [r["command"] for r in merged["meta"]["runs"]] == ["A", "B", "C"]
    same = merge([run("A", [], 300, ["fp32"]), run("B", [], 400, ["nncf"])])
    assert [r["tool"] for r in same["models"][0]["rows"]] == ["nncf"]  # other image count
    # a merged result merged again still lists (and its tables still name) its own runs
    again = merge([merged, run("D", ["avx512_vnni"], 300, ["nncf"])])
    assert [r["command"] for r in again["meta"]["runs"]] == ["A", "B", "C", "D"]
    tables = {m["name"]: m for m in again["models"]}
    assert tables["m"]["runs"] == [2, 3] and tables["nB"]["runs"] == [1]
    assert [r["tool"] for r in tables["m"]["rows"]] == ["fp32", "ours-int8", "nncf"]
    # each row names the run that measured it, and the table shows it when runs mix
    assert [r["run"] for r in tables["m"]["rows"]] == [2, 2, 3]
    assert [r["run"] for r in tables["nA"]["rows"]] == [0, 0]
    from benchmarks import report
    info = {"kind": "shared", "path": "model.onnx", "opset": 13, "data": "d", "calib_count": 1}

    def section(model):
        return report._model_section(dict(model, **info), None, Path("."))

    assert section(tables["m"])[4].startswith("| tool | run | size MB")
    assert [line.split(" | ")[1] for line in section(tables["m"])[6:9]] == ["3", "3", "4"]
    assert "| run |" not in section(tables["nA"])[4]


def test_benchmarks_gate_samples_are_ours_to_validate_and_never_measured():

    from benchmarks import sources
    from onnxslim_cnn.calibration import load_dataset
    from onnxslim_cnn.config import DataConfig

    source = sources.resolve("resnet8_cifar10_mlperf_tiny", SHARED_MODELS) \
        if (SHARED_MODELS / "resnet8_cifar10_mlperf_tiny").is_dir() else None
    if source is None or source.data is None:
        pytest.skip("../shared/models resnet8 with its dataset is not present")
    whole = sources.load(source, calib_count=6, val_count=12 + 20)
    gated = sources.load(source, calib_count=6, val_count=20, gate_count=12)
    assert gated.val_count == 20 and gated.calib_count == 6
    (name,) = whole.val[0]
    joined = np.concatenate([b[name] for b in whole.val])
    np.testing.assert_array_equal(np.concatenate([b[name] for b in gated.val]), joined[12:])
    np.testing.assert_array_equal(gated.val_labels, whole.val_labels[12:])
    # the data options given to onnxslim_cnn, read as its CLI reads them: it calibrates
    # on the same 6 samples and validates on exactly the 12 gate samples
    args = sources.cli_data_args(source, 6, 20, gate_count=12)
    opts = dict(zip(args[::2], args[1::2], strict=True))
    config = DataConfig(path=Path(opts["--data"]), calib_count=int(opts["--calib-count"]),
                        val_count=int(opts["--val-count"]), seed=int(opts["--seed"]))
    ours = load_dataset(config, onnx.load(str(source.path)), source.path)
    for got, want in ((ours.calib, whole.calib), (ours.val, whole.val)):
        got = np.concatenate([b[name] for b in got])
        np.testing.assert_array_equal(got, np.concatenate([b[name] for b in want])[:len(got)])
    assert ours.val_count == 12


def test_benchmarks_resume_keeps_the_models_of_the_same_run_only(tmp_path, monkeypatch):
    from benchmarks import report, run

    measured: list[str] = []
    interrupt = {"b"}  # the first run stops before this model
    commit = ["abc1234"]

    def bench(name, settings, registered, work):
        if name in interrupt:
            raise KeyboardInterrupt
        measured.append(name)
        return {"name": name, "rows": [], "order": len(measured)}

    def write_all(results, out):  # the tables need real rows: keep the json only
        out.mkdir(parents=True, exist_ok=True)
        return {"json": report.write_json(results, out)}

    monkeypatch.setattr(run, "bench_model", bench)
    monkeypatch.setattr(run.report, "write_all", write_all)
    monkeypatch.setattr(run.report, "commit", lambda root: commit[0])

    def main(models, *extra):
        measured.clear()
        run.main(["--models", models, "--out", str(tmp_path), *extra])
        return json.loads((tmp_path / "results.json").read_text())

    with pytest.raises(KeyboardInterrupt):
        main("a,b")
    kept = json.loads((tmp_path / "results.json").read_text())
    assert [m["name"] for m in kept["models"]] == ["a"]  # written after every model
    assert kept["meta"]["commit"] == "abc1234"
    interrupt.clear()
    # the same command at the same commit: "a" is kept, only the rest is measured
    resumed = main("a,b", "--resume")
    assert measured == ["b"] and [m["name"] for m in resumed["models"]] == ["a", "b"]
    assert resumed["models"][0] == kept["models"][0] and resumed["meta"] == kept["meta"]
    assert "--resume" not in resumed["meta"]["command"]
    # another commit, uncommitted code or another command: everything is measured again
    commit[0] = "def5678"
    assert main("a,b", "--resume") and measured == ["a", "b"]
    commit[0] = "def5678+dirty"
    assert main("a,b", "--resume") and measured == ["a", "b"]
    assert main("a,b", "--resume") and measured == ["a", "b"]  # dirty code never resumes
    commit[0] = "def5678"
    assert main("b,a", "--resume") and measured == ["b", "a"]


def test_benchmarks_commit_is_the_checkout_and_says_when_code_differs(tmp_path):
    from benchmarks import report

    if report.commit(ROOT) is None:
        pytest.skip("not a git checkout")
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("old\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = report.commit(tmp_path)
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "benchmarks" / "RESULTS.md").write_text("new\n")  # a run's own output
    assert report.commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert report.commit(tmp_path) == clean + "+dirty"
    assert report.commit(tmp_path.parent / "nowhere") is None


def test_readme_result_tables_are_written_from_the_committed_results():
    from benchmarks import readme

    text = readme.README.read_text()
    assert all(f"<!-- results:{name} -->" in text for name in readme.TABLES)
    results = readme.load()
    assert set(results) == {readme.RESULTS, readme.CALIB2000}
    assert readme.render(text, results) == text, "run python benchmarks/readme.py"
    # the tables follow the results: another figure in a results file changes the README
    for path, tool in ((readme.RESULTS, "ours-int8"), (readme.CALIB2000, "ours-prune50")):
        for model in results[path]["models"]:
            for row in model["rows"]:
                if row["tool"] == tool and row.get("size_ratio"):
                    row["size_ratio"] = 0.123456
    changed = readme.render(text, results)
    assert "| 0.123 |" in changed  # the int8 table
    assert "| `ours-prune50` | 0.123 (8.10x) |" in changed  # the 2000-image prune table
    with pytest.raises(SystemExit, match="unknown results table"):
        readme.render("<!-- results:nope -->\n<!-- /results -->", results)


def test_quick_runs_cut_distillation_and_leave_other_settings_alone():
    from benchmarks.run import QUICK_DISTILL_STEPS, quick_tool

    long = TOOLS["ours-prune50-kd-long"]
    quick = quick_tool(long)
    steps = quick.args[quick.args.index("--distill-steps") + 1]
    assert int(steps) == QUICK_DISTILL_STEPS < 2000
    assert [a for a in quick.args if a != steps] == [a for a in long.args if a != "2000"]
    assert quick_tool(TOOLS["ours-prune50"]) == TOOLS["ours-prune50"]
    assert quick_tool(ours("prune-weights", "--distill-steps", "10")).args[-1] == "10"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; nobody may reap it in a container


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_a_killed_harness_leaves_no_tool_running(tmp_path):
    import signal
    import time

    pid_file = tmp_path / "tool.pid"
    tool = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    harness = ("import subprocess, sys; subprocess.run([sys.executable, '-m', "
               f"'benchmarks.launch', '60', sys.executable, '-c', {tool!r}])")
    proc = subprocess.Popen([sys.executable, "-c", harness], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert _alive(pid)
    proc.send_signal(signal.SIGKILL)  # what a test's timeout does to the harness
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)
