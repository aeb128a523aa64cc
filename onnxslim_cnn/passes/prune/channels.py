"""prune-channels: remove whole output channels of Convs; a smaller dense graph.

Why: unstructured zeros save file bytes but no time; dropping channels shrinks every
kernel that touches them, so FLOPs and latency drop on any runtime.

Before:  x -> Conv1(W1[C, ...], b1) -> BN -> Relu -> Conv2(W2[O, C, ...], b2) -> y
After:   x -> Conv1(W1[K], b1[K]) -> BN[K] -> Relu -> Conv2(W2'[:, K], b2') -> y
with K the kept channels. Channels coupled through residual Add (both branches and
what reads the sum), BN and depthwise convs are pruned together as one space
(spaces.py); a Gemm after Flatten of [N, C, 1, 1] loses the columns of the removed
channels. A space concatenated along channels (Inception's branches, SqueezeNet's fire
expands, DenseNet's layers) is pruned on its own: what reads the Concat loses the
removed channels at the space's offset there.

Ranking: per space, the fraction ``channel_ratio`` of its C channels with the lowest
importance is removed (floor(ratio * C), at least one channel kept). Importance:
    l2 / l1:     sum over producers p of ||W_p[c]|| / mean_c ||W_p[c]||
    activation:  sum over consumers of sum_{o, i in c} W[o, i]^2 H[i, i]
                 (the consumer output energy carried by channel c on the data; the
                 consumers of a Concat holding the space read c at its offset)
Without recovery the result equals ``mask``'s model (the channels zeroed, see
spaces.py) up to float summation order. With ``recovery`` every consumer is re-fitted
by least squares on the original model's calibration inputs (gram.py), with the
channel's columns removed:
    [W2', b2'] = argmin ||X_K W2'^T + b2' - (X W2^T + b2)||^2   (+ small ridge)
so the bias absorbs the mean the removed channels carried. ``distill_steps`` > 0 then
tunes the weights and biases of every producer and consumer of the pruned spaces
together towards the original model's outputs on the calibration data (recover/: the
per-consumer re-fits leave the error the layers build together); the loss matches the
logits and the outputs of the consumers that kept their shape.

Declines: per space, the reason from ``spaces.check`` (a Concat along another axis or
added to a Conv's output, grouped conv, graph output, shared weight, Flatten over
H*W > 1 ...) or "fewer channels than 1/ratio".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ...errors import UsageError
from ...recover import layers as tuning  # a module: recover.layers imports passes.base
from ..base import Pass, PassContext, PassResult, const_value, register, taken_names, unique_name
from ..qdq.bias_correct import subset
from . import gram, spaces


@dataclass(frozen=True)
class PruneChannelsOptions:
    """Options of prune-channels (see the module docstring)."""

    channel_ratio: float = 0.25
    channel_score: str = "activation"
    recovery: bool = True
    sequential: bool = True
    refit_samples: int = 64
    distill_steps: int = 0


@register
class PruneChannels(Pass):
    name = "prune-channels"
    summary = "structured Conv channel pruning with least-squares re-fit (lossy)"
    lossless = False
    after = ("fold-bn",)
    Options = PruneChannelsOptions

    def check_options(self) -> None:
        if not 0 < self.options.channel_ratio < 1:
            raise UsageError(f"--channel-ratio must be in (0, 1), got "
                             f"{self.options.channel_ratio}")
        if self.options.distill_steps < 0:
            raise UsageError(f"--distill-steps must be 0 or more, got "
                             f"{self.options.distill_steps}")
        if self.options.channel_score not in ("l2", "l1", "activation"):
            raise UsageError(f"unknown channel score '{self.options.channel_score}'")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        chosen = self._choose(graph, result)
        if not chosen:
            return result
        reference = gs.export_onnx(graph, do_type_check=False)
        grams = self._grams(reference, chosen, ctx)
        removed = {space.name: self._removed(space, grams) for space in chosen}
        kept = _kept(chosen, removed)
        for space in chosen:
            result.layers.append({"layer": space.name, "channels": int(space.channels()),
                                  "removed": [int(c) for c in removed[space.name]]})
        _mask_spaces(kept)  # the exact reference of the slicing below
        if self.options.recovery and grams:
            refitted = self._refit(graph, kept, reference, grams, ctx)
            result.stats["consumers_refitted"] = refitted
        edits = _Edits()
        for space, keep in kept:
            _slice(space, np.flatnonzero(keep), edits)
        result.stats.update(spaces_pruned=len(chosen), params_removed=edits.install(graph),
                            channels_removed=sum(len(r["removed"]) for r in result.layers))
        result.changed = True
        if self.options.distill_steps and self.options.recovery and ctx.calib:
            self._distill(graph, kept, reference, ctx, result)
        return result

    def _distill(self, graph, kept, reference, ctx: PassContext, result: PassResult) -> None:
        layers = {id(n): n for space, _ in kept for n in space.producers +
                  [_layer(c) for c in space.consumers]}
        resized = {id(p) for space, _ in kept for p in space.producers}
        features = [n.outputs[0].name for i, n in layers.items() if i not in resized]
        nodes = [n for n in graph.nodes if id(n) in layers]  # graph order
        tuning.tune_nodes(reference, graph, nodes, False, ctx, self.options.distill_steps,
                          result, taken_names(graph), features=features)

    def _refit(self, graph, kept, reference, grams, ctx: PassContext) -> int:
        """Re-fit every consumer, in graph order, on what reaches it (module docstring)."""
        order = {id(node): i for i, node in enumerate(graph.nodes)}
        sites = sorted(((_layer(c), keep) for space, keep in kept for c in space.consumers),
                       key=lambda site: order[id(site[0])])
        taken, batches, done = taken_names(graph), subset(ctx.calib, self.options.refit_samples), 0
        for node, keep_channels in sites:
            layer = gram.layer_of(node)
            if isinstance(layer, str) or layer.name not in grams:
                continue
            w = gram.augmented(layer)
            cols = np.repeat(keep_channels, (w.shape[2] - 1) // keep_channels.size)
            keep = np.broadcast_to(cols, (1, w.shape[1], cols.size))
            h, cross = grams[layer.name], None
            if self.options.sequential:
                working = gs.export_onnx(graph, do_type_check=False)
                h, cross = gram.cross_grams(reference, working, layer, batches)
            _set_layer(layer, gram.refit(h, w, keep, cross=cross), taken)
            done += 1
            ctx.progress(f"prune-channels: re-fitted {layer.name}")
        return done

    def _choose(self, graph: gs.Graph, result: PassResult) -> list[spaces.Space]:
        outputs = {t.name for t in graph.outputs}
        chosen = []
        for space in spaces.find_spaces(graph):
            reason = spaces.check(space, outputs)
            if reason is None and int(self.options.channel_ratio * space.channels()) == 0:
                reason = "fewer channels than 1/ratio"
            if reason:
                result.declined[reason] += 1
            else:
                chosen.append(space)
        return chosen

    def _grams(self, model, chosen, ctx: PassContext) -> dict[str, np.ndarray]:
        wanted = self.options.recovery or self.options.channel_score == "activation"
        if not ctx.calib or not wanted:
            return {}
        layers = [gram.layer_of(_layer(c)) for s in _touched(chosen) for c in s.consumers]
        # a consumer too wide for its Gram matrix (gram.MAX_GRAM_BYTES) keeps its weights
        layers = [v for v in layers if not isinstance(v, str) and gram.fits(v)]
        if not layers:  # no consumer with a weight to score or re-fit by
            return {}
        return gram.collect_grams(model, layers, subset(ctx.calib, self.options.refit_samples),
                                  ctx.progress)

    def _removed(self, space: spaces.Space, grams) -> np.ndarray:
        score = importance(space, self.options.channel_score, grams)
        count = int(self.options.channel_ratio * score.size)
        return np.sort(np.argsort(score, kind="stable")[:count])


def importance(space: spaces.Space, how: str, grams: dict) -> np.ndarray:
    """Per-channel importance of ``space`` (module docstring)."""
    size = space.channels()
    readers = [(gram.layer_of(_layer(c)), whole.channels(), offset)
               for whole, offset in [(space, 0), *space.views] for c in whole.consumers]
    if how == "activation" and readers and all(
            not isinstance(v, str) and v.name in grams for v, _, _ in readers):
        return sum(_consumer_energy(v, count, grams[v.name])[offset: offset + size]
                   for v, count, offset in readers)
    order = 1 if how == "l1" else 2
    total = np.zeros(space.channels())
    for p in space.producers:
        w = const_value(p.inputs[1]).reshape(space.channels(), -1).astype(np.float64)
        norm = np.linalg.norm(w, ord=order, axis=1)
        total += norm / max(float(norm.mean()), 1e-30)
    return total


def _consumer_energy(layer: gram.Layer, channels: int, h: np.ndarray) -> np.ndarray:
    m = layer.matrix()[0].astype(np.float64)  # [O, K], K = channels * kernel area
    per_column = np.sum(m * m, axis=0) * np.diag(h[0])[:m.shape[1]]
    return per_column.reshape(channels, -1).sum(axis=1)


def _touched(chosen: list[spaces.Space]) -> list[spaces.Space]:
    """The chosen spaces and the Concat spaces holding them, each once."""
    found = {id(s): s for s in chosen}
    found.update((id(w), w) for s in chosen for w, _ in s.views)
    return list(found.values())


def _kept(chosen: list[spaces.Space], removed) -> list[tuple[spaces.Space, np.ndarray]]:
    """(space, kept-channel mask) for every space the removal touches: each chosen space
    (``removed`` by name) and each Concat space holding one (at its offset there)."""
    masks = {id(s): (s, np.ones(s.channels(), bool)) for s in _touched(chosen)}
    for space in chosen:
        drop = np.asarray(removed[space.name], np.int64)
        masks[id(space)][1][drop] = False
        for whole, offset in space.views:
            masks[id(whole)][1][offset + drop] = False
    return list(masks.values())


def _layer(node: gs.Node) -> gs.Node:
    """The Conv/Gemm whose weight a consumer role refers to (Flatten -> its Gemm)."""
    return node.outputs[0].outputs[0] if node.op in spaces.FLATTENS else node


def _set_layer(layer: gram.Layer, new: np.ndarray, taken: set[str]) -> None:
    """Install re-fitted rows w~' [1, O, K+1] as the layer's weight and bias (in their
    own dtypes)."""
    node = layer.node
    weight, bias = layer.new_values(new)
    old = node.inputs[2].name if layer.bias is not None else f"{node.outputs[0].name}_b"
    node.inputs = [node.inputs[0],
                   gs.Constant(unique_name(taken, f"{node.inputs[1].name}_refit"), weight),
                   gs.Constant(unique_name(taken, f"{old}_refit"), bias)]


def _slice(space: spaces.Space, kept: np.ndarray, edits: _Edits) -> None:
    for p in space.producers:
        for index in (1, 2):
            edits.take(p, index, 0, kept)
    for node in space.slices:
        if node.op in spaces.CONSTANT_OPS:
            edits.take(node, *spaces.channel_constant(node), kept=kept)
            continue
        for index in (1, 2, 3, 4) if node.op == "BatchNormalization" else (1, 2):
            edits.take(node, index, 0, kept)
        if node.op == "Conv":
            edits.attrs[id(node)] = {"group": int(kept.size)}
    for consumer in space.consumers:
        layer = _layer(consumer)
        axis = 1 if layer.op == "Conv" or layer.attrs.get("transB", 0) else 0
        edits.take(layer, 1, axis, kept)
        if consumer.op == "Reshape":  # its target [N, C] (C may be written out)
            target = const_value(consumer.inputs[1]).copy()
            target[1] = kept.size
            edits.set(consumer, 1, target)


class _Edits:
    """New values of node inputs, composed (a Conv can be producer and consumer)."""

    def __init__(self):
        self.values: dict[int, tuple[gs.Node, dict[int, np.ndarray]]] = {}
        self.attrs: dict[int, dict] = {}

    def get(self, node: gs.Node, index: int) -> np.ndarray | None:
        entry = self.values.get(id(node))
        if entry and index in entry[1]:
            return entry[1][index]
        if len(node.inputs) > index and node.inputs[index].name:
            return const_value(node.inputs[index])
        return None

    def set(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        self.values.setdefault(id(node), (node, {}))[1][index] = value

    def take(self, node: gs.Node, index: int, axis: int, kept: np.ndarray) -> None:
        value = self.get(node, index)
        if value is not None:
            self.set(node, index, np.take(value, kept, axis=axis))

    def install(self, graph: gs.Graph) -> int:
        """New constants in place of the edited inputs; returns the weights removed."""
        taken, removed = taken_names(graph), 0
        for node, values in self.values.values():
            for index, value in sorted(values.items()):
                old = node.inputs[index] if len(node.inputs) > index else None
                base = old.name if old is not None and old.name else f"{node.name}_bias"
                removed += (old.values.size if old is not None and old.name else 0) - value.size
                constant = gs.Constant(unique_name(taken, f"{base}_pruned"), value)
                if old is None:
                    node.inputs.append(constant)
                else:
                    node.inputs[index] = constant
            node.attrs.update(self.attrs.get(id(node), {}))  # depthwise: new group
        return int(removed)


def mask(graph: gs.Graph, removed: dict[str, list[int]]) -> int:
    """Zero the ``removed`` channels of the named spaces in place (module docstring of
    spaces.py): the model prune-channels without recovery must reproduce. Returns the
    number of spaces masked."""
    chosen = [s for s in spaces.find_spaces(graph) if s.name in removed]
    _mask_spaces(_kept(chosen, removed))
    return len(chosen)


def _mask_spaces(kept: list[tuple[spaces.Space, np.ndarray]]) -> None:
    for space, keep in kept:
        drop = np.flatnonzero(~keep)
        for node in space.producers + space.slices:
            if node.op in spaces.CONSTANT_OPS:  # Mul keeps 0 at 0; a shift is zeroed
                index, axis = spaces.channel_constant(node)
                if node.op != "Mul":
                    value = const_value(node.inputs[index]).copy()
                    np.moveaxis(value, axis, 0)[drop] = 0
                    node.inputs[index] = gs.Constant(f"{node.inputs[index].name}_masked", value)
                continue
            indices = (2, 3) if node.op == "BatchNormalization" else (1, 2)
            for index in indices:
                if len(node.inputs) > index and node.inputs[index].name:
                    value = const_value(node.inputs[index]).copy()
                    value[drop] = 0
                    node.inputs[index] = gs.Constant(f"{node.inputs[index].name}_masked", value)
