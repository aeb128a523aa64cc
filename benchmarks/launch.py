"""Run one command and report its wall time and peak memory, from a small process.

``python -m benchmarks.launch TIMEOUT CMD...`` prints one JSON line on stdout:
``{"code": exit code, "seconds": wall time, "peak_mb": peak RSS}``; the command's
stderr passes through, its stdout is dropped.

Why a separate launcher: Linux carries a process's peak RSS (``ru_maxrss``) across
``fork`` and ``exec``, so a tool started straight from the harness (which holds the
models and hundreds of decoded images) would report the harness's memory as its own.
Started from this process, which imports nothing but the standard library, the tool's
figure is its own (the launcher's ~10 MB is the floor).

The launcher and the command die with the process that started them (Linux): a harness
killed at a timeout (a test's, or Ctrl-C's SIGKILL) leaves no tool running on.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere a
    no-op), and exit now if the parent is already gone."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: no such call
        return
    if os.getppid() != parent:  # the parent died before the call took effect
        os._exit(1)


def measured(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; its exit code (-9 when killed at ``timeout``), seconds and peak MB."""
    start = time.perf_counter()
    # preexec_fn is safe here: this process has no other thread yet (the timer starts after)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"code": proc.returncode, "seconds": time.perf_counter() - start,
            "peak_mb": usage.ru_maxrss / 1024.0}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m benchmarks.launch TIMEOUT CMD...", file=sys.stderr)
        return 2
    die_with_parent()
    print(json.dumps(measured(argv[1:], float(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
