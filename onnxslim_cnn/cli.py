"""Command line: ``onnxslim-cnn in.onnx out.onnx [options]``.

Exit codes: 0 written; 1 the result failed validation and nothing was written;
2 bad input or usage; 3 internal error (run again with --debug for the traceback);
130 interrupted. Every failure is one line on stderr (after the progress lines, which
``--quiet`` silences); the report table goes to stdout, also when nothing was written.

The pipeline modules (manager, passes, onnxruntime) are imported inside ``main``'s
error handling, so a broken or missing dependency is a one-line error too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from . import __version__
from .config import Budget, Config, DataConfig, Tolerance, parse_size
from .errors import OnnxSlimError, UsageError

PROG = "onnxslim-cnn"
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class ProgressLines:
    """Progress messages on a stream, each stamped with the seconds since the start.

    A counted series ("cluster-weights: activations of batch 5/67") takes one line: on a
    terminal it is redrawn in place with a bar; in a log (not a terminal) only its first
    and last step and the first step of each quarter between are written (67 lines -> 5).
    """

    WIDTH = 24

    def __init__(self, stream):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.series: str | None = None  # head of the counted series being shown
        self.quarter = -1  # last quarter of that series written (not a terminal)
        self.open = False  # a redrawn line is on the terminal without its newline

    def __call__(self, message: str) -> None:
        stamp = f"{time.perf_counter() - self.started:7.1f}s "
        counted = _COUNTER.match(message)
        if counted is None or int(counted["n"]) < 2:
            self._line(stamp + message)
            return
        head, k, n = counted["head"], int(counted["k"]), int(counted["n"])
        if head != self.series:
            self.close()
            self.series, self.quarter = head, -1
        if self.tty:
            filled = self.WIDTH * min(k, n) // n
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r{stamp}{head}[{bar}] {k}/{n}{counted['tail']}\x1b[K")
            self.open = True
        elif k in (1, n) or 4 * k // n > self.quarter:
            self.stream.write(f"{stamp}{message}\n")
        self.quarter = 4 * k // n
        if k >= n:
            self.close()
        self.stream.flush()

    def close(self) -> None:
        """End a redrawn line (before other output, e.g. an error)."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
        self.open, self.series = False, None

    def _line(self, text: str) -> None:
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()


_COUNTER = re.compile(r"^(?P<head>.*?)(?P<k>\d+)/(?P<n>\d+)(?P<tail>.*)$")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def _parser(presets: dict[str, tuple[str, ...]], default_preset: str) -> argparse.ArgumentParser:
    # allow_abbrev=False: main() spots --debug/--quiet before parsing, so they must be
    # spelled out in full.
    p = _Parser(prog=PROG, allow_abbrev=False, description="Compress a CNN in ONNX form, "
                "validated against onnxruntime after every pass.")
    p.add_argument("input", nargs="?", help="model to compress (never modified)")
    p.add_argument("output", nargs="?", help="where to write the result")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _pipeline_options(p.add_argument_group("pipeline"), presets, default_preset)
    _data_options(p.add_argument_group("data"))
    _validation_options(p.add_argument_group("validation"))
    _pass_options(p.add_argument_group("pass options (read by the passes that use them)"))
    o = p.add_argument_group("output")
    o.add_argument("--report", type=Path, help="write the report as JSON here (and, when "
                   "auto-compress explored trade-offs and matplotlib is installed, a plot "
                   "beside it with the suffix .png)")
    o.add_argument("--quiet", action="store_true", help="no progress and no table")
    o.add_argument("--debug", action="store_true", help="tracebacks instead of one-liners")
    return p


def _pipeline_options(g, presets, default_preset: str) -> None:
    g.add_argument("--passes", help="comma-separated passes, run in the order given")
    g.add_argument("--preset", choices=sorted(presets),
                   help=f"named pipeline (default {default_preset}; see --list-passes): "
                   "lossless = exact rewrites only; safe = + int8 weights, ~4x smaller, no "
                   "data needed; balanced / max = per-layer int8 or codebook weights chosen "
                   "by measured sensitivity within half / all of the budget; int8 = static "
                   "int8 for onnxruntime's int8 kernels (needs --data for best accuracy)")
    g.add_argument("--target-size", help="aim at a file of at most this size (2MB, 500KB, "
                   "123456 bytes) within the budget; implies --preset max unless a preset "
                   "or --passes is given; exit 1 when the budget does not allow it")
    g.add_argument("--skip", action="append", default=[], help="drop a pass (repeatable, "
                   "or comma-separated)")
    g.add_argument("--list-passes", action="store_true", help="list passes and exit")


def _data_options(d) -> None:
    d.add_argument("--data", type=Path, help="image folder (labels.tsv optional), IDX "
                   "folder, .npy or .npz; default: seeded random inputs")
    d.add_argument("--preproc", type=Path, help="image preprocessing spec "
                   "(default: model.preproc.json or <stem>.preproc.json beside the model)")
    d.add_argument("--calib-count", type=int, default=100, help="samples for calibration; "
                   "the others validate (default 100)")
    d.add_argument("--val-count", type=int, help="at most this many validation samples")
    d.add_argument("--seed", type=int, default=0, help="seed for random inputs and splits")


def _validation_options(b) -> None:
    b.add_argument("--max-top1-drop", type=float, help="lossy passes: largest top-1 loss "
                   f"in points (with labels; default {Budget.max_top1_drop:g}); stated "
                   "without --min-cosine, it replaces the cosine floor when labels exist")
    b.add_argument("--min-top1-agreement", type=float, help="lossy passes: smallest "
                   "fraction of samples whose top-1 class agrees with the original")
    b.add_argument("--min-cosine", type=float, help="lossy passes: smallest output "
                   f"cosine similarity (default {Budget.min_cosine:g})")
    b.add_argument("--rtol", type=float, help="lossless passes: relative tolerance")
    b.add_argument("--atol", type=float, help="lossless passes: absolute tolerance, "
                   "scaled by max(1, max|output|)")
    b.add_argument("--no-validate", action="store_true", help="skip the onnxruntime "
                   "comparison (for models onnxruntime cannot run)")
    b.add_argument("--check", action="store_true", help="only compare OUTPUT (an existing "
                   "model) with INPUT on the data and print the metrics as JSON; exit 1 "
                   "when outside the budget (--min-cosine, --max-top1-drop, ...). With the "
                   "run's --seed and --calib-count = its calibration + validation counts, "
                   "it measures only samples the run never read")
    b.add_argument("--force", action="store_true", help="write the result even if it "
                   "fails validation")


def _preset(args, default_preset: str) -> str | None:
    """The preset whose passes and options apply (None for an explicit --passes)."""
    if args.passes is not None and args.preset:
        raise UsageError("give --passes or --preset, not both")
    if args.passes is not None:
        return None
    if args.preset is None and args.target_size is not None:
        return "max"
    return args.preset or default_preset


def _pipeline(args, presets, default_preset: str, get_pass) -> tuple[str, ...]:
    preset = _preset(args, default_preset)
    names = [n.strip() for n in args.passes.split(",")] if preset is None \
        else list(presets[preset])
    if any(not n for n in names):
        raise UsageError("--passes has an empty name")
    skip = {n.strip() for s in args.skip for n in s.split(",") if n.strip()}
    for name in list(names) + sorted(skip):
        get_pass(name)
    kept = tuple(n for n in names if n not in skip)
    if not kept:
        raise UsageError("--skip leaves no pass to run")
    return kept


def _check_numbers(args) -> None:
    if args.calib_count < 1:
        raise UsageError("--calib-count must be at least 1")
    if args.val_count is not None and args.val_count < 1:
        raise UsageError("--val-count must be at least 1")
    if args.seed < 0:
        raise UsageError("--seed must be 0 or more")
    for flag in ("rtol", "atol", "max_top1_drop"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:  # also rejects NaN
            raise UsageError(f"--{flag.replace('_', '-')} must be 0 or more")


def _pass_options(g) -> None:
    g.add_argument("--calib-method", choices=("minmax", "percentile", "entropy", "mse"),
                   help="qdq-int8: activation range method (default percentile)")
    g.add_argument("--percentile", type=float, help="qdq-int8: percentile of the "
                   "percentile method (default 99.999, as onnxruntime)")
    g.add_argument("--activation-type", choices=("uint8", "int8"),
                   help="qdq-int8: activation type (default uint8)")
    g.add_argument("--reduce-range", choices=("auto", "on", "off"), help="qdq-int8: "
                   "7-bit weights only in channels that could saturate AVX2 int16 sums "
                   "(auto, default), everywhere (on) or nowhere (off)")
    g.add_argument("--bias-correction", choices=("empirical", "analytic", "off"),
                   help="qdq-int8: bias correction (default empirical)")
    g.add_argument("--fp32-layers", help="qdq-int8: comma-separated node (or output) "
                   "names kept in float")
    g.add_argument("--fallback-sqnr", type=float, dest="fallback_sqnr_db",
                   help="qdq-int8: keep layers whose output SQNR is below this (dB) in "
                   "float, at most 10%% of them (default 15; 0 disables)")
    g.add_argument("--weight-rounding", choices=("gptq", "nearest"), help="qdq-int8: round "
                   "Conv/Gemm weights to minimise each layer's output error on the "
                   "calibration data (gptq, default) or to the nearest level")
    g.add_argument("--activation-levels", choices=("auto", "full"), help="qdq-int8: let an "
                   "activation use fewer uint8 levels where that keeps wider weight ranges "
                   "under the AVX2 pair bound at a lower output error (auto, default)")
    g.add_argument("--int8-tails", choices=("on", "off"), help="qdq-int8: run the last conv "
                   "before an averaging pool, and a conv only float ops read (LRN), as an "
                   "int8 kernel (on, default)")
    g.add_argument("--latency-guard", choices=("on", "off"), help="qdq-int8: time int8 vs "
                   "float here and keep float compute with int8 weights when int8 is slower "
                   "(on, default)")
    g.add_argument("--weights-only", choices=("int8", "int4"), help="qdq-int8: store "
                   "weights as per-channel integers only; activations stay float, no "
                   "calibration data needed")
    g.add_argument("--sparsity", type=float, help="prune-weights: global fraction of "
                   "prunable weights set to zero (default 0.5)")
    g.add_argument("--threshold", type=float, help="prune-weights: zero |w| < this "
                   "instead of a sparsity target")
    g.add_argument("--prune-ops", help="prune-weights: comma-separated conv,gemm,matmul "
                   "(default all three)")
    g.add_argument("--prune-first-last", action="store_true", default=None,
                   help="prune-weights: also prune the first conv and the classifier")
    g.add_argument("--allocation", choices=("sensitivity", "network", "uniform"),
                   help="prune-weights: per-layer sparsity from measured sensitivity "
                   "(default), from the model-output error of each layer pruned alone at "
                   "7 levels (network: slower), or uniform")
    g.add_argument("--prune-score", dest="score", choices=("activation", "magnitude"),
                   help="prune-weights: rank by |w| (default) or |w|*input RMS")
    g.add_argument("--prune-recovery", dest="recovery", choices=("on", "off"),
                   help="prune-*: least-squares re-fit on calibration data (default on)")
    g.add_argument("--prune-sequential", dest="sequential", choices=("on", "off"),
                   help="prune-*: re-fit layer by layer on the already pruned model's "
                   "inputs (slower; default off for prune-weights, on for prune-channels)")
    g.add_argument("--distill-steps", type=int, help="prune-weights, prune-channels, "
                   "svd-split, cluster-weights: after the per-layer fits, tune the kept "
                   "weights (the codebooks when clustered) of all compressed layers together "
                   "towards the "
                   "original outputs on the calibration data for this many steps "
                   "(knowledge distillation; default 0: off)")
    g.add_argument("--channel-ratio", type=float, help="prune-channels: fraction of the "
                   "channels of each prunable group removed (default 0.25)")
    g.add_argument("--channel-score", choices=("l2", "l1", "activation"),
                   help="prune-channels: channel importance (default activation)")
    g.add_argument("--rank-ratio", type=float, help="svd-split: force rank = ratio * full "
                   "rank (data-free)")
    g.add_argument("--energy", type=float, help="svd-split: force the smallest rank keeping "
                   "this fraction of the squared singular values (data-free)")
    g.add_argument("--svd-error", type=float, help="svd-split: per-layer relative output "
                   "error budget on calibration data (default 0.1)")
    g.add_argument("--svd-target-macs", type=float, help="svd-split: remove this share "
                   "(0-1) of the splittable layers' MACs, ranks chosen across layers for "
                   "the least output error")
    g.add_argument("--svd-mode", choices=("auto", "channel", "spatial"),
                   help="svd-split: decomposition (default auto: per layer)")
    g.add_argument("--svd-min-saving", type=float, help="svd-split: smallest fraction of a "
                   "layer's params and FLOPs a split must save (default 0.2)")
    _cluster_options(g)
    _auto_options(g)


def _auto_options(g) -> None:
    g.add_argument("--auto-candidates", help="auto-compress: comma-separated per-layer "
                   "candidates among f16, int8, c1..c8 (cluster bits) and p<S>c<b> (pruned "
                   "S %% then clustered); default from the preset")
    g.add_argument("--auto-budget-share", type=float, help="auto-compress: fraction of the "
                   "budget the search spends on calibration data (balanced 0.5, max 1)")


def _cluster_options(g) -> None:
    g.add_argument("--bits", type=int, help="cluster-weights: index bits (1-8) for every "
                   "layer (default 4 unless a budget is given)")
    g.add_argument("--avg-bits", type=float, help="cluster-weights: size budget, average "
                   "bits per weight with codebooks and decode nodes; bits chosen per layer")
    g.add_argument("--min-layer-sqnr", type=float, dest="min_sqnr_db", help="cluster-weights:"
                   " error budget, fewest bits reaching this output SQNR (dB) per layer")
    g.add_argument("--granularity", choices=("auto", "channel", "scaled", "tensor"),
                   help="cluster-weights: codebook per tensor, per output channel, one "
                   "codebook scaled per output channel, or chosen per layer (auto, default)")
    g.add_argument("--kmeans-init", choices=("linear", "density", "kmeans++"),
                   help="cluster-weights: k-means initialisation (default linear)")
    g.add_argument("--no-refine", action="store_const", const=False, dest="data_aware",
                   help="cluster-weights: plain k-means centroids (no data-aware refinement)")


PASS_OPTIONS = ("calib_method", "percentile", "activation_type", "reduce_range",
                "bias_correction", "fallback_sqnr_db", "weights_only", "sparsity",
                "threshold", "distill_steps", "prune_ops", "prune_first_last", "allocation",
                "score", "channel_ratio", "channel_score", "rank_ratio", "energy", "svd_error",
                "svd_target_macs", "svd_mode", "svd_min_saving", "bits", "avg_bits",
                "min_sqnr_db", "granularity", "kmeans_init", "data_aware", "auto_budget_share",
                "weight_rounding", "activation_levels")


def _options(args) -> dict:
    """The pass options given on the command line (absent ones keep pass defaults)."""
    options = {k: getattr(args, k) for k in PASS_OPTIONS if getattr(args, k) is not None}
    for flag in ("recovery", "sequential", "int8_tails", "latency_guard"):
        if getattr(args, flag) is not None:
            options[flag] = getattr(args, flag) == "on"
    if args.auto_candidates:
        options["auto_candidates"] = tuple(n.strip() for n in args.auto_candidates.split(",")
                                           if n.strip())
    if args.fp32_layers:
        options["fp32_layers"] = tuple(n.strip() for n in args.fp32_layers.split(",")
                                       if n.strip())
    return options


def _config(args, pipeline: tuple[str, ...], default_preset: str = "safe") -> Config:
    _check_numbers(args)
    tolerance = None
    if args.rtol is not None or args.atol is not None:
        tolerance = Tolerance(rtol=args.rtol if args.rtol is not None else Tolerance.rtol,
                              atol=args.atol if args.atol is not None else Tolerance.atol)
    return Config(
        passes=pipeline, options=_options(args),
        data=DataConfig(path=args.data, preproc=args.preproc, calib_count=args.calib_count,
                        val_count=args.val_count, seed=args.seed),
        budget=_budget(args),
        tolerance=tolerance, validate=not args.no_validate, force=args.force,
        quiet=args.quiet, seed=args.seed,
        preset=_preset(args, default_preset) if pipeline else None,
        target_size=None if args.target_size is None else parse_size(args.target_size),
    )


def _budget(args) -> Budget:
    """The budget the user stated; a stated top-1 drop alone replaces the cosine floor."""
    return Budget(
        max_top1_drop=Budget.max_top1_drop if args.max_top1_drop is None
        else args.max_top1_drop,
        min_cosine=Budget.min_cosine if args.min_cosine is None else args.min_cosine,
        min_top1_agreement=args.min_top1_agreement,
        top1_replaces_cosine=args.max_top1_drop is not None and args.min_cosine is None)


def _check_report_path(report: Path | None, input_path: str, output_path: str) -> None:
    """The report never replaces the input or the output, and its folder exists."""
    if report is None:
        return
    for other, what in ((input_path, "input"), (output_path, "output")):
        if os.path.abspath(report) == os.path.abspath(other) or \
                (report.exists() and Path(other).exists() and os.path.samefile(report, other)):
            raise UsageError(f"--report {report}: is the {what} file")
    folder = report.parent
    if not folder.is_dir():
        raise UsageError(f"--report {report}: folder {folder} does not exist")


def _list_passes(registry, presets) -> str:
    width = max(len(n) for n in registry)
    lines = [f"{name:<{width}}  {cls.summary}" for name, cls in sorted(registry.items())]
    lines += [f"preset {name}: {','.join(seq)}" for name, seq in presets.items()]
    return "\n".join(lines)


def _run(argv: list[str]) -> int:
    from . import passes
    from .manager import DEFAULT_PRESET, PRESETS, compress

    args = _parser(PRESETS, DEFAULT_PRESET).parse_args(argv)
    if args.list_passes:
        print(_list_passes(passes.REGISTRY, PRESETS))
        return 0
    if not args.input or not args.output:
        raise UsageError("need an input and an output path (see --help)")
    if args.check:
        return _check(args)
    config = _config(args, _pipeline(args, PRESETS, DEFAULT_PRESET, passes.get_pass),
                     DEFAULT_PRESET)
    _check_report_path(args.report, args.input, args.output)

    progress = ProgressLines(sys.stderr) if not args.quiet else None
    try:
        report = compress(args.input, args.output, config, progress=progress,
                          debug=args.debug)
    finally:
        if progress is not None:
            progress.close()
    if args.report:
        report.write_json(args.report)
        report.write_plot(args.report.with_suffix(".png"))
    if not args.quiet:
        print(report.table())
    return 0


def _check(args) -> int:
    """``--check``: compare OUTPUT (an existing model) with INPUT; exit 1 outside budget."""
    import json

    from .manager import check_pair

    metrics, failure = check_pair(args.input, args.output, _config(args, ()))
    summary = {k: metrics.get(k) for k in ("samples", "data", "cosine", "sqnr_db", "max_abs",
                                           "top1_agreement", "top1_ref", "top1", "top1_drop")}
    print(json.dumps(summary | {"within_budget": failure is None, "reason": failure}))
    return 0 if failure is None else 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())  # newlines and runs of blanks -> one space
    return text[:300] + ("..." if len(text) > 300 else "")


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, quiet = "--debug" in argv, "--quiet" in argv
    try:
        return _run(argv)
    except OnnxSlimError as exc:
        if debug:
            raise
        report = getattr(exc, "report", None)
        if report is not None and not quiet:
            print(report.table(), flush=True)
        return _fail(f"error: {_one_line(exc)}", exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted (outputs are written atomically: none is partial)",
                     EXIT_INTERRUPTED)
    except ImportError as exc:
        if debug:
            raise
        return _fail(f"error: a dependency cannot be imported: {_one_line(exc)} "
                     "(reinstall onnxslim_cnn with its requirements)", EXIT_INTERNAL)
    except Exception as exc:  # last resort: never a traceback without --debug
        if debug:
            raise
        return _fail(f"internal error: {type(exc).__name__}: {_one_line(exc)} "
                     "(rerun with --debug)", EXIT_INTERNAL)
