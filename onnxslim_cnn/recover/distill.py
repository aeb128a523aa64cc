"""Distillation of compressed layers back towards the original model (no labels).

Why: a per-layer re-fit (least squares, OBS) repairs each layer on its own inputs; the
error several compressed layers build together reaches the output uncorrected. Tuning
the kept weights and biases of all of them by gradient descent against the original
model's outputs on the calibration data (knowledge distillation) repairs it: ResNet-8
pruned to 50 % (network allocation, 100 calibration images), top-1 on 2000 unseen images
-3.0 -> -1.15 with 600 steps; SqueezeNet 1.1 -1.7 -> -0.7 (300 unseen images, 300 steps).
A step is a forward and a backward of 16 samples in numpy: ResNet-8 ~0.06 s,
SqueezeNet ~1.2 s, EfficientNet-Lite0 ~5 s on 2 cores.

Loss, per batch (teacher t = original model, student s = compressed one):
    L = |s(z) - t(z)|^2 / mean(t(z)^2)                        logits z
      + (1/F) sum_f |s(f) - t(f)|^2 / mean(t(f)^2)            outputs f of tuned layers
averaged over elements. Adam, step size ``LR`` times the tensor's RMS (layers of any
scale move alike), cosine decay to 0. Pruned weights keep their zeros (gradient and
value masked). The batches are the calibration batches with two label-free
augmentations (the teacher labels whatever it is shown): a random horizontal flip of
4-D inputs and mixup of pairs (x' = l x_a + (1 - l) x_b, l ~ Beta(0.4, 0.4)).
The teacher runs in onnxruntime; the student's gradients come from autodiff.py.

Held out: the last quarter of the calibration samples is never tuned on; the loss there
is measured before, at ten checkpoints and at the end, and the best checkpoint is
returned; the run stops after three checkpoints without a new best (early stopping).
When the first checkpoint is no better than the start, the step size was too large for
this model (EfficientNet-Lite0 pruned to 50 %: at 3e-3 the held-out loss never fell, at
3e-4 it did): the run starts again from the start with the step size cut BACKOFF times,
at most RETRIES times, each costing a tenth of the steps.
Tuning many weights on ~100 images can fit them and not others (measured before this:
EfficientNet-Lite0's codebooks at 4 bits on average, calibration loss 0.075 -> 0.053,
top-1 on 300 unseen images -1.3 -> -3.0), and a loss
measured on the tuning samples cannot see that.

Tied weights (``ties``): a weight computed from trainable parameters, e.g. a codebook
layer's W = codebook[idx] with the indices fixed (Deep Compression's centroid
fine-tuning). Its parameters are tuned with the chain rule, dL/dparam = reduce(dL/dW),
for a codebook the sum of dL/dW over the weights that share each entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import validate
from . import autodiff

LR = 3e-3
BETAS = (0.9, 0.999)
MIXUP = 0.4
BATCH = 16  # samples per step
HELD_OUT = 0.25  # of the calibration samples: judge the tuning, never tuned on
CHECKPOINTS = 10  # held-out loss measured this many times over the run (early stopping)
PATIENCE = 3  # checkpoints without a new best before the run stops
BACKOFF = 10  # the step size is cut this much when the first checkpoint is no better
RETRIES = 2  # at most this many times


@dataclass
class Tie:
    """A student initializer computed from trainable parameters (entries of
    ``distill``'s params, initially ``init``; ``masks`` as distill's): its value is
    ``expand(params)``; ``reduce(dL/dvalue, params)`` gives {name: dL/dparam}."""

    init: dict[str, np.ndarray]
    expand: Callable[[dict], np.ndarray]
    reduce: Callable[[np.ndarray, dict], dict[str, np.ndarray]]
    masks: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Weights:
    """The student's trainable initializers: the untied params (the same arrays) and the
    tied weights expanded from theirs."""

    params: dict[str, np.ndarray]
    ties: dict[str, Tie]
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        tied = {n for tie in self.ties.values() for n in tie.init}
        self.values.update({k: v for k, v in self.params.items() if k not in tied})
        self.refresh()

    def refresh(self) -> None:
        for name, tie in self.ties.items():
            self.values[name] = tie.expand(self.params)

    def untie(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """dL/dparam from dL/d initializer."""
        out: dict[str, np.ndarray] = {}
        for name, grad in grads.items():
            parts = self.ties[name].reduce(grad, self.params) if name in self.ties else \
                {name: grad}
            for k, g in parts.items():
                out[k] = out[k] + g if k in out else g
        return out


@dataclass
class Distilled:
    """Tuned values (float32) of the trainable initializers (the best checkpoint), and
    the loss before and after, on the held-out calibration samples (``split``;
    unaugmented); ``rate``: the step size of the last run (LR, or less after backoffs)."""

    values: dict[str, np.ndarray]
    loss_before: float
    loss_after: float
    rate: float


def logits_name(model: onnx.ModelProto) -> str:
    """The first graph output, or the input of the Softmax that produces it."""
    name = model.graph.output[0].name
    for node in model.graph.node:
        if node.output[0] == name and node.op_type == "Softmax":
            return node.input[0]
    return name


def distill(reference: onnx.ModelProto, student: onnx.ModelProto,
            params: dict[str, np.ndarray], masks: dict[str, np.ndarray],
            features: list[str], batches: list[dict], steps: int, seed: int = 0,
            progress=lambda message: None, ties: dict[str, Tie] | None = None
            ) -> Distilled:
    """Tune ``params`` (initializers of ``student``) towards ``reference``'s outputs.

    Args:
        reference: the original model (the teacher).
        student: the compressed model, its weights as plain initializers.
        params: trainable initializer name -> value.
        masks: name -> 0/1 array of the entries of ``params[name]`` that may change.
        features: tensors of both models matched besides the logits.
        batches: calibration batches.
        steps: Adam steps (BATCH augmented calibration samples each).
        ties: initializer name -> its Tie (its parameters are in ``params``).

    Raises:
        ValueError: ``student`` has an op autodiff.py cannot differentiate.
    """
    params = {k: np.array(v, np.float32) for k, v in params.items()}
    weights = _Weights(params, ties or {})
    tape = autodiff.Tape(student, weights.values)
    logits = logits_name(reference)
    teacher = _Teacher(reference, [logits, *features])
    fit, held = split(batches)
    try:
        scale = teacher.scales(batches)
        targets = [teacher.run(b) for b in held]  # measured at every checkpoint
        judge = _Best(lambda: _mean_loss(tape, held, targets, scale, logits), weights)
        rng, rate = np.random.default_rng(seed), LR
        for retry in range(RETRIES, -1, -1):
            if _descend(tape, teacher, weights, masks, fit, steps, scale, logits, rng,
                        progress, judge, rate, retry > 0):
                break
            judge.restart()
            progress(f"distillation: the held-out loss did not fall by the first "
                     f"checkpoint; step size {rate:.3g} -> {rate / BACKOFF:.3g}, again")
            rate /= BACKOFF
        judge.check()
        return Distilled(judge.best, judge.first, judge.loss, rate)
    finally:
        teacher.close()


def split(batches: list[dict]) -> tuple[list[dict], list[dict]]:
    """(batches to tune on, batches the loss is judged on): the last HELD_OUT of the
    samples are held out (whole batches of a fixed-batch model), so that tuning that
    fits the calibration samples but not others is not kept; with too few samples for
    that both are every batch."""
    pool, chunk = _pool(batches)
    count = next(iter(pool.values())).shape[0]
    held = int(round(HELD_OUT * count / chunk)) * chunk
    if held < chunk or count - held < 2 * chunk:
        return batches, batches
    cut = count - held
    return _chunks(pool, 0, cut, chunk), _chunks(pool, cut, count, chunk)


def _chunks(pool: dict, lo: int, hi: int, size: int) -> list[dict]:
    return [{k: v[i: min(i + size, hi)] for k, v in pool.items()} for i in range(lo, hi, size)]


@dataclass
class _Best:
    """The held-out loss (``measure``) of the params at checkpoints: the first, and the
    best params seen (a copy) with their loss (early stopping)."""

    measure: Callable[[], float]
    weights: _Weights
    best: dict[str, np.ndarray] = field(default_factory=dict)
    first: float = 0.0
    loss: float = float("inf")
    stale: int = 0  # checkpoints since the best
    last: float = 0.0  # the latest checkpoint's loss

    def __post_init__(self):
        self.first = self.loss = self.measure()
        self.best = {k: v.copy() for k, v in self.weights.params.items()}

    def check(self) -> None:
        loss = self.last = self.measure()
        self.stale += 1
        if loss < self.loss:
            self.loss, self.best = loss, {k: v.copy() for k, v in self.weights.params.items()}
            self.stale = 0

    def restart(self) -> None:
        """The params back to the best seen (in place: the tape reads these arrays)."""
        for name, value in self.best.items():
            self.weights.params[name][...] = value
        self.weights.refresh()
        self.stale = 0


def _descend(tape, teacher, weights, masks, batches, steps, scale, logits, rng,
             progress, judge: _Best, lr: float, retry: bool) -> bool:
    """``steps`` Adam steps of size ``lr`` on ``weights.params`` (in place),
    cosine-decayed; ``judge`` sees the params at every CHECKPOINTS-th of the way (the
    end: by the caller). With ``retry``, False as soon as the first checkpoint is no
    better than the start (the step size is too large); else True."""
    params = weights.params
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    rms = {k: float(np.sqrt(np.mean(v ** 2))) + 1e-8 for k, v in params.items()}
    pool, chunk = _pool(batches)
    size = max(chunk, BATCH // chunk * chunk)
    whole = _takes_any_batch(tape, pool, chunk, teacher.names)
    count = next(iter(pool.values())).shape[0]
    for step in range(1, steps + 1):
        pick = rng.choice(count, size, replace=count < size)
        batch = _augment({k: v[pick] for k, v in pool.items()}, rng)
        grads = weights.untie(_gradients(tape, teacher, batch, chunk, whole, scale, logits))
        rate = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        for name, grad in grads.items():
            _adam(params, moments, name, grad * masks.get(name, 1), step, rate * rms[name])
            if name in masks:
                params[name] *= masks[name]
        weights.refresh()
        if step % max(1, steps // 20) == 0:
            progress(f"distillation: step {step}/{steps}")
        if step < steps and step % max(1, steps // CHECKPOINTS) == 0:
            judge.check()
            progress(f"distillation: held-out loss {judge.last:.4g} at step {step} "
                     f"(start {judge.first:.4g}, best {judge.loss:.4g})")
            if retry and judge.loss == judge.first:  # no checkpoint better yet
                return False
            if judge.stale >= PATIENCE:
                progress(f"distillation: stopped at step {step}: the held-out loss has not "
                         f"fallen for {PATIENCE} checkpoints")
                return True
    return True


def _pool(batches: list[dict]) -> tuple[dict[str, np.ndarray], int]:
    """Every calibration sample per input, and the batch size the model is fed (a model
    with a fixed batch size gets whole batches of it)."""
    pool = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return pool, next(iter(batches[0].values())).shape[0]


def _takes_any_batch(tape, pool: dict, chunk: int, names: list[str]) -> bool:
    """Whether the student's numpy graph runs a batch larger than the model's fixed one
    (no Reshape pins it): then it takes a step's samples at once, bigger GEMMs."""
    probe = {k: v[:1].repeat(2 * chunk, axis=0) for k, v in pool.items()}
    try:
        env, _ = tape.forward(probe, keep=False)
    except ValueError:
        return False
    return all(env[name].shape[:1] == (2 * chunk,) for name in names)


def _gradients(tape, teacher, batch: dict, chunk: int, whole: bool, scale, logits) -> dict:
    """dL/dparam of the batch: the teacher (onnxruntime) runs it in chunks of the model's
    batch size; the student at once when ``whole``, else in the same chunks (averaged)."""
    count = next(iter(batch.values())).shape[0]
    parts = [{k: v[i: i + chunk] for k, v in batch.items()} for i in range(0, count, chunk)]
    targets = [teacher.run(part) for part in parts]
    if whole:
        parts = [batch]
        targets = [{k: np.concatenate([t[k] for t in targets]) for k in targets[0]}]
    total: dict[str, np.ndarray] = {}
    for part, target in zip(parts, targets, strict=True):
        env, saved = tape.forward(part)
        _, grads = _loss(env, target, scale, logits)
        for name, grad in tape.backward(saved, grads).items():
            total[name] = total[name] + grad if name in total else grad
    return {name: grad / len(parts) for name, grad in total.items()}


def _adam(params, moments, name, grad, step, rate) -> None:
    m, v = moments[name]
    m *= BETAS[0]
    m += (1 - BETAS[0]) * grad
    v *= BETAS[1]
    v += (1 - BETAS[1]) * grad * grad
    m_hat, v_hat = m / (1 - BETAS[0] ** step), v / (1 - BETAS[1] ** step)
    params[name] -= rate * m_hat / (np.sqrt(v_hat) + 1e-12)


class _Teacher:
    def __init__(self, model: onnx.ModelProto, names: list[str]):
        self.names = names
        self.runner = validate.Runner(validate.with_outputs(model, names, only=True), "basic")

    def run(self, batch: dict) -> dict[str, np.ndarray]:
        return self.runner.run_batch(batch)

    def scales(self, batches) -> dict[str, float]:
        sums = dict.fromkeys(self.names, 0.0)
        for batch in batches:
            for name, value in self.run(batch).items():
                sums[name] += float(np.mean(np.square(value, dtype=np.float64)))
        return {name: total / len(batches) + 1e-12 for name, total in sums.items()}

    def close(self) -> None:
        self.runner.close()


def _loss(env, targets, scale, logits) -> tuple[float, dict[str, np.ndarray]]:
    """(L, dL/d tensor) for the logits and the matched features."""
    features = len(targets) - 1
    total, grads = 0.0, {}
    for name, target in targets.items():
        weight = (1.0 if name == logits else 1.0 / features) / scale[name] / target.size
        diff = env[name].astype(np.float32) - target
        total += weight * float(np.sum(diff * diff))
        grads[name] = (2 * weight) * diff
    return total, grads


def _mean_loss(tape, batches, targets, scale, logits) -> float:
    losses = [_loss(tape.forward(b, keep=False)[0], t, scale, logits)[0]
              for b, t in zip(batches, targets, strict=True)]
    return float(np.mean(losses))


def _augment(batch: dict, rng) -> dict[str, np.ndarray]:
    """Flip (4-D float inputs) and mixup, the same draw for every input."""
    count = next(iter(batch.values())).shape[0]
    flip = rng.random(count) < 0.5
    pair = rng.permutation(count)
    lam = rng.beta(MIXUP, MIXUP, size=count).astype(np.float32)
    out = {}
    for name, x in batch.items():
        if not np.issubdtype(x.dtype, np.floating):
            out[name] = x
            continue
        x = np.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[..., ::-1], x) \
            if x.ndim == 4 else x
        mix = lam.reshape((-1,) + (1,) * (x.ndim - 1))
        out[name] = (mix * x + (1 - mix) * x[pair]).astype(x.dtype)
    return out
