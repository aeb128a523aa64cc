"""models/: the committed examples are reproducible, valid, runnable and have the
structure the passes and docs rely on; light models materialise deterministically."""

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import build, light

from .helpers import ROOT, feeds, op_counts, run

EXAMPLES = ROOT / "models" / "examples"
OUTPUTS = {  # name -> (output, shape at batch 3; resnet_block has a dynamic batch)
    "resnet_block": ("logits", (3, 10)),
    "mobilenet_block": ("logits", (1, 10)),
    "squeeze_block": ("prob", (1, 10, 1, 1)),
    "old_opset": ("logits", (1, 10)),
    "constant_weights": ("logits", (1, 10)),
}


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(EXAMPLES / f"{name}.onnx"))


def tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by name."""
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def live_tensors(model: onnx.ModelProto) -> set[str]:
    """Names from which a graph output can be reached."""
    producer = {out: node for node in model.graph.node for out in node.output}
    live, stack = set(), [o.name for o in model.graph.output]
    while stack:
        name = stack.pop()
        if name not in live:
            live.add(name)
            stack.extend(producer[name].input if name in producer else [])
    return live


def test_build_rerun_is_byte_identical_and_matches_committed(tmp_path):
    first = build.build(tmp_path / "a")
    second = build.build(tmp_path / "b")
    assert {p.name for p in first} == {p.name for p in EXAMPLES.glob("*.onnx")}
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
        assert a.read_bytes() == (EXAMPLES / a.name).read_bytes(), f"{a.name} is stale"


def test_build_cli_writes_every_example(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "models" / "build.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.stem for p in tmp_path.glob("*.onnx")) == sorted(OUTPUTS)


def test_examples_sizes_stay_small():
    sizes = {p.name: p.stat().st_size for p in EXAMPLES.glob("*.onnx")}
    assert max(sizes.values()) < 300_000, sizes
    assert sum(sizes.values()) < 1_000_000, sizes


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_example_checks_and_runs_with_finite_documented_output(name):
    model = load(name)
    onnx.checker.check_model(model, full_check=True)
    output, shape = OUTPUTS[name]
    got = run(model, feeds(model, seed=1, batch=3))
    assert list(got) == [output]
    assert got[output].shape == shape
    assert np.isfinite(got[output]).all()
    assert 0 < np.abs(got[output]).max() < 1e3


@pytest.mark.parametrize("name", ["resnet_block", "mobilenet_block", "old_opset",
                                  "constant_weights"])
def test_example_batchnorm_statistics_are_non_trivial(name):
    model = load(name)
    values = tensors(model)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert bns
    for bn in bns:
        scale, _, mean, var = (values[i] for i in bn.input[1:])
        assert np.all((var >= 0.5) & (var <= 1.5)), bn.name
        assert np.abs(scale - 1).max() > 0.01 and np.abs(mean).max() > 0.01, bn.name


def test_resnet_block_has_dynamic_batch_and_projection_shortcut():
    model = load("resnet_block")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert (model.opset_import[0].version, model.ir_version) == (13, 7)
    assert op_counts(model) == {"Conv": 6, "BatchNormalization": 6, "Relu": 5, "Add": 2,
                                "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    proj = next(n for n in model.graph.node if n.name == "block2.proj")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proj.attribute}
    assert attrs["kernel_shape"] == [1, 1] and attrs["strides"] == [2, 2]


def test_mobilenet_block_has_depthwise_relu6_and_same_padding():
    model = load("mobilenet_block")
    convs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in model.graph.node if n.op_type == "Conv"}
    values = tensors(model)
    assert convs["ir2.dw"]["pads"] == [0, 0, 1, 1] and convs["ir2.dw"]["strides"] == [2, 2]
    for name in ("ir1.dw", "ir2.dw", "ir3.dw"):
        assert convs[name]["group"] == values[f"{name}.W"].shape[0] > 1
        assert values[f"{name}.W"].shape[1] == 1
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert len(clips) == 7
    assert all(values[c.input[1]] == 0 and values[c.input[2]] == 6 for c in clips)
    assert op_counts(model)["Add"] == 2


def test_squeeze_block_is_opset9_fire_modules_with_softmax():
    model = load("squeeze_block")
    assert (model.opset_import[0].version, model.ir_version) == (9, 4)
    counts = op_counts(model)
    assert (counts["Concat"], counts["MaxPool"], counts["Dropout"]) == (3, 2, 1)
    assert [n.op_type for n in model.graph.node[-3:]] == ["Relu", "GlobalAveragePool",
                                                          "Softmax"]


def test_old_opset_is_ir3_opset7_with_initializers_as_inputs():
    model = load("old_opset")
    assert (model.opset_import[0].version, model.ir_version) == (7, 3)
    inits = {t.name for t in model.graph.initializer}
    assert len(inits) == 9
    assert inits <= {i.name for i in model.graph.input}
    assert {"Identity", "Dropout", "BatchNormalization"} <= set(op_counts(model))


def test_constant_weights_has_constants_duplicates_unused_and_dead_chain():
    model = load("constant_weights")
    constants = [n.output[0] for n in model.graph.node if n.op_type == "Constant"]
    assert {"conv1.W", "conv2.W", "fc.W", "head.W", "act1.min", "dead.scale"} <= set(constants)
    assert not {"conv1.W", "fc.W", "head.W"} & {t.name for t in model.graph.initializer}
    values = tensors(model)
    for a, b in (("fc.B", "fc_bn.B"), ("act1.min", "act2.min"), ("act1.max", "act2.max")):
        assert values[a].tobytes() == values[b].tobytes() and values[a].shape == values[b].shape
    assert not any("unused.W" in n.input for n in model.graph.node)
    live = live_tensors(model)
    dead = [n.op_type for n in model.graph.node if not set(n.output) & live]
    assert Counter(dead) == Counter({"Constant": 1, "Mul": 1, "Relu": 1})
    counts = op_counts(model)
    assert (counts["Gemm"], counts["MatMul"], counts["BatchNormalization"]) == (1, 1, 4)


def test_light_available_lists_the_shipped_architectures():
    names = light.available()
    assert {"resnet50", "vgg19", "densenet121", "squeezenet", "shufflenet"} <= set(names)
    with pytest.raises(light.UnknownModelError):
        light.materialize("no_such_net")


@pytest.fixture(scope="module")
def shufflenet(tmp_path_factory):
    return light.materialize("shufflenet", tmp_path_factory.mktemp("light"))


def test_light_materialize_replaces_every_constant_of_shape(shufflenet):
    original = onnx.load(str(light.source("shufflenet")))
    model = onnx.load(str(shufflenet))
    onnx.checker.check_model(model)
    assert "ConstantOfShape" not in op_counts(model)
    assert op_counts(original)["ConstantOfShape"] == 243
    made = [n.output[0] for n in original.graph.node if n.op_type == "ConstantOfShape"]
    values = tensors(model)
    inputs = {i.name for i in model.graph.input}
    assert set(made) <= set(values) and set(made) <= inputs  # IR 3 style kept
    assert not any(name.endswith("__SHAPE") for name in values)
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        assert values[bn.input[4]].min() > 0, bn.name
    weights = [values[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
    assert all(np.unique(w).size > w.size // 2 for w in weights)  # no constant fill left


def test_light_materialize_runs_with_finite_unsaturated_output(shufflenet):
    model = onnx.load(str(shufflenet))
    (prob,) = run(model, feeds(model, seed=2), optimization="all").values()
    assert prob.shape == (1, 1000) and np.isfinite(prob).all()
    np.testing.assert_allclose(prob.sum(), 1.0, rtol=1e-4)
    assert prob.max() < 0.5  # logits in a sane range: the softmax is not saturated


def test_light_materialize_is_deterministic_reuses_cache_rebuilds_tampered(tmp_path):
    path = light.materialize("light_squeezenet", tmp_path)
    stamp = path.stat().st_mtime_ns
    assert light.materialize("squeezenet", tmp_path).stat().st_mtime_ns == stamp
    good = path.read_bytes()
    path.write_bytes(good[:-10])
    assert light.materialize("squeezenet", tmp_path).read_bytes() == good  # same bytes again
    assert "ConstantOfShape" not in op_counts(onnx.load(str(path)))
