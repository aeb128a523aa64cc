"""Command line: ``onnxslim-cnn in.onnx out.onnx [options]``.

Exit codes: 0 written; 1 the result failed validation and nothing was written;
2 bad input or usage; 3 internal error (run again with --debug for the traceback);
130 interrupted. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__, passes
from .config import Budget, Config, DataConfig, Tolerance
from .errors import OnnxSlimError, UsageError
from .manager import DEFAULT_PRESET, PRESETS, compress

PROG = "onnxslim-cnn"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Compress a CNN in ONNX form, validated "
                "against onnxruntime after every pass.")
    p.add_argument("input", nargs="?", help="model to compress (never modified)")
    p.add_argument("output", nargs="?", help="where to write the result")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    g = p.add_argument_group("pipeline")
    g.add_argument("--passes", help="comma-separated passes, run in the order given")
    g.add_argument("--preset", choices=sorted(PRESETS), help=f"named pipeline "
                   f"(default {DEFAULT_PRESET})")
    g.add_argument("--skip", action="append", default=[], help="drop a pass (repeatable, "
                   "or comma-separated)")
    g.add_argument("--list-passes", action="store_true", help="list passes and exit")
    d = p.add_argument_group("data")
    d.add_argument("--data", type=Path, help="image folder (labels.tsv optional), IDX "
                   "folder, .npy or .npz; default: seeded random inputs")
    d.add_argument("--preproc", type=Path, help="image preprocessing spec "
                   "(default: model.preproc.json or <stem>.preproc.json beside the model)")
    d.add_argument("--calib-count", type=int, default=100, help="samples for calibration; "
                   "the others validate (default 100)")
    d.add_argument("--val-count", type=int, help="at most this many validation samples")
    d.add_argument("--seed", type=int, default=0, help="seed for random inputs and splits")
    b = p.add_argument_group("validation")
    b.add_argument("--max-top1-drop", type=float, default=Budget.max_top1_drop,
                   help="lossy passes: largest top-1 loss in points (with labels)")
    b.add_argument("--min-top1-agreement", type=float, help="lossy passes: smallest "
                   "fraction of samples whose top-1 class agrees with the original")
    b.add_argument("--min-cosine", type=float, default=Budget.min_cosine,
                   help="lossy passes: smallest output cosine similarity")
    b.add_argument("--rtol", type=float, help="lossless passes: relative tolerance")
    b.add_argument("--atol", type=float, help="lossless passes: absolute tolerance, "
                   "scaled by max(1, max|output|)")
    b.add_argument("--no-validate", action="store_true", help="skip the onnxruntime "
                   "comparison (for models onnxruntime cannot run)")
    b.add_argument("--force", action="store_true", help="write the result even if it "
                   "fails validation")
    o = p.add_argument_group("output")
    o.add_argument("--report", type=Path, help="write the report as JSON here")
    o.add_argument("--quiet", action="store_true", help="no progress and no table")
    o.add_argument("--debug", action="store_true", help="tracebacks instead of one-liners")
    return p


def _pipeline(args) -> tuple[str, ...]:
    if args.passes and args.preset:
        raise UsageError("give --passes or --preset, not both")
    names = [n.strip() for n in args.passes.split(",")] if args.passes else \
        list(PRESETS[args.preset or DEFAULT_PRESET])
    if any(not n for n in names):
        raise UsageError("--passes has an empty name")
    skip = {n.strip() for s in args.skip for n in s.split(",") if n.strip()}
    for name in list(names) + sorted(skip):
        passes.get_pass(name)
    return tuple(n for n in names if n not in skip)


def _config(args) -> Config:
    if args.calib_count < 1:
        raise UsageError("--calib-count must be at least 1")
    tolerance = None
    if args.rtol is not None or args.atol is not None:
        tolerance = Tolerance(rtol=args.rtol if args.rtol is not None else Tolerance.rtol,
                              atol=args.atol if args.atol is not None else Tolerance.atol)
    return Config(
        passes=_pipeline(args),
        data=DataConfig(path=args.data, preproc=args.preproc, calib_count=args.calib_count,
                        val_count=args.val_count, seed=args.seed),
        budget=Budget(max_top1_drop=args.max_top1_drop, min_cosine=args.min_cosine,
                      min_top1_agreement=args.min_top1_agreement),
        tolerance=tolerance, validate=not args.no_validate, force=args.force,
        quiet=args.quiet, seed=args.seed,
    )


def _list_passes() -> str:
    width = max(len(n) for n in passes.REGISTRY)
    lines = [f"{name:<{width}}  {cls.summary}" for name, cls in sorted(passes.REGISTRY.items())]
    lines += [f"preset {name}: {','.join(seq)}" for name, seq in PRESETS.items()]
    return "\n".join(lines)


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.list_passes:
        print(_list_passes())
        return 0
    if not args.input or not args.output:
        raise UsageError("need an input and an output path (see --help)")
    config = _config(args)
    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)
    report = compress(args.input, args.output, config, progress=progress, debug=args.debug)
    if args.report:
        report.write_json(args.report)
    if not args.quiet:
        print(report.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return _run(argv)
    except OnnxSlimError as exc:
        if debug:
            raise
        report = getattr(exc, "report", None)
        if report is not None and "--quiet" not in (argv or sys.argv[1:]):
            print(report.table(), file=sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: never a traceback without --debug
        if debug:
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        print(f"{PROG}: internal error: {type(exc).__name__}: {first} (rerun with --debug)",
              file=sys.stderr)
        return 3
