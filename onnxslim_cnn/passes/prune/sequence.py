"""Sequential pruning in waves: each layer sees the inputs of the already pruned model.

Why: pruning layer l changes the input of every layer after it. Fitting a later layer on
the *original* inputs ignores that drift; fitting it on the pruned model's inputs X~p
against the original outputs X~o w~ also repairs part of it:
    min ||X~p w~' - X~o w~||^2 = ||X~p (w~' - w*)||^2 + const,
    w* = (Hp + lambda I)^-1 (C w~ + lambda w~),   Hp = X~p^T X~p,  C = X~p^T X~o
so the layer is pruned from the dense re-fit w* with Hp as its Gram matrix (the same
algebra as gram.refit with every weight kept).

Running the model once per layer would cost one forward per layer; layers that no
other selected layer feeds (directly or through any path) are independent, so they form
one wave and share a forward:
    wave(l) = max over selected layers u upstream of l of wave(u) + 1   (0 if none)
e.g. SqueezeNet's expand1x1/expand3x3 pair, a ResNet block's first conv and its
projection shortcut. Two forwards (original and working model) per wave.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ... import validate
from . import gram


def waves(graph: gs.Graph, layers: list[gram.Layer]) -> list[list[gram.Layer]]:
    """``layers`` grouped by wave (graph order within a wave); nodes are in topo order."""
    selected = {id(layer.node): layer for layer in layers}
    depth: dict[str, int] = {}  # tensor name -> selected layers on its longest path
    level: dict[int, int] = {}
    for node in graph.nodes:
        here = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        if id(node) in selected:
            level[id(node)] = here
            here += 1
        for t in node.outputs:
            depth[t.name] = here
    out: list[list[gram.Layer]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for layer in layers:
        out[level[id(layer.node)]].append(layer)
    return [wave for wave in out if wave]


def wave_grams(reference, working, layers: list[gram.Layer], batches: list[dict]
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(Hp, C) of every layer of a wave (see gram.cross_grams), by layer name."""
    names = sorted({layer.input_name for layer in layers})
    ref = validate.Runner(validate.with_outputs(reference, names, only=True), optimization="basic")
    work = validate.Runner(validate.with_outputs(working, names, only=True), optimization="basic")
    hp: dict[str, np.ndarray | None] = {layer.name: None for layer in layers}
    cross = dict(hp)
    cap = gram.row_cap(batches)
    try:
        for batch in batches:
            xo, xp = ref.run_batch(batch), work.run_batch(batch)
            for layer in layers:
                a = xp[layer.input_name].astype(np.float32)
                b = xo[layer.input_name].astype(np.float32)
                hp[layer.name] = gram.gram_add(hp[layer.name], layer, a, cap=cap)
                cross[layer.name] = gram.gram_add(cross[layer.name], layer, a, b, cap=cap)
    finally:
        ref.close()
        work.close()
    slot = {layer.name: layer.has_bias_slot for layer in layers}
    return {name: (gram.shrunk(hp[name]), gram.shrunk(cross[name])) if slot[name] else
            (hp[name], cross[name]) for name in hp}


def dense_target(hp: np.ndarray, cross: np.ndarray, w: np.ndarray) -> np.ndarray:
    """w*: the dense rows that best reproduce the original outputs from the pruned
    inputs (ridge as in gram.refit)."""
    return gram.refit(hp, w, np.ones(w.shape[:2] + (w.shape[2],), bool), cross=cross)
