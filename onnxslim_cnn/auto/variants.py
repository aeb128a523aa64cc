"""Candidate settings: whole-model variants made by the registered passes.

Each candidate is a tag and the passes (with options) that make it, e.g. ``c4`` =
cluster-weights with 4-bit codebooks on every layer. A variant is made once per run on
the float model; the per-layer patches it offers (patches.py) are the candidate
settings of the allocation. Candidates only use passes that store each layer's weight
independently of the others, so patches of different variants combine freely.

Known tags: ``int8`` (qdq-int8 weights-only: per-channel int8, Cast+Mul decode),
``c1``..``c8`` (cluster-weights, that many index bits, data-aware centroids) and
``p<S>c<b>``, e.g. ``p50c4``: prune-weights at S % uniform sparsity (OBS mask and
re-fit), then a b-bit codebook of the nonzeros stored sparse (1-bit mask + b-bit indices
of the nonzeros: 1 + S/100 * b bits per weight); layers prune-weights leaves alone
(the stem and the classifier) get the plain b-bit codebook; ``f16``: the layer's float32
weight and bias stored as float16 (half-constants: 2x, ~66 dB).

What the other candidates leave in float32 in the layers they change (biases,
codebooks, per-channel scales) is stored as float16 too (half-constants on those
layers only), so a patch's bytes are what the file will hold: on EfficientNet-Lite0's
4-bit codebooks that float32 is 6 % of the file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from ..errors import PreconditionError, UsageError
from ..passes.base import PassContext, get_pass
from ..passes.half_constants import halve
from .patches import COMPUTE_OPS, layer_key


@dataclass(frozen=True)
class Candidate:
    """A setting every layer may take: ``steps`` = ((pass name, options), ...)."""

    tag: str
    steps: tuple[tuple[str, dict[str, Any]], ...]
    halve: bool = True  # then float32 leftovers of the changed layers as float16

    @property
    def summary(self) -> str:
        return " + ".join(f"{name}({_options_text(opts)})" for name, opts in self.steps)


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def candidate(tag: str) -> Candidate:
    """The candidate named ``tag``.

    Raises:
        UsageError: unknown tag.
    """
    if tag == "f16":
        return Candidate(tag, (("half-constants", {}),), halve=False)
    if tag == "int8":
        return Candidate(tag, (("qdq-int8", {"weights_only": "int8"}),))
    match = re.fullmatch(r"c([1-8])", tag)
    if match:
        # Each layer fitted on the float model's inputs: patches must not assume that
        # the layers before them took the same candidate (they may not).
        return Candidate(tag, (("cluster-weights", {"bits": int(match.group(1)),
                                                    "sequential_fit": False}),))
    match = re.fullmatch(r"p([1-9][0-9])c([1-8])", tag)
    if match:
        prune = {"sparsity": int(match.group(1)) / 100, "allocation": "uniform",
                 "sequential": False}
        return Candidate(tag, (("prune-weights", prune),
                               ("cluster-weights", {"bits": int(match.group(2)),
                                                    "sequential_fit": False})))
    raise UsageError(f"unknown auto candidate '{tag}' (known: f16, int8, c1..c8, "
                     "p10c1..p99c8)")


def make_variant(base: onnx.ModelProto, cand: Candidate, options: dict[str, Any],
                 ctx: PassContext) -> onnx.ModelProto | None:
    """``base`` with ``cand``'s passes applied to every layer they accept.

    ``options`` are the run's flat pass options (``--granularity`` ...); the
    candidate's own settings override them. Returns None when a pass declines the
    whole model (its precondition fails) or changes nothing.
    """
    graph = gs.import_onnx(base)
    changed = False
    for name, own in cand.steps:
        p = get_pass(name)(_merged(options, own))
        try:
            p.check(graph, ctx)
        except PreconditionError:
            return None
        changed = p.run(graph, ctx).changed or changed
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if changed and cand.halve:
        halve(graph, only=_changed_constants(base, graph),
              compact="compact-names" in ctx.later)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if not changed:
        return None
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]
    return model


def _changed_constants(base: onnx.ModelProto, graph: gs.Graph) -> set[str]:
    """Names of the constants the compute layers that differ from ``base`` read as
    weight or bias, directly or through decode subgraphs computed from constants."""
    before = {layer_key(n): list(n.input) for n in base.graph.node if n.op_type in COMPUTE_OPS}
    found: set[str] = set()
    for node in graph.nodes:
        key = node.name or node.outputs[0].name
        if node.op in COMPUTE_OPS and [t.name for t in node.inputs] != before.get(key):
            for tensor in node.inputs[1:]:
                found |= _constant_sources(tensor) or set()
    return found


def _constant_sources(tensor: gs.Tensor) -> set[str] | None:
    """The constants ``tensor`` is computed from, or None if it also reads a variable
    that no node computes (a graph input)."""
    found: set[str] = set()
    todo, seen = [tensor], set()
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, gs.Constant):
            found.add(t.name)
        elif not t.inputs:
            return None
        else:
            todo += t.inputs[0].inputs
    return found


# The per-layer choice is the allocation's job: the passes' own global budgets are not
# forwarded.
BUDGETS = ("bits", "avg_bits", "min_sqnr_db", "weights_only", "sparsity", "threshold")


def forwarded(tags: tuple[str, ...]) -> set[str]:
    """Names of the run's flat options the candidates ``tags`` pass on to their passes."""
    names = {name for tag in tags for name, _ in candidate(tag).steps}
    return {f.name for name in names for f in dataclasses.fields(get_pass(name).Options)} \
        - set(BUDGETS)


def _merged(options: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in BUDGETS} | own
