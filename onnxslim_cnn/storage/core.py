"""Compact weight storage: core (see the package docstring for formats and figures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..errors import PreconditionError, UsageError
from ..graph_edit import replace_uses, taken_names, unique_name

DECODE_TAG = "onnxslim_decode"


SPARSE_TAG = "onnxslim_sparse"
# float weight dtypes the encodings decode to (a float16 weight stays float16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


INT4_TYPES = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


@dataclass
class Encoded:
    """One encoded weight.

    Attributes:
        tensor: the decoded tensor, to be read where the dense constant was read.
        stored_bytes: initializer payload bytes of the encoding (shape constants included).
        file_bytes: serialized bytes the encoding adds to the file: initializers with
            their names plus the decode nodes (compare with ``dense_bytes`` to decide
            whether encoding a small tensor pays).
        dense_bytes: bytes of the decoded dense tensor (in its dtype: float16 for a
            float16 weight).
        encoding: e.g. ``"int8-dq"``, ``"codebook4"``, ``"sparse+codebook4"``.
        min_opset: smallest default-domain opset the decode ops need.
        source: name of the weight it encodes.
    """

    tensor: gs.Tensor
    stored_bytes: int
    dense_bytes: int
    encoding: str
    min_opset: int
    source: str
    file_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.stored_bytes / max(self.dense_bytes, 1)


ValuesEncoder = Callable[[gs.Graph, str, np.ndarray, set], Encoded]


class _Builder:
    """Appends one weight's decode subgraph: tagged, uniquely named nodes and constants."""

    def __init__(self, graph: gs.Graph, name: str, taken: set[str] | None):
        self.graph, self.name = graph, name
        self.base = f"{name}/{DECODE_TAG}"
        self.taken = taken if taken is not None else taken_names(graph)
        self.stored = self.file = 0

    def const(self, suffix: str, values) -> gs.Constant:
        values = np.asarray(values)
        name = unique_name(self.taken, f"{self.base}/{suffix}")
        if _is_int4(values.dtype):
            # graphsurgeon exports int4 only from a packed TensorProto (see protect_int4)
            proto = numpy_helper.from_array(values, name)
            self.stored += len(proto.raw_data)
            self.file += proto.ByteSize()
            return gs.Constant(name, gs.ir.tensor.LazyValues(proto))
        self.stored += values.nbytes
        self.file += numpy_helper.from_array(values, name).ByteSize()
        return gs.Constant(name, values)

    def op(self, op: str, inputs: list, dtype, shape=None, **attrs) -> gs.Variable:
        node_name = unique_name(self.taken, f"{self.base}/{op}")
        out = gs.Variable(unique_name(self.taken, f"{node_name}_out"), dtype=dtype, shape=shape)
        self.graph.nodes.append(gs.Node(op, node_name, attrs, inputs, [out]))
        self.file += onnx.helper.make_node(op, [t.name for t in inputs], [out.name], node_name,
                                           **attrs).ByteSize()
        return out

    def ints(self, suffix: str, values) -> gs.Constant:
        return self.const(suffix, np.asarray(values, np.int64))

    def cast(self, tensor: gs.Variable, dtype, shape) -> gs.Variable:
        """``tensor`` as ``dtype``: itself, or a Cast to it (the decode's last op)."""
        if np.dtype(tensor.dtype) == np.dtype(dtype):
            return tensor
        return self.op("Cast", [tensor], np.dtype(dtype), list(shape),
                       to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def finish(self, tensor, dense_bytes: int, encoding: str, min_opset: int) -> Encoded:
        return Encoded(tensor, int(self.stored), int(dense_bytes), encoding, min_opset,
                       self.name, int(self.file))


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise UsageError(f"bits must be an integer in 1..8, got {bits!r}")


def _is_int4(dtype) -> bool:
    try:
        return np.dtype(dtype) in INT4_TYPES
    except TypeError:  # graphsurgeon reports types numpy lacks as onnx enum values
        return False


def _require_opset(graph: gs.Graph, needed: int, what: str) -> None:
    if (graph.opset or 0) < needed:
        raise PreconditionError(f"{what} needs opset {needed}; the model has opset "
                                f"{graph.opset} (upgrade it first)")


def replace_with(graph: gs.Graph, const: gs.Constant, encoded: Encoded) -> int:
    """Make every consumer of ``const`` read ``encoded.tensor``; returns how many."""
    users = len(const.outputs)
    replace_uses(const, encoded.tensor)
    return users


def protect_int4(graph: gs.Graph) -> int:
    """Re-wrap INT4/UINT4 constants as packed TensorProtos so graphsurgeon can export them.

    onnx-graphsurgeon 0.6 exports a constant whose values were read as a numpy array
    with one byte per int4 element, which onnx rejects; call before ``gs.export_onnx``.
    Returns the number of constants re-wrapped.
    """
    count = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and _is_int4(tensor.dtype):
            proto = numpy_helper.from_array(np.asarray(tensor.values), tensor.name)
            tensor.values = gs.ir.tensor.LazyValues(proto)
            count += 1
    return count
