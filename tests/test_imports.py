"""Every module of the package imports on its own (no import cycle depends on which
module a user or a tool imports first)."""

import pkgutil
import subprocess
import sys

import onnxslim_cnn

# One interpreter: before each module, the package's modules are dropped from
# sys.modules (onnx, onnxruntime and numpy stay loaded, so this takes seconds).
SCRIPT = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] == "onnxslim_cnn"]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
"""


def test_every_module_imports_first():
    names = [m.name for m in pkgutil.walk_packages(onnxslim_cnn.__path__, "onnxslim_cnn.")
             if m.name != "onnxslim_cnn.__main__"]  # __main__ runs the CLI
    assert len(names) > 50
    run = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""

