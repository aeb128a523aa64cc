"""Channel spaces: the tensors whose channel axis must be pruned together.

A space is a set of tensors joined (union-find) by ops that map channel c to channel
c: BatchNormalization, Relu/LeakyRelu/Clip, pools, Identity/Dropout, a depthwise Conv
(group = C, one input channel per group), Mul/Add/Sub of an activation and a constant
that is per channel ([C, 1, 1] or [1, C, 1, 1]: a Caffe2 export's BN scale and shift;
Mul/Div by a scalar too), and elementwise ops of two activations (residual
Add/Mul/Sub/Max/Min/Sum: both inputs and the output share channels). Every node
touching a space has a role:
    producer  Conv (group 1) writing the space: rows W[c], b[c]
    slice     BN parameters [c]; depthwise W[c], b[c] and its group; a per-channel
              constant [c] of Mul/Add/Sub
    consumer  Conv (group 1) reading it: W[:, c]; Gemm after Flatten (or Reshape with a
              constant target) of [N, C, 1, 1] into [N, C]:
              B[:, c] (transB) or B[c, :]
A Concat along the channel axis of 4-D activations writes a space of its own (its
``writer``, no producer) in which each input's space is a *view*: its channels at the
input's offset, [o, o + C). Concat outputs nest (DenseNet concatenates a Concat's output
again): ``views`` lists every Concat space holding a space's channels, with the offset
there. Removing channels J of a space also removes channels o + J of each of its views:
their slices and consumers lose those entries, the Concat itself needs no change.

Removing channel set J from a space is exact when those channels are zero throughout
the space and its views: zero producer rows and biases, zero BN shift (beta = mean = 0),
zero depthwise rows, zero Add/Sub constants; every joining op keeps 0 at 0 (Relu, Clip
with min <= 0 <= max, pools, 0 + 0, 0 * x, Concat). ``mask`` builds exactly that model,
the reference of ``prune-channels`` without recovery.

Declines (the whole space) when, in it or in one of its views: a tensor is a graph
input/output; a grouped (not depthwise) conv, Flatten over C x H x W with H*W > 1, a
Concat along another axis or with an input of unknown channel count, or any other op
reads or writes it; a Concat's space is also written by a Conv or a second Concat
(e.g. Add of a Concat and a Conv); there is no producer; a weight is shared; channel
counts disagree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..base import const_value, from_constants, not_constant

PASSTHROUGH = {"Relu", "LeakyRelu", "Identity", "Dropout", "MaxPool", "AveragePool",
               "GlobalAveragePool", "GlobalMaxPool"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Max", "Min", "Sum"}
CONSTANT_OPS = {"Mul", "Add", "Sub"}  # slices by a per-channel constant operand
FLATTENS = {"Flatten", "Reshape"}  # of [N, C, 1, 1] into [N, C], read by a Gemm


@dataclass
class Space:
    """One channel space and the nodes that index it."""

    tensors: list[str] = field(default_factory=list)
    producers: list[gs.Node] = field(default_factory=list)
    slices: list[gs.Node] = field(default_factory=list)
    consumers: list[gs.Node] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    writers: list[gs.Node] = field(default_factory=list)  # Concats writing the space
    size: int | None = None  # channels of a Concat's space
    parts: list[tuple[Space, int]] = field(default_factory=list)  # (Concat space, offset)
    views: list[tuple[Space, int]] = field(default_factory=list)  # parts, transitively

    @property
    def name(self) -> str:
        return ",".join(p.name or p.outputs[0].name for p in self.producers) or self.tensors[0]

    def channels(self) -> int | None:
        if not self.producers:
            return self.size
        counts = {const_value(p.inputs[1]).shape[0] for p in self.producers}
        return counts.pop() if len(counts) == 1 else None


class _Union:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def join(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def find_spaces(graph: gs.Graph) -> list[Space]:
    """Every channel space that has a producer or a block, in graph order."""
    union, roles = _Union(), []
    for node in graph.nodes:
        roles.extend(_roles(node, union))
    spaces: dict[str, Space] = defaultdict(Space)
    concats = []
    for tensor, role, node in roles:
        space = spaces[union.find(tensor)]
        if role in ("producers", "slices", "consumers", "writers"):
            getattr(space, role).append(node)
            if role == "writers":
                concats.append(node)
        else:
            space.blocks.append(role)
    for tensor in union.parent:
        spaces[union.find(tensor)].tensors.append(tensor)
    for t in list(graph.inputs) + list(graph.outputs):
        if t.name in union.parent:
            spaces[union.find(t.name)].blocks.append("a tensor is a graph input or output")
    for node in concats:
        _link_parts(node, spaces, union)
    for space in spaces.values():
        if space.producers:
            space.views = _views(space)
    return [s for s in spaces.values() if s.producers]


def _link_parts(node: gs.Node, spaces: dict[str, Space], union: _Union) -> None:
    """Each input's space of a channel Concat is a part of the output's, at its offset."""
    whole, offset = spaces[union.find(node.outputs[0].name)], 0
    for t in node.inputs:
        part = spaces[union.find(t.name)]
        count = t.shape[1] if isinstance(t.shape[1], int) else part.channels()
        if count is None:
            whole.blocks.append("a Concat input has an unknown channel count")
            return
        part.parts.append((whole, offset))
        offset += int(count)
    whole.size = offset  # a second writer makes ``check`` decline the space anyway


def _views(space: Space) -> list[tuple[Space, int]]:
    """Every Concat space holding ``space``'s channels, with their offset there (a
    space that would hold itself, Concat and Add joined in a loop, gets a block)."""
    found, stack = [], [(part, offset, (id(space),)) for part, offset in space.parts]
    while stack:
        whole, offset, path = stack.pop()
        if id(whole) in path:
            space.blocks.append("channels coupled through Concat")
            return []
        found.append((whole, offset))
        stack.extend((up, offset + o, (*path, id(whole))) for up, o in whole.parts)
    return found


def _roles(node: gs.Node, union: _Union) -> list[tuple[str, str, gs.Node]]:
    """(tensor, role or decline reason, node) for the activations ``node`` touches."""
    acts = [t for t in node.inputs if isinstance(t, gs.Variable)]
    out = node.outputs[0].name if node.outputs else ""
    if node.op == "Conv":
        return _conv_roles(node, acts, out, union)
    if node.op == "BatchNormalization" and _constant_params(node) and \
            not any(t.outputs for t in node.outputs[1:]):
        union.join(acts[0].name, out)
        return [(out, "slices", node)]
    keeps_zero = node.op in PASSTHROUGH or (node.op == "Clip" and _clip_keeps_zero(node))
    if keeps_zero and len(acts) == 1 and not any(t.outputs for t in node.outputs[1:]):
        union.join(acts[0].name, out)
        return []
    affine = _channel_constant(node)
    if affine is not None:
        union.join(acts[0].name, out)
        return [(out, "slices", node)] if affine else []
    if node.op in ELEMENTWISE and len(acts) == len(node.inputs) and _same_rank(node):
        for t in acts:
            union.join(t.name, out)
        return []
    if node.op in FLATTENS and acts:
        return [(acts[0].name, _flatten_role(node), node)]
    if node.op == "Concat" and _channel_concat(node):
        return [(out, "writers", node)]
    reason = "channels coupled through Concat" if node.op == "Concat" else \
        f"{node.op} reads or writes the channels"
    folds = [t for t in acts if t.inputs and from_constants(t.inputs[0])]
    if folds:  # e.g. a Caffe2 BN's Mul by Unsqueeze(scale)
        reason = f"{node.op}: its {not_constant(folds[0], 'operand')}"
        acts = [t for t in acts if t not in folds]
    return [(t.name, reason, node) for t in acts + list(node.outputs)]


def _conv_roles(node, acts, out, union):
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    group = int(node.attrs.get("group", 1))
    if w is None or w.ndim != 4 or len(acts) != 1:
        return [(t.name, "Conv weight is not constant", node) for t in acts + [node.outputs[0]]]
    if group == 1:
        return [(acts[0].name, "consumers", node), (out, "producers", node)]
    if w.shape[1] == 1 and group == w.shape[0]:
        union.join(acts[0].name, out)
        return [(out, "slices", node)]
    return [(t, "grouped (not depthwise) Conv", node) for t in (acts[0].name, out)]


def _flatten_role(node: gs.Node) -> str:
    shape = node.inputs[0].shape
    users = node.outputs[0].outputs
    if node.attrs.get("axis", 1) != 1 or shape is None or len(shape) != 4 or \
            not all(isinstance(d, int) and d == 1 for d in shape[2:]):
        return f"{node.op} over C x H x W with H*W > 1 (or unknown)"
    if node.op == "Reshape" and not _reshapes_to_rows(node):
        return "Reshape to other than [N, C] (or a shape computed at run time)"
    if len(users) != 1 or users[0].op != "Gemm" or const_value(users[0].inputs[1]) is None \
            or users[0].attrs.get("transA", 0):
        return "Flatten output is not read by one Gemm with a constant weight"
    return "consumers"


def _reshapes_to_rows(node: gs.Node) -> bool:
    """A Reshape of [N, C, ...] to [N, C] by a constant target shape (two entries)."""
    target = const_value(node.inputs[1]) if len(node.inputs) == 2 else None
    out = node.outputs[0].shape
    return target is not None and target.shape == (2,) and out is not None and \
        len(out) == 2 and out[1] == node.inputs[0].shape[1]


def channel_constant(node: gs.Node) -> tuple[int, int]:
    """(input index, channel axis) of the per-channel constant of a Mul/Add/Sub slice."""
    index = next(i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant))
    value = const_value(node.inputs[index])
    return index, value.ndim - 3


def _channel_constant(node: gs.Node) -> bool | None:
    """For Mul/Add/Sub (Div) of a 4-D activation and a constant: True when the constant
    is per channel (a slice), False when it is a scalar that keeps 0 at 0 (Mul, Div),
    None otherwise (not such an op: the caller's other rules apply)."""
    if node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2 or \
            len(node.outputs) != 1:
        return None
    acts = [i for i, t in enumerate(node.inputs) if isinstance(t, gs.Variable)]
    value = const_value(node.inputs[1 - acts[0]]) if len(acts) == 1 else None
    shape = node.inputs[acts[0]].shape if acts else None
    if value is None or shape is None or len(shape) != 4 or value.ndim > 4:
        return None
    if value.size == 1:
        return False if node.op == "Mul" or (node.op == "Div" and acts == [0]) else None
    full = (1,) * (4 - value.ndim) + value.shape
    if node.op == "Div" or (node.op == "Sub" and acts != [0]) or value.ndim < 3 or \
            full[0] != 1 or full[2:] != (1, 1) or full[1] != shape[1]:
        return None
    return True


def _channel_concat(node: gs.Node) -> bool:
    """A Concat of 4-D activations along their channel axis."""
    return len(node.outputs) == 1 and all(
        isinstance(t, gs.Variable) and t.shape is not None and len(t.shape) == 4
        for t in node.inputs) and node.attrs.get("axis") in (1, -3)


def _constant_params(node: gs.Node) -> bool:
    return all(const_value(t) is not None for t in node.inputs[1:5])


def _clip_keeps_zero(node: gs.Node) -> bool:
    bounds = [node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)]
    for i, t in enumerate(node.inputs[1:3]):
        if t.name:
            value = const_value(t)
            if value is None:
                return False
            bounds[i] = float(value)
    return bounds[0] <= 0 <= bounds[1]


def _same_rank(node: gs.Node) -> bool:
    ranks = {len(t.shape) for t in node.inputs if t.shape is not None}
    return ranks <= {4}


def check(space: Space, outputs: set[str]) -> str | None:
    """Why ``space`` cannot be pruned, or None."""
    if space.blocks:
        return sorted(space.blocks)[0]
    if space.writers:
        return "channels coupled through Concat"  # written by a Conv and a Concat
    if space.channels() is None:
        return "producers disagree on the channel count"
    for whole, _ in space.views:
        if whole.blocks:
            return sorted(whole.blocks)[0]
        if whole.producers or len(whole.writers) != 1:
            return "channels coupled through Concat"
    for node in [n for s in [space] + [w for w, _ in space.views]
                 for n in s.producers + s.slices + s.consumers]:
        layer = node if node.op not in FLATTENS else node.outputs[0].outputs[0]
        # a Mul/Add/Sub slice's constant may be its first operand (Mul(scale, x))
        weight = layer.inputs[channel_constant(layer)[0] if layer.op in CONSTANT_OPS else 1]
        if len(weight.outputs) != 1 or weight.name in outputs:
            return "a weight is shared with another node"
    return None
