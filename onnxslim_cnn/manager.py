"""The pass manager: run an explicit pipeline, validate every change, roll back failures.

For each pass: (upgrade the opset if the pass needs it) -> import into
onnx-graphsurgeon -> ``pass.run`` -> cleanup + toposort -> export -> ``onnx.checker`` ->
compare the candidate's onnxruntime outputs with the **original** model's on the
validation samples. A lossless pass must match within the lossless tolerance, a lossy
one must stay within the accuracy budget; otherwise the candidate is discarded and the
previous model (an untouched ModelProto, never mutated by a pass) stays current, unless
the pass can retreat (``back_off``: auto-compress makes its worst layer one setting
safer) and a retreat passes validation. The run goes on with the next pass. Comparing
against the original, not the previous step, keeps error from piling up unseen.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from . import __version__, auto, model_io, passes, validate  # noqa: F401 (auto registers)
from .calibration import Dataset, load_dataset
from .config import Config
from .errors import (
    InvalidModelError,
    OnnxSlimError,
    OutputError,
    PassError,
    PreconditionError,
    UnsupportedModelError,
    UsageError,
    ValidationError,
)
from .passes.base import Pass, PassContext, PassResult
from .presets import DEFAULT_PRESET, PRESET_OPTIONS, PRESETS  # noqa: F401 (re-exported)
from .report import PassRecord, Report

MAX_BACK_OFF = 12  # validation failures a retreating pass may answer with a safer step


def build_pipeline(config: Config) -> list[Pass]:
    """Instantiate the configured passes, checking names and ordering constraints.

    The options are the preset's (``config.preset``, or the default preset when no
    passes are given), overridden by ``config.options``, plus ``target_size``.

    Raises:
        UsageError: unknown pass or preset name, a pass listed twice, a pass placed
            before one it must follow, a target size without auto-compress, an
            invalid pass option (``Pass.check_options``), or an option that no pass
            of the pipeline reads (it would be silently ignored).
    """
    preset = config.preset or (DEFAULT_PRESET if config.passes is None else None)
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}' (known: {', '.join(sorted(PRESETS))})")
    names = PRESETS[preset] if config.passes is None else tuple(config.passes)
    if len(set(names)) != len(names):
        raise UsageError(f"a pass is listed twice in {', '.join(names)}")
    if config.target_size is not None and "auto-compress" not in names:
        raise UsageError("a target size needs the auto-compress pass (--preset max or "
                         "balanced)")
    classes = [passes.get_pass(name) for name in names]
    for index, cls in enumerate(classes):
        late = [n for n in cls.after if n in names[index + 1:]]
        if late:
            raise UsageError(f"pass '{cls.name}' must run after {', '.join(late)}")
    options = PRESET_OPTIONS.get(preset, {}) | config.options
    if config.target_size is not None:
        options = options | {"target_size": config.target_size}
    pipeline = [cls(options) for cls in classes]
    for p in pipeline:
        p.check_options()
    unread = sorted(set(config.options) - set().union(*(p.reads() for p in pipeline)))
    if unread:
        raise UsageError(f"no pass of the pipeline ({', '.join(names)}) reads "
                         f"{', '.join(_flag(k) for k in unread)}")
    return pipeline


# command-line flags whose option name differs from the flag
_FLAGS = {"data_aware": "--no-refine", "min_sqnr_db": "--min-layer-sqnr",
          "recovery": "--prune-recovery", "sequential": "--prune-sequential"}


def _flag(option: str) -> str:
    """``avg_bits`` -> ``--avg-bits`` (the flag that sets it on the command line)."""
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """graphsurgeon graph of ``model`` with inferred shapes where onnx can infer them.

    The graph reads a private copy: graphsurgeon keeps initializers as references to
    their TensorProtos and renames those protos in place on export, which would edit
    ``model`` (the rollback point). The inferred shapes come from a light copy
    (``model_io.infer_value_info``), not from a second full copy of the weights.
    """
    own = onnx.ModelProto()
    own.CopyFrom(model)
    known = {v.name for v in own.graph.value_info}
    own.graph.value_info.extend(v for v in model_io.infer_value_info(own)
                                if v.name not in known)
    return gs.import_onnx(own)


def export_graph(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """ModelProto of ``graph`` carrying ``template``'s metadata; no value_info kept."""
    from . import storage  # storage imports passes.base; import late to avoid a cycle

    storage.protect_int4(graph)  # graphsurgeon cannot export unpacked int4 arrays
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]
    model.ir_version = max(template.ir_version, 4,
                           helper.find_min_ir_version_for(list(model.opset_import)))
    model.producer_name = "onnxslim_cnn"
    model.producer_version = __version__
    model.doc_string = template.doc_string
    model.model_version = template.model_version
    model.domain = template.domain
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return model


class Reference:
    """The original model's outputs on the validation samples."""

    def __init__(self, original: onnx.ModelProto, dataset: Dataset):
        self.dataset = dataset
        self.outputs = validate.run_model(original, dataset.val)

    def compare(self, candidate: onnx.ModelProto):
        outputs = validate.run_model(candidate, self.dataset.val)
        missing = [n for n in self.outputs if n not in outputs]
        if missing:
            raise InvalidModelError(f"candidate lost output(s) {missing}")
        return outputs, validate.compare(self.outputs, outputs, self.dataset.val_labels)


@dataclass
class _Outcome:
    model: onnx.ModelProto | None
    result: PassResult
    work: onnx.ModelProto | None = None  # the (opset-upgraded) model the pass ran on


class Manager:
    """Runs one pipeline over one model; see the module docstring."""

    def __init__(self, config: Config, progress: Callable[[str], None] | None = None,
                 debug: bool = False, owns_input: bool = False):
        self.config = config
        self.owns_input = owns_input  # run() may normalise the original in place
        self.progress = progress or (lambda message: None)
        self.debug = debug
        self.pipeline = build_pipeline(config)

    def run(self, original: onnx.ModelProto, dataset: Dataset,
            report: Report) -> onnx.ModelProto:
        """Compress ``original``; fills ``report``; returns the validated result.

        Raises:
            ValidationError: the final model fails validation and ``force`` is off.
            UnsupportedModelError: onnxruntime cannot run the original model.
        """
        self.reference = Reference(original, dataset) if self.config.validate else None
        model, report.normalized = model_io.normalize(original, in_place=self.owns_input)
        self.lossy = False
        self.metrics = None
        ctx = PassContext(calib=dataset.calib, budget=self.config.budget, seed=self.config.seed,
                          evaluate=lambda m: validate.run_model(m, dataset.calib),
                          progress=self.progress, calib_labels=dataset.calib_labels)
        done: list[str] = []
        for k, p in enumerate(self.pipeline):
            ctx.later = tuple(q.name for q in self.pipeline[k + 1:])
            record = self._run_pass(p, model, ctx, tuple(done))
            report.passes.append(record)
            if record.status == "applied":
                model = self._accepted
            report.explored += getattr(p, "explored", [])
            done.append(p.name)
            self.progress(f"[{p.name}] {record.status} in {record.seconds:.1f}s"
                          + (f": {record.reason}" if record.reason else ""))
        report.final, report.failure = self._final(model)
        return model

    def _run_pass(self, p: Pass, model: onnx.ModelProto, ctx: PassContext,
                  done: tuple[str, ...]) -> PassRecord:
        record = PassRecord(name=p.name, status="no-op", size_before=model_io.model_bytes(model))
        record.size_after = record.size_before
        start = time.perf_counter()
        try:
            outcome = self._apply(p, model, ctx)
            gc.collect()  # the pass's graph and its weight copies, before validation runs
        except (PreconditionError, UnsupportedModelError) as exc:
            record.status, record.reason = "skipped", str(exc)
        except Exception as exc:
            if self.debug:
                raise PassError(p.name, done, exc) from exc
            record.status, record.reason = "failed", str(PassError(p.name, done, exc))
        else:
            self._record(record, outcome)
            if outcome.model is not None:
                self._judge(p, outcome.model, record)
                if record.status == "rolled-back" and hasattr(p, "back_off"):
                    self._back_off(p, outcome.work, record)
        record.seconds = time.perf_counter() - start
        return record

    def _apply(self, p: Pass, model: onnx.ModelProto, ctx: PassContext) -> _Outcome:
        work = model_io.upgrade_opset(model, p.min_opset) if p.min_opset else model
        graph = import_graph(work)
        p.check(graph, ctx)
        result = p.run(graph, ctx)
        if not result.changed:
            # An opset upgrade alone is not what the pass is for: keep the model as is.
            return _Outcome(None, result)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return _Outcome(export_graph(graph, work), result, work)

    def _back_off(self, p: Pass, work: onnx.ModelProto, record: PassRecord) -> None:
        """A pass that can retreat (auto-compress: its worst layer one setting safer)
        does so until its candidate passes validation, at most ``MAX_BACK_OFF`` times."""
        first = record.reason
        for step in range(1, MAX_BACK_OFF + 1):
            graph = import_graph(work)
            result = p.back_off(graph)
            if result is None:
                break
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            self._record(record, _Outcome(None, result))
            record.reason = None
            self._judge(p, export_graph(graph, work), record)
            record.stats["validation_back_offs"] = step
            self.progress(f"[{p.name}] back-off {step}: {record.status}"
                          + (f" ({record.reason})" if record.reason else ""))
            if record.status == "applied":
                record.reason = f"backed off {step} layer step(s) after: {first}"
                return

    @staticmethod
    def _record(record: PassRecord, outcome: _Outcome) -> None:
        record.stats = dict(outcome.result.stats)
        record.declined = dict(outcome.result.declined)
        record.layers = list(outcome.result.layers)

    def _judge(self, p: Pass, candidate: onnx.ModelProto, record: PassRecord) -> None:
        record.size_after = model_io.model_bytes(candidate)
        reason, metrics = self._validate(candidate, lossless=p.lossless and not self.lossy)
        record.metrics = metrics.to_dict() if metrics else None
        if reason:
            record.status, record.reason = "rolled-back", reason
            record.size_after = record.size_before
            return
        record.status = "applied"
        self._accepted = candidate
        self.lossy = self.lossy or not p.lossless
        self.metrics = record.metrics

    def _validate(self, candidate: onnx.ModelProto, lossless: bool):
        """(reason or None, metrics) of ``candidate`` against the original."""
        try:
            model_io.check(candidate, what="result")
        except InvalidModelError as exc:
            return str(exc), None
        if self.reference is None:
            return None, None
        try:
            outputs, metrics = self.reference.compare(candidate)
        except OnnxSlimError as exc:
            return str(exc), None
        if lossless:
            return validate.check_lossless(self.reference.outputs, outputs,
                                           self.config.tolerance), metrics
        return validate.check_budget(metrics, self.config.budget), metrics

    def _final(self, model: onnx.ModelProto) -> tuple[dict | None, str | None]:
        """Metrics of the result and why it fails validation (None when it passes).

        Every applied pass was validated against the original, so the last accepted
        candidate's metrics stand for the result; only a run where no pass applied
        (the model is the normalised original) is measured here.
        """
        if self.metrics is not None:
            return self.metrics, None
        reason, metrics = self._validate(model, lossless=not self.lossy)
        return (metrics.to_dict() if metrics else None), reason


def compress(input_path: str | os.PathLike, output_path: str | os.PathLike,
             config: Config | None = None, progress: Callable[[str], None] | None = None,
             debug: bool = False) -> Report:
    """Compress the model at ``input_path`` and write it atomically to ``output_path``.

    Args:
        input_path: ONNX file (read only; external data is read from beside it).
        output_path: where to write; never the input file.
        config: pipeline, data, budgets (defaults: the lossless preset, random inputs).
        progress: receives one-line progress messages.
        debug: let a crashing pass raise instead of being rolled back.

    Returns:
        The report (also for runs whose result was not written with ``force``).

    Raises:
        OnnxSlimError subclasses: bad input (InvalidModelError, DataError, UsageError,
        OutputError, UnsupportedModelError) or ValidationError when the result is
        invalid and not forced.
    """
    config = config or Config()
    input_path, output_path = Path(input_path), Path(output_path)
    _check_paths(input_path, output_path)
    started = time.perf_counter()
    manager = Manager(config, progress, debug, owns_input=True)
    original = model_io.load(input_path)
    report = Report(input=str(input_path), output=str(output_path),
                    size_in=model_io.model_bytes(original), opset_in=model_io.opset(original))
    dataset = load_dataset(config.data, original, input_path)
    report.data, report.calib_samples, report.val_samples = (
        dataset.source, dataset.calib_count, dataset.val_count)
    result = manager.run(original, dataset, report)
    _check_target(config, result, report)
    if report.failure and not config.force:
        raise ValidationError(f"result fails validation, nothing written: {report.failure} "
                              "(--force writes it anyway)", report)
    report.opset_out = model_io.opset(result)
    written = model_io.save(result, output_path)
    report.size_out = sum(f.stat().st_size for f in written)
    report.written = True
    report.seconds = time.perf_counter() - started
    return report


def _check_target(config: Config, result: onnx.ModelProto, report: Report) -> None:
    """Record a missed ``target_size`` as the run's failure (nothing is written)."""
    report.target_size = config.target_size
    size = model_io.model_bytes(result)
    if config.target_size is None or size <= config.target_size or report.failure:
        return
    report.failure = (f"target size {config.target_size} B not reached within the budget: "
                      f"the smallest result within it has {size} B")


def _check_paths(input_path: Path, output_path: Path) -> None:
    if input_path.exists() and output_path.exists() and \
            os.path.samefile(input_path, output_path):
        raise UsageError(f"{output_path}: output is the input file; the input is never "
                         "overwritten, choose another path")
    if output_path.is_dir():
        raise OutputError(f"{output_path}: is a folder; give the output file's path")
    folder = output_path.parent if str(output_path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{output_path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{output_path}: output folder {folder} is not writable")


def check_pair(original_path: str | os.PathLike, candidate_path: str | os.PathLike,
               config: Config | None = None) -> tuple[dict, str | None]:
    """Validate an existing compressed model against its original; writes nothing.

    Returns:
        (metrics as a dict, None when within ``config.budget`` else the reason).

    Raises:
        InvalidModelError / DataError / UnsupportedModelError on bad input.
    """
    config = config or Config()
    original, candidate = model_io.load(original_path), model_io.load(candidate_path)
    dataset = load_dataset(config.data, original, Path(original_path))
    outputs, metrics = Reference(original, dataset).compare(candidate)
    result = metrics.to_dict()
    result.update(samples=dataset.val_count, data=dataset.source)
    return result, validate.check_budget(metrics, config.budget)
