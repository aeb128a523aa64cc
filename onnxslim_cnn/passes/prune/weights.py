"""prune-weights: unstructured pruning with data-aware recovery, stored sparse.

Why: half the weights of a CNN can be zero at little accuracy cost once the kept ones
are re-fitted; stored as a bitmask plus the nonzeros, the file shrinks ~1.9x per layer
while onnxruntime folds the decode at load (same dense kernels, same speed).

Before:  x -> Conv(W, b) -> y
After:   unpack(mask) -> CumSum -> Gather(values) -> W' (folded at load)
         x -> Conv(W', b') -> y       W' zero where pruned, kept weights and b re-fitted

Layers: Conv/Gemm/MatMul with a constant float32 or float16 weight read by them alone
(``prune_ops``), except the first and the last compute layer (the stem conv and the
classifier) unless ``prune_first_last``. "Prunable layers" are these; the sparsity
target is the fraction of *their* weights set to zero.
s_l: ``threshold`` drops |w| < t; else ``sparsity`` everywhere (``uniform``) or from
measured sensitivity (``sensitivity``, allocate.py: per layer the relative output error
of masking s_l of its lowest-|w| weights on the calibration data, weighted by how much
of it reaches the model output, reach.py; ``network``: the model-output error with only
that layer OBS-pruned to s_l, measured at 7 levels, reach.network_curves: ~5x slower;
EfficientNet-Lite0 at 50 %, two 300-image splits: agreement 87.7 / 86.0 % instead of
82.3 / 83.0 %, cosine 0.841 / 0.856 instead of 0.805 / 0.822, top-1 -6.7 / -9.0 instead
of -9.3 / -8.0) with the parameter-weighted average of s_l >= ``sparsity``.
Which weights and recovery (``prune_method``, recover.py): ``obs`` (default) chooses the
mask by the OBS saliency and compensates with the inverse Gram matrix (SparseGPT,
obs.py), then re-fits the kept weights jointly; ``refit`` masks by ``score`` (|w|, or
|w| * input RMS) and solves each row's least squares (gram.py, slow on big layers).
``recovery`` off: masking only. Per layer the report gives the relative output error on
the data with plain masking and after recovery,
    err = (w~' - w~)^T H (w~' - w~) / (w~^T H w~)     (dB: 10 log10 err)
``sequential`` prunes in waves (sequence.py): each layer's Gram matrix comes from the
inputs of the already pruned model and it is fitted to the original outputs, which
also repairs upstream error (``err_mask_seq_db`` is masking on those inputs); two
forwards per wave, off by default.
``distill_steps`` > 0 then tunes the kept weights and the biases of all pruned layers
together against the unpruned model's outputs by gradient descent on the calibration
data (onnxslim_cnn/recover): the re-fits above are per layer, this repairs
what the layers' errors build together (zeros stay zeros).
Storage: ``storage.encode_sparse`` when its ``file_bytes`` are below the dense
initializer's, else the pruned weight stays dense (reason counted).
float16 models stay float16: the re-fit runs in float64 and the new weight and bias are
written back in their own dtypes; the sparse decode (Concat, Gather: no arithmetic)
then runs in float16, which onnxruntime's CPU provider has and folds at load.

Declines when: the weight is not a float32/float16 constant or is shared, a Conv is not
2-D or uses auto_pad SAME, a Gemm uses transA/alpha/beta, the layer is first/last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ... import storage
from ...errors import UsageError
from ...recover import layers as tuning  # a module: recover.layers imports passes.base
from ..base import Pass, PassContext, PassResult, register, taken_names, unique_name
from ..qdq.bias_correct import subset
from . import allocate, gram, reach, recover, sequence

OPS = {"conv": "Conv", "gemm": "Gemm", "matmul": "MatMul"}
METHODS = ("obs", "refit")
ALLOCATIONS = ("sensitivity", "network", "uniform")


@dataclass(frozen=True)
class PruneWeightsOptions:
    """Options of prune-weights (see the module docstring)."""

    sparsity: float | None = None
    threshold: float | None = None
    prune_ops: str = "conv,gemm,matmul"
    prune_first_last: bool = False
    allocation: str = "sensitivity"
    score: str = "magnitude"
    recovery: bool = True
    prune_method: str = "obs"
    sequential: bool = False
    refit_samples: int = 64
    distill_steps: int = 0


@register
class PruneWeights(Pass):
    name = "prune-weights"
    summary = "unstructured pruning with least-squares re-fit, sparse storage (lossy)"
    lossless = False
    min_opset = 11
    after = ("fold-bn",)
    Options = PruneWeightsOptions

    def check_options(self) -> None:
        o = self.options
        if o.sparsity is not None and not 0 <= o.sparsity < 1:
            raise UsageError(f"--sparsity must be in [0, 1), got {o.sparsity}")
        if o.distill_steps < 0:
            raise UsageError(f"--distill-steps must be 0 or more, got {o.distill_steps}")
        if o.threshold is not None and o.threshold < 0:
            raise UsageError(f"--threshold must be 0 or more, got {o.threshold}")
        if o.allocation not in ALLOCATIONS or o.prune_method not in METHODS or \
                o.score not in ("magnitude", "activation"):
            raise UsageError(f"unknown allocation '{o.allocation}', score "
                             f"'{o.score}' or method '{o.prune_method}'")
        bad = set(o.prune_ops.split(",")) - set(OPS)
        if bad:
            raise UsageError(f"--prune-ops: unknown {', '.join(sorted(bad))}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        layers = select_layers(graph, self.options, result)
        if not layers:
            return result
        reference = gs.export_onnx(graph, do_type_check=False)
        grams, means = self._statistics(reference, layers, ctx, result)
        levels = dict(zip([layer.name for layer in layers],
                          self._levels(reference, layers, grams, ctx, result), strict=True))
        taken, records = taken_names(graph), {}
        for wave in self._waves(graph, layers, grams):
            inputs = self._wave_inputs(reference, graph, wave, ctx)
            for layer in wave:
                ctx.progress(f"prune-weights: pruning layer {len(records) + 1}/{len(layers)} "
                             f"{layer.name} to {levels[layer.name]:g}")
                new, records[layer.name] = recover.prune_layer(
                    layer, levels[layer.name], grams.get(layer.name),
                    inputs.get(layer.name), self.options, means.get(layer.name))
                _set_dense(layer, new, taken)
        result.layers = [records[layer.name] for layer in layers]
        if self.options.distill_steps and self.options.recovery and ctx.calib:
            tuning.tune_nodes(reference, graph, [layer.node for layer in layers], True, ctx,
                              self.options.distill_steps, result, taken)
        for layer, record in zip(layers, result.layers, strict=True):
            _encode(graph, layer.node, taken, record, result)
        result.changed = True
        _summarize(result)
        return result

    def _statistics(self, model, layers, ctx: PassContext, result: PassResult
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(H of the layers within gram.MAX_GRAM_BYTES, mean input of those above it)
        from one sweep over the data. The wide layers are masked by magnitude and, with
        recovery, their bias corrected for the mean of what was removed."""
        o = self.options
        wanted = o.recovery or o.score == "activation" or (
            o.threshold is None and o.allocation != "uniform")
        fitting = [layer for layer in layers if gram.fits(layer)]
        if not ctx.calib or not wanted or not fitting:
            return {}, {}
        wide = [layer for layer in layers if not gram.fits(layer)]
        if wide:
            cap = f"input Gram matrix above {gram.MAX_GRAM_BYTES / 2**20:g} MB: pruned by " \
                  f"magnitude{', bias corrected' if o.recovery else ''}"
            result.declined[cap] += len(wide)
        batches = subset(ctx.calib, o.refit_samples)
        return gram.collect(model, fitting, wide if o.recovery else [], batches, ctx.progress)

    def _levels(self, reference, layers, grams, ctx, result: PassResult) -> list[float]:
        o = self.options
        if o.threshold is not None:
            return [o.threshold] * len(layers)
        target = 0.5 if o.sparsity is None else o.sparsity
        if o.allocation == "uniform" or not grams:
            return [target] * len(layers)
        probes = subset(ctx.calib, reach.REACH_SAMPLES)
        if o.allocation == "network" and recover.uses_obs(o):
            errors = reach.network_curves(reference, layers, grams, probes, ctx.progress)
        else:
            if o.allocation == "network":  # its curves are of OBS pruning
                result.declined["allocation network needs OBS recovery: sensitivity used"] += 1
            ctx.progress("prune-weights: error curves of every layer")
            errors = [recover.error_curve(layer, grams.get(layer.name), o) for layer in layers]
            scores = [recover.score(layer, grams.get(layer.name), o) for layer in layers]
            gains = reach.reach(reference, layers, errors, scores, probes, ctx.progress)
            errors = [g * e for g, e in zip(gains, errors, strict=True)]
        levels, met = allocate.allocate(errors, [layer.weight.size for layer in layers],
                                        target)
        if not met:
            result.declined["sparsity target above what the layers allow"] += 1
        return levels

    def _waves(self, graph, layers, grams) -> list[list[gram.Layer]]:
        if self.options.sequential and self.options.recovery and grams:
            return sequence.waves(graph, layers)
        return [layers]

    def _wave_inputs(self, reference, graph, wave, ctx: PassContext) -> dict:
        """(Hp, C) per layer of the wave when sequential, else nothing."""
        if not self.options.sequential or not self.options.recovery or not ctx.calib:
            return {}
        wave = [layer for layer in wave if gram.fits(layer)]
        if not wave:
            return {}
        working = gs.export_onnx(graph, do_type_check=False)
        batches = subset(ctx.calib, self.options.refit_samples)
        ctx.progress(f"prune-weights: re-fitting {', '.join(x.name for x in wave)}")
        return sequence.wave_grams(reference, working, wave, batches)


def select_layers(graph: gs.Graph, options: PruneWeightsOptions, result: PassResult
                  ) -> list[gram.Layer]:
    """The layers to prune; every other compute layer's reason is counted."""
    ops = {OPS[name] for name in options.prune_ops.split(",")}
    compute = [n for n in graph.nodes if n.op in OPS.values()]
    ends = set() if options.prune_first_last or not compute else \
        {id(compute[0]), id(compute[-1])}
    outputs = {t.name for t in graph.outputs}
    layers = []
    for node in compute:
        view = gram.layer_of(node)
        reason = "op not selected by prune_ops" if node.op not in ops else \
            "first or last layer (prune_first_last is off)" if id(node) in ends else \
            view if isinstance(view, str) else \
            "weight is shared or a graph output" if len(node.inputs[1].outputs) != 1 \
            or node.inputs[1].name in outputs else None
        if reason:
            result.declined[reason] += 1
        else:
            layers.append(view)
    return layers


def _set_dense(layer: gram.Layer, new: np.ndarray, taken: set[str]) -> None:
    """Install the pruned rows w~' [G, O/G, K(+1)] as the layer's weight and bias (in
    their own dtypes)."""
    node = layer.node
    weight, bias = layer.new_values(new)
    node.inputs[1] = gs.Constant(unique_name(taken, f"{node.inputs[1].name}_pruned"), weight)
    if bias is not None and (layer.bias is not None or np.any(bias)):
        old = node.inputs[2].name if layer.bias is not None else f"{node.outputs[0].name}_b"
        constant = gs.Constant(unique_name(taken, f"{old}_refit"), bias)
        node.inputs = [node.inputs[0], node.inputs[1], constant]


def _encode(graph: gs.Graph, node: gs.Node, taken, record: dict, result) -> None:
    """Store the node's pruned weight sparse when that makes the file smaller."""
    weight = np.asarray(node.inputs[1].values)
    dense = numpy_helper.from_array(weight, node.inputs[1].name).ByteSize()
    mark = len(graph.nodes)
    encoded = storage.encode_sparse(graph, node.inputs[1].name, weight, taken)
    if encoded.file_bytes < dense:
        node.inputs[1] = encoded.tensor
        record.update(storage=encoded.encoding, bytes_before=dense,
                      bytes_after=encoded.file_bytes)
    else:
        del graph.nodes[mark:]
        result.declined["sparse storage does not pay (kept dense)"] += 1


def _summarize(result: PassResult) -> None:
    params = sum(r["params"] for r in result.layers)
    zeros = sum(r["params"] * r["sparsity"] for r in result.layers)
    result.stats.update(layers_pruned=len(result.layers),
                        sparsity=round(zeros / max(params, 1), 4),
                        weight_bytes_saved=sum(r.get("bytes_before", 0) - r.get(
                            "bytes_after", 0) for r in result.layers))
    gains = [r.get("err_mask_seq_db", r.get("err_mask_db")) - r["err_refit_db"]
             for r in result.layers if "err_refit_db" in r]
    if gains:
        result.stats["refit_gain_db_mean"] = round(float(np.mean(gains)), 2)
