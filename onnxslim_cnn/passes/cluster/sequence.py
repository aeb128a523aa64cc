"""Sequential layer order for cluster-weights: each layer fitted on the inputs it will
see once every layer before it is clustered (the GPTQ / OBQ order across layers).

Clustering layer l on statistics of the original model ignores that its input x has
already changed to x' (the upstream layers were clustered). Going through the layers
in waves (sites that do not feed one another, ``waves``), each wave's input
patches are gathered from the original model (x) and from the partly clustered one
(x') at the same positions, and the layer is clustered towards the weights that best
reproduce its ORIGINAL output from the NEW input:

    W* = argmin_V E||W x - V x'||^2 + damp ||V - W||^2 = (W C^T + damp W)(S' + damp I)^-1,
    C = E[x' x^T],  S' = E[x' x'^T]       (both centred when the bias absorbs the mean)

so part of the upstream error is undone (the ridge pulls towards W, not 0, so directions
the data does not see keep their weights; with fewer than ``MIN_PER_INPUT`` patches per
input the fit is not trusted and W* = W); error-feedback assignment and least-squares
centroids (assign.py, refine.py) then use S' as the Hessian. The bias restores the
original mean output exactly: b' = b + W mu - W' mu' (mu, mu': mean patches of x, x').

Cost: one pass of both models over the first ``MAX_SAMPLES`` calibration samples per
wave (onnxruntime runs only the nodes up to the wave's inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ... import validate
from . import refine

# Calibration samples (images) per wave, and patches per input the target fit needs.
# Statistics of 32 images, and a fit trusted from 4 patches per input (P^2 moments from
# 4P patches), fitted the calibration images, not the layer: --avg-bits 4, cosine on
# unseen images (ResNet-8 1000, the others 300), 32 images / 4 -> 100 / 4 -> 100 / 16:
# ResNet-8 0.968 / 0.970 / 0.971 (3 bits: 0.954 / 0.962 / 0.964), SqueezeNet 0.952 /
# 0.961 / 0.958, EfficientNet-Lite0 0.954 / 0.959 / 0.969.
MAX_SAMPLES = 128
DAMP = 0.01
MIN_PER_INPUT = 16


@dataclass
class Shifted:
    """Statistics of one site in the partly clustered model."""

    moments: refine.Moments  # of x' (the new input)
    cross: np.ndarray  # [g, P, P] E[x' x^T]
    ref_mean: np.ndarray  # [g, P] mean patch of x (the original input)
    count: int = 0  # patches

    def target(self, w: np.ndarray, centred: bool) -> np.ndarray:
        """W* [O, P] (module docstring), per conv group."""
        if self.count < MIN_PER_INPUT * w.shape[1]:
            return w
        m = self.moments
        s = m.cov() if centred else m.gram
        c = self.cross - m.mean[:, :, None] * self.ref_mean[:, None, :] if centred \
            else self.cross
        groups = s.shape[0]
        wg = w.reshape(groups, -1, w.shape[1])  # [g, O/g, P]
        damp = DAMP * np.maximum(np.einsum("gii->g", s) / s.shape[1], 1e-12)
        h = s + damp[:, None, None] * np.eye(s.shape[1])[None]
        rhs = np.matmul(c, wg.transpose(0, 2, 1)) + damp[:, None, None] * wg.transpose(0, 2, 1)
        return np.linalg.solve(h, rhs).transpose(0, 2, 1).reshape(w.shape)

    def bias_shift(self, w: np.ndarray, wq: np.ndarray) -> np.ndarray:
        """[O] b' - b = W mu - W' mu' per output channel."""
        groups = self.ref_mean.shape[0]
        ref = np.einsum("gop,gp->go", w.reshape(groups, -1, w.shape[1]), self.ref_mean)
        new = np.einsum("gop,gp->go", wq.reshape(groups, -1, w.shape[1]),
                        self.moments.mean)
        return (ref - new).reshape(-1)


def collect(reference: onnx.ModelProto, working: onnx.ModelProto, wave: list,
            batches: list[dict], seed: int = 0) -> dict[str, Shifted]:
    """Shifted statistics of every site of ``wave`` (sites with .key, .node, .geom)."""
    names = sorted({s.node.inputs[0].name for s in wave})
    batches = first_samples(batches, MAX_SAMPLES)
    per_batch = max(1, -(-refine.SAMPLES // max(len(batches), 1)))
    acc = {s.key: _Sums() for s in wave}
    ref = validate.Runner(validate.with_outputs(reference, names, only=True), optimization="basic")
    work = validate.Runner(validate.with_outputs(working, names, only=True), optimization="basic")
    try:
        for i, batch in enumerate(batches):
            xo, xp = ref.run_batch(batch), work.run_batch(batch)
            for j, site in enumerate(wave):
                name = site.node.inputs[0].name
                # the same seed picks the same positions in both inputs
                po = refine._patches(xo[name], site.geom, per_batch,
                                     np.random.default_rng([seed, i, j]))
                pp = refine._patches(xp[name], site.geom, per_batch,
                                     np.random.default_rng([seed, i, j]))
                acc[site.key].add(po, pp)
    finally:
        ref.close()
        work.close()
    return {key: a.result() for key, a in acc.items()}


def waves(graph, found: list) -> list[list]:
    """``found`` sites grouped by how many sites lie on the longest path before them.

    No site of a wave feeds another of the same wave, so one run of the partly
    clustered model gives every input of a wave. ``graph.nodes`` is in topological order.
    """
    chosen = {id(s.node): s for s in found}
    before: dict[str, int] = {}  # tensor name -> sites on the longest path to it
    groups: dict[int, list] = {}
    for node in graph.nodes:
        depth = max((before.get(t.name, 0) for t in node.inputs), default=0)
        if id(node) in chosen:
            groups.setdefault(depth, []).append(chosen[id(node)])
            depth += 1
        for t in node.outputs:
            before[t.name] = depth
    return [groups[d] for d in sorted(groups)]


def first_samples(batches: list[dict], count: int) -> list[dict]:
    """The leading batches holding at least ``count`` samples (batch axis 0)."""
    out, seen = [], 0
    for batch in batches:
        if seen >= count:
            break
        out.append(batch)
        seen += min((np.shape(v)[0] if np.ndim(v) else 1) for v in batch.values())
    return out


class _Sums:
    """Running sums of x' x'^T, x' x^T, x' and x over patches [S, g, P]."""

    def __init__(self):
        self.gram = self.cross = self.sum_p = self.sum_o = None
        self.count = 0

    def add(self, po: np.ndarray, pp: np.ndarray) -> None:
        a = np.ascontiguousarray(pp.transpose(1, 2, 0))  # [g, P, S]
        b = np.ascontiguousarray(po.transpose(1, 2, 0))
        parts = (np.matmul(a, a.transpose(0, 2, 1)).astype(np.float64),
                 np.matmul(a, b.transpose(0, 2, 1)).astype(np.float64),
                 pp.sum(axis=0, dtype=np.float64), po.sum(axis=0, dtype=np.float64))
        if self.gram is None:
            self.gram, self.cross, self.sum_p, self.sum_o = parts
        else:
            self.gram, self.cross, self.sum_p, self.sum_o = (
                x + y for x, y in zip((self.gram, self.cross, self.sum_p, self.sum_o),
                                      parts, strict=True))
        self.count += pp.shape[0]

    def result(self) -> Shifted:
        n = max(self.count, 1)
        return Shifted(refine.Moments(self.gram / n, self.sum_p / n, self.count),
                       self.cross / n, self.sum_o / n, self.count)
