"""prune-weights: unstructured magnitude pruning, re-fit on data, stored sparse.

Why: half the weights of a CNN can be zero at little accuracy cost once the kept ones
are re-fitted; stored as a bitmask plus the nonzeros, the file shrinks ~1.9x per layer
while onnxruntime folds the decode at load (same dense kernels, same speed).

Before:  x -> Conv(W, b) -> y
After:   unpack(mask) -> CumSum -> Gather(values) -> W' (folded at load)
         x -> Conv(W', b') -> y       W' zero where pruned, kept weights and b re-fitted

Layers: Conv/Gemm/MatMul with a constant float32 weight read by them alone
(``prune_ops``), except the first and the last compute layer (the stem conv and the
classifier) unless ``prune_first_last``.
Which weights: per layer the fraction s_l with the lowest score, |w| (``magnitude``, the
default) or |w| * sqrt(H_jj) (``activation``: weight times its input's RMS on the data;
on ResNet-8 it kept top-1 slightly worse after the re-fit, within noise).
s_l: ``threshold`` drops |w| < t; else ``sparsity`` everywhere (``uniform``) or from
measured sensitivity (``sensitivity``, see allocate.py) with the parameter-weighted
average of s_l >= ``sparsity``.
Recovery (``recovery``): the kept weights and the bias of each row are re-fitted by
least squares on the calibration inputs (gram.py); per layer the report gives the
relative output error on the data with plain masking and after the re-fit,
    err = (w~' - w~)^T H (w~' - w~) / (w~^T H w~)     (dB: 10 log10 err)
``sequential`` re-fits layer by layer in graph order on the inputs of the already
pruned model against the original outputs (``gram.cross_grams``; ``err_mask_seq_db``
is then masking on those same inputs). It also repairs upstream error but runs the
model twice per layer: off by default (SqueezeNet 1.1: 2.1x the pass time).
Storage: ``storage.encode_sparse`` when its ``file_bytes`` are below the dense
initializer's, else the pruned weight stays dense (reason counted).

Declines when: the weight is not constant or shared, a Conv is not 2-D or uses
auto_pad SAME, a Gemm uses transA/alpha/beta, the layer is first/last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ... import storage
from ...errors import PreconditionError
from ..base import Pass, PassContext, PassResult, register, taken_names, unique_name
from ..qdq.bias_correct import subset
from . import allocate, gram

OPS = {"conv": "Conv", "gemm": "Gemm", "matmul": "MatMul"}


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
    sequential: bool = False
    refit_samples: int = 64


@register
class PruneWeights(Pass):
    name = "prune-weights"
    summary = "unstructured pruning with least-squares re-fit, sparse storage (lossy)"
    lossless = False
    min_opset = 11
    after = ("fold-bn",)
    Options = PruneWeightsOptions

    def check(self, graph: gs.Graph, ctx: PassContext) -> None:
        o = self.options
        if o.sparsity is not None and not 0 <= o.sparsity < 1:
            raise PreconditionError(f"--sparsity must be in [0, 1), got {o.sparsity}")
        if o.threshold is not None and o.threshold < 0:
            raise PreconditionError(f"--threshold must be 0 or more, got {o.threshold}")
        if o.allocation not in ("sensitivity", "uniform") or \
                o.score not in ("magnitude", "activation"):
            raise PreconditionError(f"unknown allocation '{o.allocation}' or score "
                                    f"'{o.score}'")
        bad = set(o.prune_ops.split(",")) - set(OPS)
        if bad:
            raise PreconditionError(f"--prune-ops: unknown {', '.join(sorted(bad))}")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        layers = select_layers(graph, self.options, result)
        if not layers:
            return result
        reference = gs.export_onnx(graph, do_type_check=False)
        grams = self._grams(reference, layers, ctx)
        scores = [self._score(layer, grams.get(layer.name)) for layer in layers]
        levels = self._levels(layers, scores, grams, result)
        taken = taken_names(graph)
        for layer, score, level in zip(layers, scores, levels, strict=True):
            keep = score >= level if self.options.threshold is not None else \
                allocate.keep_mask(score, level)
            h = grams.get(layer.name)
            new, record = self._prune(graph, layer, keep, h, reference, ctx)
            _set_dense(layer, new, taken)
            result.layers.append(record)
        for layer, record in zip(layers, result.layers, strict=True):
            _encode(graph, layer.node, taken, record, result)
        result.changed = True
        _summarize(result)
        return result

    def _grams(self, model, layers, ctx: PassContext) -> dict[str, np.ndarray]:
        o = self.options
        wanted = o.recovery or o.score == "activation" or (
            o.threshold is None and o.allocation == "sensitivity")
        if not ctx.calib or not wanted:
            return {}
        batches = subset(ctx.calib, o.refit_samples)
        return gram.collect_grams(model, layers, batches, ctx.progress)

    def _score(self, layer: gram.Layer, h: np.ndarray | None) -> np.ndarray:
        m = np.abs(layer.matrix()).astype(np.float64)
        if self.options.threshold is not None or self.options.score == "magnitude" \
                or h is None:
            return m
        k = m.shape[2]
        rms = np.sqrt(np.maximum(np.diagonal(h, axis1=1, axis2=2)[:, :k], 0))
        return m * rms[:, None, :]

    def _levels(self, layers, scores, grams, result: PassResult) -> list[float]:
        o = self.options
        if o.threshold is not None:
            return [o.threshold] * len(layers)
        target = 0.5 if o.sparsity is None else o.sparsity
        if o.allocation == "uniform" or len(grams) < len(layers):
            return [target] * len(layers)
        errors = [_error_curve(layer, s, grams[layer.name])
                  for layer, s in zip(layers, scores, strict=True)]
        sizes = [layer.weight.size for layer in layers]
        levels, met = allocate.allocate(errors, sizes, target)
        if not met:
            result.declined["sparsity target above what the layers allow"] += 1
        return levels

    def _prune(self, graph, layer: gram.Layer, keep, h, reference, ctx: PassContext):
        """(w~', record): the masked or re-fitted rows of ``layer`` and its report line."""
        w = gram.augmented(layer)
        new = np.where(gram.pad_keep(keep, w.shape[2]), w, 0.0)
        record = {"layer": layer.name, "op": layer.node.op, "params": int(layer.weight.size),
                  "sparsity": round(1 - float(keep.mean()), 4)}
        if h is None:
            return new, record
        e = gram.energy(h, w)
        record["err_mask_db"] = _db(gram.mask_error(h, w, keep), e)
        if not self.options.recovery:
            return new, record
        if not self.options.sequential:
            new = gram.refit(h, w, keep)
            record["err_refit_db"] = _db(gram.energy(h, new - w), e)
            return new, record
        working = gs.export_onnx(graph, do_type_check=False)
        batches = subset(ctx.calib, self.options.refit_samples)
        hp, cross = gram.cross_grams(reference, working, layer, batches)
        ctx.progress(f"prune-weights: re-fitted {layer.name}")
        record["err_mask_seq_db"] = _db(gram.fit_error(hp, cross, h, w, new), e)
        new = gram.refit(hp, w, keep, cross=cross)
        record["err_refit_db"] = _db(gram.fit_error(hp, cross, h, w, new), e)
        return new, record


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


def _error_curve(layer: gram.Layer, score: np.ndarray, h: np.ndarray) -> np.ndarray:
    w = gram.augmented(layer)
    e = max(gram.energy(h, w), 1e-30)
    return np.array([gram.mask_error(h, w, allocate.keep_mask(score, s)) / e
                     for s in allocate.GRID])


def _db(error: float, energy: float) -> float:
    return round(float(10 * np.log10(max(error, 1e-30) / max(energy, 1e-30))), 2)


def _set_dense(layer: gram.Layer, new: np.ndarray, taken: set[str]) -> None:
    """Install the pruned rows w~' [G, O/G, K(+1)] as the layer's weight and bias."""
    node, k = layer.node, layer.matrix().shape[2]
    weight = layer.unmatrix(new[:, :, :k]).astype(np.float32)
    node.inputs[1] = gs.Constant(unique_name(taken, f"{node.inputs[1].name}_pruned"), weight)
    if layer.has_bias_slot and (layer.bias is not None or np.any(new[:, :, k])):
        bias = new[:, :, k].reshape(-1).astype(np.float32)
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
