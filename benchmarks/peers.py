"""Peer compressors, each run in its own child process by the harness.

``python -m benchmarks.peers PEER IN OUT [--calib NPZ] [--method M] [--opset N]``

A child process per tool run lets the harness time the tool and read its peak memory
(``ru_maxrss``) on its own, and keeps a crashing peer from taking the harness down.
The peers and their settings:

- ``ort-static``: onnxruntime ``quantize_static``, QDQ format, per-channel QInt8
  weights, QUInt8 activations, calibration ``--method`` minmax, percentile or entropy.
- ``ort-dynamic``: onnxruntime ``quantize_dynamic`` with QInt8 weights (defaults
  otherwise).
- ``onnxslim``: ``onnxslim.slim`` with its defaults (lossless graph clean-up).
- ``nncf``: ``nncf.quantize`` on the ONNX model with its defaults (8-bit, preset
  PERFORMANCE), ``subset_size`` = every calibration sample.

Calibration samples (``--calib``) are an ``.npz`` of ``input name -> [N, ...]`` arrays,
the same calibration images onnxslim_cnn is given; peers see them one sample at a time.
``--opset N`` first converts the model with ``onnx.version_converter`` (the harness
asks for it only after the model failed as it was).

Exit codes: 0 written; 1 the peer failed (one line on stderr); 4 the peer's package is
not installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

EXIT_FAILED = 1
EXIT_MISSING = 4

# peer name -> the module that must be importable for it to run
REQUIRES: dict[str, str] = {
    "ort-static": "onnxruntime.quantization",
    "ort-dynamic": "onnxruntime.quantization",
    "onnxslim": "onnxslim",
    "nncf": "nncf",
}


def samples(calib: Path | None) -> list[dict[str, np.ndarray]]:
    """The calibration set as one ``{input: [1, ...]}`` feed per sample."""
    if calib is None:
        return []
    with np.load(calib, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    count = next(iter(arrays.values())).shape[0]
    return [{name: value[i:i + 1] for name, value in arrays.items()} for i in range(count)]


def ort_static(src: Path, out: Path, feeds: list[dict], method: str) -> None:
    from onnxruntime import quantization as q

    methods = {"minmax": q.CalibrationMethod.MinMax,
               "percentile": q.CalibrationMethod.Percentile,
               "entropy": q.CalibrationMethod.Entropy}

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict] = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    q.quantize_static(str(src), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, weight_type=q.QuantType.QInt8,
                      activation_type=q.QuantType.QUInt8, calibrate_method=methods[method])


def ort_dynamic(src: Path, out: Path, feeds: list[dict], method: str) -> None:
    from onnxruntime import quantization as q

    q.quantize_dynamic(str(src), str(out), weight_type=q.QuantType.QInt8)


def onnxslim_peer(src: Path, out: Path, feeds: list[dict], method: str) -> None:
    import onnxslim

    onnxslim.slim(str(src), str(out))


def nncf_peer(src: Path, out: Path, feeds: list[dict], method: str) -> None:
    # NNCF's documented telemetry opt-out: the benchmark must not touch the network
    os.environ.setdefault("NNCF_CI", "1")
    import nncf
    import onnx

    model = nncf.quantize(onnx.load(str(src)), nncf.Dataset(feeds), subset_size=len(feeds))
    onnx.save(model, str(out))


PEERS: dict[str, Callable[[Path, Path, list[dict], str], None]] = {
    "ort-static": ort_static,
    "ort-dynamic": ort_dynamic,
    "onnxslim": onnxslim_peer,
    "nncf": nncf_peer,
}


def upgraded(src: Path, opset: int, folder: Path) -> Path:
    """``src`` converted to ``opset`` by ``onnx.version_converter``, saved in ``folder``."""
    import onnx
    from onnx import version_converter

    model = version_converter.convert_version(onnx.load(str(src)), opset)
    path = folder / f"{src.stem}.opset{opset}.onnx"
    onnx.save(model, str(path))
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers")
    p.add_argument("peer", choices=sorted(PEERS))
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--calib", type=Path, help=".npz of calibration samples")
    p.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--opset", type=int, help="convert the model to this opset first")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(dir=args.output.parent) as tmp:
            src = upgraded(args.input, args.opset, Path(tmp)) if args.opset else args.input
            PEERS[args.peer](src, args.output, samples(args.calib), args.method)
    except ImportError as exc:
        print(f"not installed: {exc}", file=sys.stderr)
        return EXIT_MISSING
    except Exception as exc:  # a peer's own failure is a result to record, not a crash
        text = " ".join(str(exc).split())[:300] or repr(exc)
        print(f"failed: {type(exc).__name__}: {text}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
