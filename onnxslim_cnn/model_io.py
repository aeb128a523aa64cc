"""Loading, checking, normalising, opset upgrade and atomic saving of ONNX models.

The input file is only ever opened for reading. Output goes to a temporary folder
inside the target folder and is moved into place with ``os.replace``; a model whose
protobuf would exceed 2 GiB is written with its tensors in ``<output>.data`` beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import numpy_helper

from .errors import InvalidModelError, OutputError, UnsupportedModelError

PROTOBUF_LIMIT = 2**31 - 1
# Above this size a model is handed to the checker and onnxruntime as a file: from an
# in-memory protobuf both need a serialized copy *and* their own parsed copy at once.
SPILL_BYTES = 64 * 2**20
# Initializers above this size are reduced to name, type and shape for shape inference.
STUB_BYTES = 1024
# Newest default-domain opset that both onnx's version converter and onnxruntime know.
MAX_OPSET = 22
# Ops whose weights the passes quantize, cluster, prune or factor: a NaN or Inf there
# turns every per-channel scale and codebook into garbage. Non-finite constants
# elsewhere (Clip bounds, masks) are legitimate and not looked at.
WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.DOUBLE})


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check a model, with external data from beside the file.

    Raises:
        InvalidModelError: missing, empty, truncated or non-ONNX file, a model that
            fails ``onnx.checker`` (a graph input without a shape or with a zero-size
            axis is named), or NaN/Inf
            in a weight (see ``check_finite_weights``).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError, onnx.checker.ValidationError) as exc:
        # ValidationError: external data missing or pointing outside the model's folder
        raise InvalidModelError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from exc
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise InvalidModelError(f"{path}: not an ONNX model (no graph or no nodes)")
    _check_input_shapes(model, path)
    check(model, what=str(path), path=path)
    check_finite_weights(model, what=str(path))
    return model


def _check_input_shapes(model: onnx.ModelProto, path: Path) -> None:
    # The checker refuses these too, but with a message that names no input.
    for inp in model.graph.input:
        if not inp.type.HasField("tensor_type"):
            continue
        if not inp.type.tensor_type.HasField("shape"):
            raise InvalidModelError(
                f"{path}: graph input '{inp.name}' has no shape; ONNX requires one "
                "(symbolic dims are fine, e.g. ['N', 3, 'H', 'W'])")
        empty = [axis for axis, dim in enumerate(inp.type.tensor_type.shape.dim)
                 if dim.HasField("dim_value") and dim.dim_value == 0]
        if empty:
            raise InvalidModelError(
                f"{path}: graph input '{inp.name}' has size 0 on axis {empty[0]}: the model "
                "only accepts empty tensors, so there is nothing to compute or validate")


def check_finite_weights(model: onnx.ModelProto, what: str = "model") -> None:
    """Refuse NaN or Inf in a float weight or bias of a ``WEIGHT_OPS`` node.

    Such a model computes NaN/Inf for whole channels on every input; compressing it
    would only hide that, so it is reported as bad input.

    Raises:
        InvalidModelError: names the node, the tensor and how many values are bad.
    """
    inits = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for name in node.input:
            if name in seen:
                continue
            tensor = inits.get(name) or (_constant_tensor(constants[name])
                                         if name in constants else None)
            if tensor is None or tensor.data_type not in FLOAT_TYPES:
                continue
            seen.add(name)
            values = numpy_helper.to_array(tensor)
            bad = values.size - int(np.count_nonzero(np.isfinite(values)))
            if bad:
                raise InvalidModelError(
                    f"{what}: {node.op_type} '{node.name or node.output[0]}' weight '{name}' "
                    f"has {bad} NaN/Inf value(s); fix the model: compressing it would "
                    "only hide them")


def check(model: onnx.ModelProto, what: str = "model", path: Path | None = None) -> None:
    """Run ``onnx.checker`` on ``model``.

    Above ``SPILL_BYTES`` (and always above the protobuf limit) the checker reads a
    file: ``path`` when the model was just loaded from it, else a temporary copy, so
    memory holds the model and the checker's copy but no serialized bytes besides.

    Raises:
        InvalidModelError: the model fails the checker.
    """
    try:
        if path is not None and is_large(model):
            onnx.checker.check_model(str(path))
        elif is_large(model):
            with temp_model_path(model) as tmp:
                onnx.checker.check_model(str(tmp))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{what}: fails the ONNX checker: {_first_line(exc)}") from exc


def opset(model: onnx.ModelProto) -> int:
    """The default-domain opset version of ``model``."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Return ``model`` converted to opset ``target`` (unchanged if already there).

    Raises:
        UnsupportedModelError: the version converter cannot convert this model.
    """
    if opset(model) >= target:
        return model
    if target > MAX_OPSET:
        raise UnsupportedModelError(f"opset {target} is newer than supported ({MAX_OPSET})")
    try:
        converted = onnx.version_converter.convert_version(model, target)
        check(converted, what="upgraded model")
    except Exception as exc:  # the converter raises bare RuntimeError/IndexError
        raise UnsupportedModelError(
            f"cannot upgrade opset {opset(model)} -> {target}: {_first_line(exc)}"
        ) from exc
    return converted


def normalize(model: onnx.ModelProto,
              in_place: bool = False) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Bring a model into the form the passes expect, exactly (no numeric change).

    - ``Constant`` nodes holding a tensor become initializers, so weights stored as
      nodes are seen, folded and compressed like any other weight.
    - Initializers also listed as graph inputs (IR 3 style) are dropped from the
      inputs: a runtime must treat such inputs as overridable and cannot fold them.

    Args:
        model: the model; left untouched unless ``in_place``.
        in_place: normalise ``model`` itself (a caller that no longer needs the
            original saves a copy of every weight).

    Returns:
        The normalised model (a copy unless ``in_place``) and counts of what changed.
    """
    out = model
    if not in_place:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    graph = out.graph
    moved = _constants_to_initializers(graph)
    init_names = {init.name for init in graph.initializer}
    kept = [inp for inp in graph.input if inp.name not in init_names]
    dropped = len(graph.input) - len(kept)
    if dropped:
        del graph.input[:]
        graph.input.extend(kept)
    if out.ir_version < 4 and (moved or dropped):
        out.ir_version = 4  # IR >= 4 lets initializers exist without a matching input
    return out, {"constant_nodes_to_initializers": moved, "initializer_inputs_dropped": dropped}


def _constants_to_initializers(graph: onnx.GraphProto) -> int:
    keep, moved = [], 0
    for node in graph.node:
        tensor = _constant_tensor(node)
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


# Constant attribute -> (TensorProto element type, field of the AttributeProto, scalar?)
_CONSTANT_ATTRS = {
    "value_float": (onnx.TensorProto.FLOAT, "f", True),
    "value_int": (onnx.TensorProto.INT64, "i", True),
    "value_floats": (onnx.TensorProto.FLOAT, "floats", False),
    "value_ints": (onnx.TensorProto.INT64, "ints", False),
}


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A new TensorProto with the value of a ``Constant`` node (None if not one).

    ``value`` is copied bit for bit (no numpy round trip: bfloat16, NaN payloads and
    -0.0 stay as they are); ``sparse_value`` and string values stay nodes.
    """
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or \
            len(node.output) != 1 or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        return tensor
    if attr.name not in _CONSTANT_ATTRS:
        return None
    elem_type, field, scalar = _CONSTANT_ATTRS[attr.name]
    values = getattr(attr, field)
    return onnx.helper.make_tensor("", elem_type, [] if scalar else [len(values)],
                                   [values] if scalar else list(values))


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes of ``model`` as one protobuf, also when that is over the 2 GiB limit.

    Above the limit protobuf's ``ByteSize`` raises instead of counting, so the size is
    then summed piecewise (tensor payloads by their length): exact to within the few
    bytes of field headers, which is all the limit test and the report need.
    """
    try:
        return model.ByteSize()
    except EncodeError:
        return _piecewise_size(model)


def _piecewise_size(model: onnx.ModelProto) -> int:
    graph = model.graph
    parts = [*graph.node, *graph.input, *graph.output, *graph.value_info,
             *model.opset_import, *model.metadata_props, *model.functions]
    size = sum(_message_size(p) for p in parts)
    return size + sum(_tensor_size(t) for t in graph.initializer)


def _tensor_size(tensor: onnx.TensorProto) -> int:
    if len(tensor.raw_data) > PROTOBUF_LIMIT // 2:
        return len(tensor.raw_data) + len(tensor.name) + 16 * (len(tensor.dims) + 2)
    return _message_size(tensor)


def _message_size(message) -> int:
    try:
        return message.ByteSize()
    except EncodeError:  # a single node or tensor above the limit: surely too big
        return PROTOBUF_LIMIT + 1


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of ``model``, tensors included wherever they are stored."""
    size = serialized_size(model)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            size += next((int(e.value) for e in init.external_data if e.key == "length"), 0)
    return size


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model is better passed to C++ code as a file (``SPILL_BYTES``)."""
    return serialized_size(model) > SPILL_BYTES


def infer_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Types and shapes onnx shape inference derives for the tensors of ``model``.

    Inference runs on a light copy whose initializers above ``STUB_BYTES`` keep only
    name, type and shape: shape inference reads the values of small constants (Reshape
    targets, Slice bounds), never of weights, and a full copy of a 500 MB model costs
    four times its size (serialized, parsed, inferred, parsed back). ``model`` itself is
    not modified. An empty list when inference fails (shapes help, are not required).
    """
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    graph.initializer.extend(_stub(t) for t in model.graph.initializer)
    try:
        return list(onnx.shape_inference.infer_shapes(light).graph.value_info)
    except Exception:  # noqa: BLE001  (inference raises untyped errors; shapes are optional)
        return []


def _stub(tensor: onnx.TensorProto) -> onnx.TensorProto:
    if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() <= STUB_BYTES:
        return tensor
    return onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialized as a single protobuf."""
    return serialized_size(model) > PROTOBUF_LIMIT


def save(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write ``model`` atomically; returns the files written (model, maybe data).

    Raises:
        OutputError: the target folder is missing or not writable.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: output folder {folder} does not exist")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write to {folder} ({exc.strerror})") from exc
    try:
        return _save_staged(model, path, staging)
    except OSError as exc:
        raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_staged(model: onnx.ModelProto, path: Path, staging: Path) -> list[Path]:
    staged = staging / path.name
    if needs_external_data(model):
        data_name = path.name + ".data"
        _save_external(model, staged, data_name)
        written = [path]
        if (staging / data_name).exists():  # absent when every tensor is below 1 KB
            os.replace(staging / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(staged, path)
        return written
    with open(staged, "wb") as handle:
        handle.write(model.SerializeToString())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staged, path)
    return [path]


@contextlib.contextmanager
def temp_model_path(model: onnx.ModelProto) -> Iterator[Path]:
    """A temporary file holding ``model`` (external data beside it when needed)."""
    with tempfile.TemporaryDirectory(prefix="onnxslim_cnn_") as tmp:
        target = Path(tmp) / "model.onnx"
        if needs_external_data(model):
            _save_external(model, target, "model.onnx.data")
        else:
            target.write_bytes(model.SerializeToString())
        yield target


def _save_external(model: onnx.ModelProto, target: Path, data_name: str) -> None:
    # onnx.save_model moves tensor bytes out of the proto it is given: save a copy.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data_name, size_threshold=1024,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
