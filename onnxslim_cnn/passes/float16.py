"""Compute a float16 model in float32 inside, keeping its float16 inputs and outputs.

Used by passes whose targets only exist in float32: onnxruntime fuses QDQ into int8
kernels only around float32 tensors, and calibration statistics are float32. The file
keeps its interface (a user feeding float16 still feeds float16).

Before:  x:f16 -> Conv(W:f16) -> Relu -> y:f16
After:   x:f16 -> Cast(f32) -> Conv(W:f32) -> Relu -> Cast(f16) -> y:f16

Every float16 constant becomes float32 (exact: float32 holds every float16 value),
``Cast(to=FLOAT16)`` inside the graph becomes ``Cast(to=FLOAT)``, and intermediate
tensor types are dropped for the exporter to re-infer. The outputs differ from the
float16 original only by the float16 rounding the original did at every op.

Declines (returns 0) when the graph has no float16 tensor, or when a node carries a
subgraph (If/Loop/Scan bodies would need the same rewrite inside).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import replace_output, replace_uses, taken_names, unique_name

_F16 = np.dtype(np.float16)


def has_float16(graph: gs.Graph) -> bool:
    return any(_is_f16(t) for t in graph.tensors().values())


def upcast(graph: gs.Graph) -> int:
    """Rewrite ``graph`` as described in the module doc; returns the number of float16
    tensors converted (0 = nothing to do or a subgraph is present, graph untouched)."""
    if not has_float16(graph) or any(isinstance(v, gs.Graph) for n in graph.nodes
                                     for v in n.attrs.values()):
        return 0
    taken = taken_names(graph)
    converted = _cast_inputs(graph, taken)
    interface = _cast_outputs(graph, taken)
    keep = {id(t) for t in graph.inputs + graph.outputs}
    for tensor in list(graph.tensors().values()):
        if _is_f16(tensor) and id(tensor) not in keep:
            converted += 1
            if isinstance(tensor, gs.Constant):
                _replace_constant(tensor)
            else:
                tensor.dtype = np.float32
    for node in graph.nodes:
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT16 and \
                not any(node is cast for cast in interface):
            node.attrs["to"] = onnx.TensorProto.FLOAT
    return converted + len(interface)


def _is_f16(tensor: gs.Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype) == _F16
    except TypeError:
        return False


def _replace_constant(const: gs.Constant) -> None:
    wide = gs.Constant(const.name, np.asarray(const.values).astype(np.float32))
    const.name = const.name + "_f16"
    replace_uses(const, wide)


def _cast_inputs(graph: gs.Graph, taken: set[str]) -> int:
    """x:f16 -> Cast(f32) -> x_f32 read by every former reader of x."""
    done = 0
    for tensor in [t for t in graph.inputs if _is_f16(t)]:
        wide = gs.Variable(unique_name(taken, f"{tensor.name}_f32"), np.float32, tensor.shape)
        replace_uses(tensor, wide)
        graph.nodes.append(gs.Node("Cast", unique_name(taken, f"{tensor.name}_to_f32"),
                                   {"to": onnx.TensorProto.FLOAT}, [tensor], [wide]))
        done += 1
    return done


def _cast_outputs(graph: gs.Graph, taken: set[str]) -> list[gs.Node]:
    """producer -> y_f32 -> Cast(f16) -> y (the output keeps its name and type)."""
    casts = []
    for tensor in graph.outputs:
        if not _is_f16(tensor) or isinstance(tensor, gs.Constant) or not tensor.inputs:
            continue
        wide = gs.Variable(unique_name(taken, f"{tensor.name}_f32"), np.float32, tensor.shape)
        producer = tensor.inputs[0]
        replace_output(producer, tensor, wide)
        replace_uses(tensor, wide)  # internal readers of the output read float32
        cast = gs.Node("Cast", unique_name(taken, f"{tensor.name}_to_f16"),
                       {"to": onnx.TensorProto.FLOAT16}, [wide], [tensor])
        graph.nodes.append(cast)
        casts.append(cast)
    return casts
