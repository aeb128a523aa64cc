"""Run one tool configuration on one model, as a child process, and record how it went.

Every tool is a child process (``python -m onnxslim_cnn ...`` for ours,
``python -m benchmarks.peers ...`` for the peers), started by ``benchmarks.launch`` so
the harness measures each the same way: wall time around the process, and its own peak
resident memory (``ru_maxrss`` from ``os.wait4``).

Skips and failures are results too: a pass that is not registered yet, a peer that is
not installed, a peer that fails. A peer that fails on a model older than opset
``UPGRADE_OPSET`` (or writes a file onnxruntime cannot load) is tried once more after
``onnx.version_converter``; the row is then labelled ``(opset a→b)`` and the first
failure is kept in its note.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import peers

ROOT = Path(__file__).resolve().parents[1]
UPGRADE_OPSET = 13
ORT_SELF_UPGRADE = re.compile(r"Automatically update the model to opset (\d+)")


@dataclass(frozen=True)
class Tool:
    """One named tool configuration (a row of the results tables).

    Attributes:
        kind: ``original`` (the fp32 model itself), ``ours`` or ``peer``.
        args: command-line arguments after ``in out`` (ours) or the peer's name and
            its options (peer).
        passes: passes this configuration needs registered (ours; empty = default preset).
    """

    kind: str
    args: tuple[str, ...] = ()
    passes: tuple[str, ...] = ()

    @property
    def peer(self) -> str | None:
        return self.args[0] if self.kind == "peer" else None


ORIGINAL = Tool("original")


def ours(passes: str | None = None, *extra: str) -> Tool:
    """onnxslim_cnn's CLI with ``--passes passes`` (None = its default preset)."""
    names = tuple(passes.split(",")) if passes else ()
    args = ("--passes", passes) if passes else ()
    return Tool("ours", args + extra, names)


def peer(name: str, *options: str) -> Tool:
    """A peer from ``benchmarks.peers`` with its options."""
    if name not in peers.PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(sorted(peers.PEERS))}")
    return Tool("peer", (name, *options))


@dataclass
class ToolRun:
    """What running a tool produced: the output model, or why there is none."""

    status: str  # ok | failed | skipped
    path: Path | None = None
    note: str = ""
    seconds: float | None = None
    peak_mb: float | None = None
    label_suffix: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Job:
    """Where a tool runs: the model, its data and the folder for outputs."""

    model: Path
    opset: int
    work: Path
    data_args: tuple[str, ...]  # ours: --data/--calib-count/--val-count/--seed
    calib: Path | None  # peers: .npz of calibration samples
    timeout: float


def registered_passes() -> set[str]:
    """Pass names ``python -m onnxslim_cnn --list-passes`` lists."""
    out = subprocess.run([sys.executable, "-m", "onnxslim_cnn", "--list-passes"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines()
            if line.strip() and not line.startswith("preset ")}


def run_tool(name: str, tool: Tool, job: Job, registered: set[str]) -> ToolRun:
    """Run ``tool`` on ``job``; never raises for a tool's own failure."""
    if tool.kind == "original":
        return ToolRun("ok", job.model)
    reason = _missing(tool, registered)
    if reason:
        return ToolRun("skipped", note=reason)
    if tool.kind == "ours":
        return _attempt(_ours_cmd(tool, job, name), job, name)
    return _run_peer(name, tool, job)


def _missing(tool: Tool, registered: set[str]) -> str | None:
    absent = [p for p in tool.passes if p not in registered]
    if absent:
        return f"pass {', '.join(absent)} not registered yet (--list-passes)"
    module = peers.REQUIRES.get(tool.peer or "")
    if module and importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{module.split('.')[0]} is not installed (optional peer)"
    return None


def _ours_cmd(tool: Tool, job: Job, name: str) -> list[str]:
    return [sys.executable, "-m", "onnxslim_cnn", str(job.model), str(job.work / f"{name}.onnx"),
            *tool.args, *job.data_args, "--quiet"]


def _peer_cmd(tool: Tool, job: Job, name: str, opset: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.peers", tool.args[0], str(job.model),
           str(job.work / f"{name}.onnx"), *tool.args[1:]]
    if job.calib is not None:
        cmd += ["--calib", str(job.calib)]
    return cmd + (["--opset", str(opset)] if opset else [])


def _run_peer(name: str, tool: Tool, job: Job) -> ToolRun:
    first = _attempt(_peer_cmd(tool, job, name, None), job, name)
    problem = _load_error(first.path) if first.status == "ok" else None
    if problem:
        first = ToolRun("failed", note=f"onnxruntime cannot load its output: {problem}",
                        seconds=first.seconds, notes=first.notes)
    if first.status != "failed" or job.opset >= UPGRADE_OPSET:
        return first
    retry = _attempt(_peer_cmd(tool, job, name, UPGRADE_OPSET), job, name)
    retry.label_suffix = f" (opset {job.opset}→{UPGRADE_OPSET})"
    spent = f"took {first.seconds:.1f} s" if first.seconds is not None else ""
    as_is = "; ".join(filter(None, [first.note, *first.notes, spent]))
    retry.notes.insert(0, f"as-is (opset {job.opset}): {as_is}; retried after "
                          f"onnx.version_converter to opset {UPGRADE_OPSET}")
    return retry


def _load_error(path: Path) -> str | None:
    """Why onnxruntime cannot create a session for ``path`` (None: it can)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exceptions
        text = " ".join(str(exc).replace(str(path), path.name).split())
        return text[:300] or repr(exc)
    return None


def _attempt(cmd: list[str], job: Job, name: str) -> ToolRun:
    out_path = job.work / f"{name}.onnx"
    out_path.unlink(missing_ok=True)
    code, stderr, seconds, peak_mb = run_measured(cmd, job.timeout)
    notes = [f"onnxruntime upgraded the opset to {m} itself"
             for m in sorted(set(ORT_SELF_UPGRADE.findall(stderr)))]
    if code == peers.EXIT_MISSING:
        return ToolRun("skipped", note=_last_line(stderr), notes=notes)
    if code != 0 or not out_path.is_file():
        why = f"killed after {job.timeout:.0f} s" if code == -9 else f"exit {code}"
        return ToolRun("failed", note=f"{why}: {_last_line(stderr)}", seconds=seconds,
                       peak_mb=peak_mb, notes=notes)
    return ToolRun("ok", out_path, seconds=seconds, peak_mb=peak_mb, notes=notes)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no message)"


def run_measured(cmd: list[str], timeout: float) -> tuple[int, str, float, float]:
    """Run ``cmd`` from the repo root through ``benchmarks.launch``.

    Returns (exit code, stderr, wall seconds, peak RSS MB); a child still running after
    ``timeout`` seconds is killed (exit code -9).
    """
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    launcher = [sys.executable, "-m", "benchmarks.launch", str(timeout), *cmd]
    proc = subprocess.run(launcher, cwd=ROOT, env=dict(os.environ, PYTHONPATH=path),
                          capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return proc.returncode or 1, proc.stderr, 0.0, 0.0
    stats = json.loads(lines[-1])
    return stats["code"], proc.stderr, stats["seconds"], stats["peak_mb"]
