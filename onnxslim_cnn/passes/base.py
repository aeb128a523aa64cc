"""The pass contract: ``Pass.run(graph, ctx) -> PassResult``.

A pass mutates the onnx-graphsurgeon graph it is given and reports what it did. It
never calls cleanup/toposort/export (the manager does), never edits a weight array in
place (it creates a new constant), and names what it creates after the source name,
made unique by ``unique_name``. Declining a site is not an error: the reason is counted
in ``PassResult.declined`` so the report shows why a layer was left alone.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..config import Budget
from ..errors import UsageError
from ..graph_edit import (  # noqa: F401  (the passes import them from here)
    replace_output,
    replace_uses,
    taken_names,
    unique_name,
)


@dataclass
class PassResult:
    """What a pass did.

    Attributes:
        changed: the graph was modified.
        stats: counts and figures for the report (``{"bn_folded": 49}``).
        declined: reasons a site was left alone, counted (``{"weight is shared": 3}``).
        layers: per-layer records (``{"layer": name, ...}``) for the report.
    """

    changed: bool
    stats: dict[str, float] = field(default_factory=dict)
    declined: Counter = field(default_factory=Counter)
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may use besides the graph.

    Attributes:
        calib: calibration batches (input name -> array), real data when given.
        budget: the accuracy budget of lossy passes.
        seed: seed for anything random.
        evaluate: runs a ModelProto on the calibration batches, returning its outputs
            (data-aware passes use it to measure sensitivity).
        progress: reports progress of long steps (no-op when quiet).
        calib_labels: class labels of the calibration samples, when the data has them.
        later: names of the passes that run after this one (a size target then counts
            what compact-names will save).
        memo: when given, statistics a pass may reuse between runs that share this
            context (auto-compress runs cluster-weights once per candidate width on the
            same model and samples, and each run gathered the same input moments).
    """

    calib: list[dict[str, np.ndarray]] = field(default_factory=list)
    budget: Budget = field(default_factory=Budget)
    seed: int = 0
    evaluate: Callable[..., dict[str, np.ndarray]] | None = None
    progress: Callable[[str], None] = lambda message: None
    calib_labels: np.ndarray | None = None
    later: tuple[str, ...] = ()
    memo: dict[Any, Any] | None = None


@dataclass(frozen=True)
class NoOptions:
    """A pass without options."""


class Pass:
    """Base class of every pass; subclasses register with ``@register``.

    Class attributes:
        name: kebab-case key used by the CLI and the report.
        summary: one line for ``--list-passes``.
        lossless: the result must match the original within the lossless tolerance
            (otherwise within the accuracy budget).
        min_opset: the manager upgrades the model to at least this opset first.
        after: passes that, when both are in a pipeline, must run before this one.
        Options: dataclass of this pass's options, filled from the flat option dict.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    min_opset: ClassVar[int] = 0
    after: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: dict[str, Any] | None = None):
        known = {f.name for f in dataclasses.fields(self.Options)}
        self.options = self.Options(**{k: v for k, v in (options or {}).items() if k in known})

    def check_options(self) -> None:
        """Raise UsageError when the options are invalid (``build_pipeline`` calls it
        before any model is read: a bad value is the user's error, not the model's)."""

    def reads(self) -> set[str]:
        """Names of the flat options this pass reads (``build_pipeline`` refuses an
        option that no pass of the pipeline reads: it would be silently ignored)."""
        return {f.name for f in dataclasses.fields(self.Options)}

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Raise PreconditionError when the pass cannot apply to this model at all."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"pass name {cls.name!r} is empty or taken")
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``.

    Raises:
        UsageError: no such pass.
    """
    if name not in REGISTRY:
        raise UsageError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (None for variables)."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def not_constant(tensor: gs.Tensor, what: str = "weight") -> str:
    """Why ``tensor`` (read as a weight) is no constant, as a decline reason: a graph
    input, an earlier pass's decode subgraph, constants a fold-constants pass would fold
    (a Caffe2 export's Reshape of the classifier weight), or a run-time value."""
    from ..storage.core import DECODE_TAG  # storage builds on this module

    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return f"{what} is a graph input, not a constant"
    if DECODE_TAG in tensor.name:
        return f"{what} is already encoded (decoded by {producer.op})"
    if not from_constants(producer):
        return f"{what} is computed at run time by {producer.op}"
    if producer.op in LAYOUT_OPS:
        return f"{what} is computed from constants by {producer.op} (run fold-constants first)"
    # DequantizeLinear, Mul of a scale, Gather of a codebook: folding would store it
    # wider, which fold-constants declines
    return f"{what} is stored encoded (decoded from constants by {producer.op})"


# Ops that only move values: fold-constants folds them into a constant of the same size.
LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def from_constants(node: gs.Node, depth: int = 16) -> bool:
    """Whether every input of ``node`` comes from constants within ``depth`` nodes."""
    if depth == 0:
        return False
    for tensor in node.inputs:
        if isinstance(tensor, gs.Constant) or tensor.name == "":
            continue
        if not tensor.inputs or not from_constants(tensor.inputs[0], depth - 1):
            return False
    return True


def count(items: Iterable[Any]) -> int:
    return sum(1 for _ in items)


def detach(node: gs.Node) -> None:
    """Disconnect ``node`` from every tensor, inputs first.

    graphsurgeon unlinks a node from a tensor with ``list.remove``, which compares
    nodes by name, op, attributes, inputs and outputs: a half-disconnected unnamed node
    (inputs kept, outputs cleared) equals any other such node on the same input, and the
    wrong one would be unlinked. Clearing the inputs while the outputs still tell the
    node apart avoids that.
    """
    node.inputs.clear()
    node.outputs.clear()


def take_over_name(old: gs.Tensor | None, fallback: str, taken: set[str]) -> str:
    """Name for the folded replacement of ``old``: ``old``'s own name when only this layer
    reads it (the stale constant is renamed; cleanup drops it), else a fresh name. Names
    are repeated in the file, so not growing them keeps small models small."""
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        name = old.name
        old.name = unique_name(taken, f"{name}_prefold")
        return name
    return unique_name(taken, fallback)
