"""The README's set-up commands: CI runs the test command verbatim, and the tool command
works on the example model it names."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import onnx
import pytest

from .helpers import ROOT

README = ROOT / "README.md"


def setup_commands() -> list[str]:
    """The first two lines of the README's first ```bash block."""
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no ```bash block"
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) >= 2, "the first bash block needs the install+run and test lines"
    return lines[:2]


def test_readme_setup_commands_are_install_then_tool_and_tests():
    tool, tests = setup_commands()
    assert tool.startswith("python -m pip install ") and "python -m onnxslim_cnn " in tool
    assert tests.startswith("python -m pip install ") and tests.endswith("python -m pytest")


def test_readme_test_command_is_what_ci_runs():
    _, tests = setup_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci]


def test_readme_tool_command_runs_on_the_example(tmp_path):
    tool, _ = setup_commands()
    parts = [p.strip() for p in tool.split("&&")]
    part = next(p for p in parts if p.startswith("python -m onnxslim_cnn "))
    argv = shlex.split(part)[3:]  # after "python -m onnxslim_cnn"
    source, output = argv[0], argv[1]
    if not (ROOT / source).is_file():
        pytest.skip(f"{source} does not exist yet (built by models/build.py)")
    # Run from tmp_path so that the output lands there; the input is read from the repo.
    argv[0] = str(ROOT / source)
    before = (ROOT / source).read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "onnxslim_cnn", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    written = tmp_path / output
    onnx.checker.check_model(onnx.load(written))
    assert (ROOT / source).read_bytes() == before
    assert "written" in proc.stdout
