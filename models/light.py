"""Materialise the real CNN architectures that ship inside the onnx package.

``onnx/backend/test/data/light/light_<name>.onnx`` holds ResNet-50, VGG-19, DenseNet-121,
Inception v1/v2, ShuffleNet, SqueezeNet, AlexNet and ZFNet-512 with every large weight
replaced by ``ConstantOfShape(<name>__SHAPE) -> 0.02``: the real graph, but weights in
which every channel is the same, so folding, pruning or quantizing them exercises
nothing. This module swaps each such node for a real initializer of seeded random values:

Before:  W__SHAPE (initializer) -> ConstantOfShape(value=0.02) -> W -> Conv
After:   W (initializer, He-normal, rescaled per layer)       -> Conv

A tensor's role comes from the node that finally reads it, looking through Unsqueeze,
Reshape and the like (DenseNet/Inception v2 feed ``Unsqueeze -> Mul/Add`` scale layers):

- Conv/Gemm/MatMul weight: N(0, 2 / fan_in) (He-normal). fan_in = prod(shape[1:]) for
  Conv (C_in/group * kH * kW), shape[-1] for Gemm with transB=1, prod(shape[:-1]) else.
- Conv/Gemm bias: N(0, 0.01^2).
- BatchNormalization scale 1 + N(0, 0.1^2); bias and mean N(0, 0.1^2); var U(0.5, 1.5).
- Mul operand (scale layer) 1 + N(0, 0.1^2); Add operand (shift) N(0, 0.1^2).
- Anything else keeps the node's own fill value.

He-normal alone is not enough: a Conv not followed by Relu (ShuffleNet's depthwise and
projection convs, every bottleneck's last conv) doubles E[x^2], and residual sums add
up, so ShuffleNet reached |x| ~ 6e6 and ResNet-50 ~ 5e4. So each weight layer is then
rescaled LSUV-style (layer-sequential unit variance): its generated weight and bias are
multiplied by the power of two 2^-round(log2 rms) that brings its output RMS on a
seeded N(0, 1) input into [1/sqrt(2), sqrt(2)]. Layers are fixed in order of depth, one
onnxruntime run per depth (the generated tensors are fed as inputs, so no copy of the
model is made); a power of two keeps the scaling exact and the result immune to
rounding noise in the runs. The largest activations are then ~10 (ResNet-50, VGG-19)
and ~2e3 only at DenseNet's first BatchNormalization, whose shipped statistics are kept
(``python models/light.py --check`` prints each model's largest activation).

Values are seeded by crc32("<model>/<tensor>"), so a tensor's values do not depend on
the order of the others. The small tensors the light files already hold for real (some
biases, BN statistics, Reshape shapes) are kept as they are, and so is the IR 3 style:
each new initializer is also listed as a graph input.

Cache: ``<out>/<name>.onnx`` (default ``models/cache/``, gitignored) with a sidecar
``<name>.onnx.sha256`` (JSON: the recipe key, i.e. sha256 of the source file and
``RECIPE``, and the sha256 of the output). ``materialize`` reuses the cached file when
both still match. Written with plain ``onnx.save`` (VGG-19, the largest, is ~575 MB,
below protobuf's 2 GiB limit) to a temp file that is then renamed into place. Memory:
the generated arrays, then the ModelProto they are moved into one by one, then its
serialization (VGG-19 peaks at ~2 GB; building all nine takes ~4 min on 2 cores).

CLI: ``python models/light.py [names...] [--out DIR] [--check]`` (no names: all).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LIGHT = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"
CACHE = Path(__file__).resolve().parent / "cache"
RECIPE = "light-materialize v1"  # change when the generated values change
PASS_THROUGH = {"Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten", "Cast"}
ROLES = {  # (final consumer, input index) -> role; None index: any input
    ("Conv", 1): "weight", ("Gemm", 1): "weight", ("MatMul", 1): "weight",
    ("Conv", 2): "bias", ("Gemm", 2): "bias",
    ("BatchNormalization", 1): "scale", ("BatchNormalization", 2): "shift",
    ("BatchNormalization", 3): "shift", ("BatchNormalization", 4): "var",
    ("Mul", None): "scale", ("Add", None): "shift",
}


class UnknownModelError(LookupError):
    """A name that is not one of ``available()``."""


def available() -> list[str]:
    """Names of the light models the installed onnx ships (``resnet50``, ``vgg19``, ...)."""
    return sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))


def source(name: str) -> Path:
    """The ``light_<name>.onnx`` file of ``name`` (with or without the ``light_`` prefix).

    Raises:
        UnknownModelError: no such light model.
    """
    path = LIGHT / f"light_{name.removeprefix('light_')}.onnx"
    if not path.is_file():
        raise UnknownModelError(f"unknown light model {name!r}; known: {', '.join(available())}")
    return path


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    found = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            found[name].append((node, index))
    return found


def _final_use(name, consumers) -> tuple[onnx.NodeProto, int] | None:
    """The first node reading ``name`` other than a pass-through reshaping op, and the
    input index at which it reads it."""
    for _ in range(8):
        uses = consumers.get(name, [])
        if not uses:
            return None
        node, index = uses[0]
        if node.op_type not in PASS_THROUGH or index != 0:
            return node, index
        name = node.output[0]
    return None


def _role(use: tuple[onnx.NodeProto, int] | None) -> str:
    if use is None:
        return "fill"
    node, index = use
    return ROLES.get((node.op_type, index)) or ROLES.get((node.op_type, None)) or "fill"


def _fan_in(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    if node.op_type == "Conv":
        return int(np.prod(shape[1:]))
    return int(shape[-1]) if trans_b else int(np.prod(shape[:-1]))


def _values(seed_name: str, role: str, shape, fan_in: int, fill: np.ndarray) -> np.ndarray:
    """Seeded values for one tensor (float32, generated without a float64 copy)."""
    rng = np.random.default_rng(zlib.crc32(seed_name.encode()))
    if role == "var":
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if role == "fill":
        return np.full(shape, fill.reshape(-1)[0], fill.dtype)
    std = {"weight": np.sqrt(2.0 / max(fan_in, 1)), "bias": 0.01}.get(role, 0.1)
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    if role == "scale":
        values += np.float32(1.0)
    return values


@dataclass
class Made:
    """A generated tensor: its values, role and the node that finally reads it."""

    values: np.ndarray
    role: str
    reader: str | None  # first output name of that node


def _generate(model: onnx.ModelProto, name: str) -> dict[str, Made]:
    """Remove every ConstantOfShape fed by a shape initializer; return seeded values for
    its output, which becomes a graph input until ``_attach`` makes it an initializer."""
    graph = model.graph
    shapes = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    keep, made, gone = [], {}, set()
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            keep.append(node)
            continue
        gone.add(node.input[0])
        shape = tuple(int(d) for d in numpy_helper.to_array(shapes[node.input[0]]))
        use = _final_use(node.output[0], consumers)
        role = _role(use)
        fan_in = _fan_in(use[0], shape) if role == "weight" else 0
        values = _values(f"{name}/{node.output[0]}", role, shape, fan_in, _fill(node))
        made[node.output[0]] = Made(values, role, use[0].output[0] if use else None)
    _drop_shapes(graph, gone, keep)
    graph.input.extend(helper.make_tensor_value_info(
        out, helper.np_dtype_to_tensor_dtype(m.values.dtype), m.values.shape)
        for out, m in made.items())
    return made


def _fill(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
    return np.zeros(1, np.float32)  # the operator's default


def _drop_shapes(graph: onnx.GraphProto, gone: set[str], keep: list[onnx.NodeProto]) -> None:
    """Keep only ``keep`` nodes; drop the initializers (and inputs) named in ``gone``."""
    gone = gone - {name for node in keep for name in node.input}
    del graph.node[:]
    graph.node.extend(keep)
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in gone]
    del graph.input[:]
    graph.input.extend(inputs)


def _layers(graph: onnx.GraphProto, made: dict[str, Made]) -> dict[str, tuple[int, list[str]]]:
    """Weight layers: output name -> (depth in weight layers, generated tensors to scale).

    Layers of equal depth have no path between them, so one run can measure them all.
    """
    reads = defaultdict(list)
    for tensor, m in made.items():
        if m.role in ("weight", "bias") and m.reader is not None:
            reads[m.reader].append(tensor)
    depth: dict[str, int] = {}
    layers = {}
    for node in graph.node:
        level = max((depth.get(i, 0) for i in node.input), default=0)
        out = node.output[0]
        if any(made[t].role == "weight" for t in reads.get(out, [])):
            level += 1
            layers[out] = (level, reads[out])
        depth.update((o, level) for o in node.output)
    return layers


def _rescale(model: onnx.ModelProto, made: dict[str, Made], seed: int = 0) -> None:
    """LSUV-style: scale each weight layer's generated weight and bias by a power of two
    so that its output has RMS in [1/sqrt(2), sqrt(2)] on a seeded N(0, 1) input.

    Layers are fixed in order of depth, one onnxruntime run per depth; a power of two
    keeps the scaling exact and the result independent of rounding noise in the runs.
    """
    import onnxruntime as ort

    layers = _layers(model.graph, made)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # holds no generated tensor: those are fed as inputs
    probe.graph.output.extend(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
                              for out in layers)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {**_data_feed(model, made, seed), **{k: m.values for k, m in made.items()}}
    for level in range(1, max((d for d, _ in layers.values()), default=0) + 1):
        outs = [out for out, (d, _) in layers.items() if d == level]
        for out, y in zip(outs, session.run(outs, feed), strict=True):
            rms = float(np.sqrt(np.mean(np.square(y, dtype=np.float64))))
            if np.isfinite(rms) and rms > 0:
                for tensor in layers[out][1]:
                    made[tensor].values *= np.float32(2.0 ** -round(np.log2(rms)))


def _data_feed(model: onnx.ModelProto, made: dict[str, Made], seed: int) -> dict:
    inits = {t.name for t in model.graph.initializer} | set(made)
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value or 1 for d in
                                         i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input if i.name not in inits}


def _attach(model: onnx.ModelProto, made: dict[str, Made]) -> None:
    """Generated values become initializers (still graph inputs below IR 4, as in the
    original); each array is released once copied into the model."""
    for name in list(made):
        model.graph.initializer.append(numpy_helper.from_array(made.pop(name).values, name))
    if model.ir_version >= 4:
        inits = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(inputs)


def build(name: str) -> onnx.ModelProto:
    """The materialised ModelProto of light model ``name`` (not cached, not saved)."""
    name = name.removeprefix("light_")
    model = onnx.load(str(source(name)))
    made = _generate(model, name)
    _rescale(model, made)
    _attach(model, made)
    model.doc_string = f"light_{name} with seeded weights from onnxslim_cnn models/light.py"
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _recipe(name: str) -> str:
    return hashlib.sha256(f"{RECIPE}\n{_sha256(source(name))}".encode()).hexdigest()


def _cached(path: Path, recipe: str) -> bool:
    stamp = path.with_name(path.name + ".sha256")
    if not (path.is_file() and stamp.is_file()):
        return False
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return saved.get("recipe") == recipe and saved.get("sha256") == _sha256(path)


def materialize(name: str, out_dir: Path | None = None) -> Path:
    """Write (or reuse) ``<out_dir>/<name>.onnx`` with real seeded weights; returns its path.

    Raises:
        UnknownModelError: ``name`` is not one of ``available()``.
    """
    name = name.removeprefix("light_")
    out_dir = Path(out_dir) if out_dir is not None else CACHE
    path, recipe = out_dir / f"{name}.onnx", _recipe(name)
    if _cached(path, recipe):
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        onnx.save(build(name), tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stamp = {"recipe": recipe, "sha256": _sha256(path)}
    path.with_name(path.name + ".sha256").write_text(json.dumps(stamp) + "\n")
    return path


def activation_range(path: Path, seed: int = 0) -> tuple[float, bool]:
    """Largest |value| over every node's first output on a seeded N(0, 1) input, and
    whether all of them are finite (onnxruntime, basic optimizations off)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT,
                                                            None)
                              for n in model.graph.node if n.output[0] not in outputs)
    inits = {t.name for t in model.graph.initializer}
    real = next(i for i in model.graph.input if i.name not in inits)
    shape = [d.dim_value or 1 for d in real.type.tensor_type.shape.dim]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    del model
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    values = [v for v in session.run(None, {real.name: x}) if np.issubdtype(v.dtype, np.floating)]
    return max(float(np.abs(v).max()) for v in values), all(np.isfinite(v).all() for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models (default all): {available()}")
    parser.add_argument("--out", type=Path, default=CACHE, help="cache folder")
    parser.add_argument("--check", action="store_true",
                        help="run each model in onnxruntime and print its largest activation")
    args = parser.parse_args(argv)
    try:
        names = [source(n).stem.removeprefix("light_") for n in args.names] or available()
    except UnknownModelError as exc:
        parser.error(str(exc))
    for name in names:
        path = materialize(name, args.out)
        line = f"{path}  {path.stat().st_size / 2**20:.1f} MiB"
        if args.check:
            peak, finite = activation_range(path)
            line += f"  max|activation| {peak:.3g}  {'finite' if finite else 'NOT FINITE'}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
