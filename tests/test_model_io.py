"""model_io: load and check, normalise, opset upgrade, atomic save with external data."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cnn import model_io
from onnxslim_cnn.errors import InvalidModelError, OutputError, UnsupportedModelError

from .helpers import SHARED_MODELS, feeds, make_model, op_counts, positive, rand, run

# x -> Conv -> Relu -> y, small enough to save in a few hundred bytes
CONV = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 4, 8, 8] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu (c)
}
"""


def conv_model() -> onnx.ModelProto:
    return make_model(CONV, {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1)})


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def assert_exact(before: onnx.ModelProto, after: onnx.ModelProto, seed: int = 0) -> None:
    feed = feeds(before, seed)
    ref, got = run(before, feed), run(after, feed)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)  # tolerance: 0


# --- normalize ----------------------------------------------------------------------

# Four Constant spellings feeding one chain; k is also a graph output.
#   x -> Add(k) -> Mul(f) -> Add(v) -> Mul(i as float) -> y
CONSTANTS = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 3] x) => (float[2, 3] y, float[3] k) {
    k = Constant <value = float[3] {1.5, -0.0, 2.25}> ()
    f = Constant <value_float = 0.5> ()
    v = Constant <value_floats = [1.0, 2.0, 3.0]> ()
    i = Constant <value_ints = [1, 2, 3]> ()
    a = Add (x, k)
    m = Mul (a, f)
    s = Add (m, v)
    c = Cast <to = 1> (i)
    y = Mul (s, c)
}
"""


def test_normalize_constants_become_initializers_exactly():
    model = make_model(CONSTANTS)
    before = model.SerializeToString()
    out, counts = model_io.normalize(model)
    assert counts == {"constant_nodes_to_initializers": 4, "initializer_inputs_dropped": 0}
    assert "Constant" not in op_counts(out)
    assert op_counts(out) == {"Add": 2, "Mul": 2, "Cast": 1}
    values = initializers(out)
    assert values["f"].shape == () and values["f"] == np.float32(0.5)
    assert values["i"].dtype == np.int64 and values["i"].tolist() == [1, 2, 3]
    assert np.signbit(values["k"][1])  # -0.0 copied bit for bit
    onnx.checker.check_model(out)
    assert_exact(model, out)
    assert model.SerializeToString() == before  # the input model is not touched


def test_normalize_ir3_initializer_inputs_dropped_exactly():
    # IR 3 style: every weight is also a graph input.
    text = """
    <ir_version: 3, opset_import: ["" : 8]>
    g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] b) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }
    """
    model = make_model(text, {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1)})
    out, counts = model_io.normalize(model)
    assert counts == {"constant_nodes_to_initializers": 0, "initializer_inputs_dropped": 2}
    assert [i.name for i in out.graph.input] == ["x"]
    assert out.ir_version >= 4 and len(out.graph.initializer) == 2
    onnx.checker.check_model(out)
    assert_exact(model, out)


def test_normalize_clean_model_unchanged():
    model = conv_model()
    out, counts = model_io.normalize(model)
    assert counts == {"constant_nodes_to_initializers": 0, "initializer_inputs_dropped": 0}
    assert out.SerializeToString() == model.SerializeToString()


# --- upgrade_opset ------------------------------------------------------------------

# An opset-7 CNN: Conv -> BatchNormalization -> Relu -> MaxPool -> Reshape -> Gemm -> Softmax
OPSET7_NET = """
<ir_version: 4, opset_import: ["" : 7]>
g (float[1, 3, 8, 8] x) => (float[1, 5] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    n = BatchNormalization <epsilon = 0.001> (c, s, t, m, v)
    r = Relu (n)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
    f = Reshape (p, shape)
    g = Gemm <transB = 1> (f, fw, fb)
    y = Softmax (g)
}
"""


def opset7_net() -> onnx.ModelProto:
    return make_model(OPSET7_NET, {
        "w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1), "s": rand((4,), 2),
        "t": rand((4,), 3), "m": rand((4,), 4), "v": positive((4,), 5),
        "shape": np.array([1, 64], dtype=np.int64), "fw": rand((5, 64), 6, 0.1),
        "fb": rand((5,), 7),
    })


def test_upgrade_opset_7_to_13_matches():
    model = opset7_net()
    out = model_io.upgrade_opset(model, 13)
    assert model_io.opset(model) == 7 and model_io.opset(out) == 13
    onnx.checker.check_model(out)
    assert op_counts(out)["BatchNormalization"] == 1 and op_counts(out)["Gemm"] == 1
    for seed in (0, 1):
        feed = feeds(model, seed)
        np.testing.assert_allclose(run(out, feed)["y"], run(model, feed)["y"],
                                   rtol=1e-6, atol=1e-7)


def test_upgrade_opset_already_there_returns_model():
    model = conv_model()
    assert model_io.upgrade_opset(model, 11) is model


def test_upgrade_opset_unconvertible_raises_unsupported():
    # Tile-1 (tiles, axis) has no adapter to Tile-6 in onnx's version converter.
    model = make_model("""
        <ir_version: 3, opset_import: ["" : 5]>
        g (float[2, 2] x, float t, int64 a) => (float[4, 2] y) { y = Tile (x, t, a) }
    """)
    with pytest.raises(UnsupportedModelError, match="cannot upgrade opset 5 -> 13"):
        model_io.upgrade_opset(model, 13)


def test_upgrade_opset_beyond_supported_raises_unsupported():
    with pytest.raises(UnsupportedModelError, match="newer than supported"):
        model_io.upgrade_opset(opset7_net(), model_io.MAX_OPSET + 1)


# --- save ---------------------------------------------------------------------------

def test_save_writes_loadable_model_without_leftovers(tmp_path):
    model = conv_model()
    written = model_io.save(model, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx"]
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert (tmp_path / "out.onnx").read_bytes() == model.SerializeToString()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "interrupt"])
def test_save_failure_mid_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, error):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous result")

    def fail(fd):  # the bytes are written, the flush to disk fails
        raise error
    monkeypatch.setattr(model_io.os, "fsync", fail)
    expected = OutputError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        model_io.save(conv_model(), target)
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert target.read_bytes() == b"previous result"


def test_save_missing_folder_raises_output_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        model_io.save(conv_model(), tmp_path / "nope" / "out.onnx")


def test_save_above_protobuf_limit_writes_external_data(tmp_path, monkeypatch):
    # conv_model's w (432 B) is too small for external data (tensors < 1 KB stay inline):
    # 16 output channels make it 1728 B.
    model = make_model(CONV.replace("float[1, 4, 8, 8] y", "float[1, 16, 8, 8] y"),
                       {"w": rand((16, 3, 3, 3), 0), "b": rand((16,), 1)})
    before = model.SerializeToString()
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 1000)  # the model is ~2 KB
    written = model_io.save(model, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx", tmp_path / "out.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    assert model.SerializeToString() == before  # the in-memory model is not mutated
    header = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    w = next(i for i in header.graph.initializer if i.name == "w")
    assert w.data_location == TensorProto.EXTERNAL and not w.raw_data
    assert {e.key: e.value for e in w.external_data}["location"] == "out.onnx.data"
    reloaded = onnx.load(tmp_path / "out.onnx")
    for name, value in initializers(model).items():
        np.testing.assert_array_equal(initializers(reloaded)[name], value)
    assert model_io.model_bytes(header) >= 4 * 16 * 3 * 3 * 3
    b = next(i for i in header.graph.initializer if i.name == "b")
    assert b.data_location == TensorProto.DEFAULT  # 64 B: stays in the protobuf


def test_save_above_limit_with_only_small_tensors_writes_one_file(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 200)
    written = model_io.save(conv_model(), tmp_path / "out.onnx")  # every tensor < 1 KB
    assert written == [tmp_path / "out.onnx"] and os.listdir(tmp_path) == ["out.onnx"]
    assert_exact(conv_model(), onnx.load(tmp_path / "out.onnx"))


# --- load ---------------------------------------------------------------------------

def test_load_with_external_data(tmp_path):
    model = conv_model()
    onnx.save(conv_model(), tmp_path / "ext.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.bin", size_threshold=0)
    loaded = model_io.load(tmp_path / "ext.onnx")
    for name, value in initializers(model).items():
        np.testing.assert_array_equal(initializers(loaded)[name], value)
    assert_exact(model, loaded)


@pytest.mark.parametrize("location", ["missing.bin", "../outside.bin"])
def test_load_bad_external_data_raises_invalid_model(tmp_path, location):
    onnx.save(conv_model(), tmp_path / "ext.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.bin", size_threshold=0)
    header = onnx.load(tmp_path / "ext.onnx", load_external_data=False)
    for tensor in header.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (tmp_path / "ext.onnx").write_bytes(header.SerializeToString())
    (tmp_path / "outside.bin").write_bytes((tmp_path / "ext.bin").read_bytes())
    with pytest.raises(InvalidModelError, match="not a readable ONNX model"):
        model_io.load(tmp_path / "ext.onnx")


def test_load_fp16_model_keeps_fp16(tmp_path):
    text = CONV.replace("float[", "float16[")
    model = make_model(text, {"w": rand((4, 3, 3, 3), 0, dtype=np.float16),
                              "b": rand((4,), 1, dtype=np.float16)})
    onnx.save(model, tmp_path / "fp16.onnx")
    loaded = model_io.load(tmp_path / "fp16.onnx")
    assert {v.dtype for v in initializers(loaded).values()} == {np.dtype(np.float16)}
    assert loaded.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert_exact(model, loaded)


def test_load_shared_fp16_squeezenet():
    path = SHARED_MODELS / "squeezenet1.1_caffe2_fp16" / "model.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    model = model_io.load(path)
    assert model_io.opset(model) == 7
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_load_model_without_nodes_raises_invalid_model(tmp_path):
    empty = helper.make_model(helper.make_graph([], "g", [], []))
    (tmp_path / "empty_graph.onnx").write_bytes(empty.SerializeToString())
    with pytest.raises(InvalidModelError, match="no graph or no nodes"):
        model_io.load(tmp_path / "empty_graph.onnx")


# --- a real > 2 GiB model (opt-in: writes ~4.3 GB, needs ~6 GB RAM) -------------------

BIG_BYTES = 2**31 + 4096  # just past the protobuf limit
MARKS = {0: 1.5, (BIG_BYTES // 4) // 2: -2.5, BIG_BYTES // 4 - 1: 3.5}  # index -> value


def _big_model(folder) -> onnx.ModelProto:
    """``y = Gather(w, i)`` with w a sparse external file of zeros and three marks."""
    count = BIG_BYTES // 4
    with open(folder / "big.onnx.data", "wb") as handle:
        handle.truncate(BIG_BYTES)  # sparse: costs no disk until written
        for index, value in MARKS.items():
            handle.seek(4 * index)
            handle.write(np.float32(value).tobytes())
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[count],
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "big.onnx.data"), ("offset", "0"),
                       ("length", str(BIG_BYTES))):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "i"], ["y"])], "big",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _read_floats(path, offset: int, indices) -> list[float]:
    with open(path, "rb") as handle:
        values = []
        for index in indices:
            handle.seek(offset + 4 * index)
            values.append(float(np.frombuffer(handle.read(4), dtype=np.float32)[0]))
    return values


@pytest.mark.skipif(os.environ.get("ONNXSLIM_CNN_BIG_TESTS") != "1",
                    reason="opt-in: set ONNXSLIM_CNN_BIG_TESTS=1 "
                    "(writes ~4.3 GB, ~6.5 GB RAM, ~1.5 min)")
def test_save_real_model_over_2gib_round_trips(tmp_path):
    if shutil.disk_usage(tmp_path).free < 6 * 2**30:
        pytest.skip("needs 6 GB of free disk")
    (tmp_path / "big.onnx").write_bytes(_big_model(tmp_path).SerializeToString())
    model = model_io.load(tmp_path / "big.onnx")
    assert model_io.needs_external_data(model)
    written = model_io.save(model, tmp_path / "slim.onnx")
    del model
    assert written == [tmp_path / "slim.onnx", tmp_path / "slim.onnx.data"]
    header = onnx.load(tmp_path / "slim.onnx", load_external_data=False)
    entries = {e.key: e.value for e in header.graph.initializer[0].external_data}
    assert entries["location"] == "slim.onnx.data" and int(entries["length"]) == BIG_BYTES
    got = _read_floats(tmp_path / "slim.onnx.data", int(entries.get("offset", 0)), MARKS)
    assert got == list(MARKS.values())
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data", "slim.onnx",
                                            "slim.onnx.data"]


# --- large models: shape inference without weights, checker and sessions from files ----

# x -> Conv(w: 16*3*3*3 floats, above STUB_BYTES) -> Reshape(shape: a small constant
# shape inference must read) -> y
RESHAPE_NET = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 3, 8, 8] x) => (float[1, 1024] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Reshape (c, shape)
}
"""


def reshape_net() -> onnx.ModelProto:
    return make_model(RESHAPE_NET, {"w": rand((16, 3, 3, 3), 0), "b": rand((16,), 1),
                                    "shape": np.array([1, 1024], dtype=np.int64)})


def test_infer_value_info_without_weights_matches_full_inference():
    model = reshape_net()
    before = model.SerializeToString()
    full = onnx.shape_inference.infer_shapes(model).graph.value_info
    light = model_io.infer_value_info(model)
    assert model.graph.initializer[0].ByteSize() > model_io.STUB_BYTES  # w was stubbed
    assert [v.SerializeToString() for v in light] == [v.SerializeToString() for v in full]
    assert {v.name for v in light} == {"c"}
    assert model.SerializeToString() == before  # the model itself is untouched


def test_infer_value_info_uninferable_model_returns_empty():
    model = reshape_net()
    model.graph.node[1].op_type = "NoSuchOp"
    model.graph.node[1].domain = "custom.domain"
    assert model_io.infer_value_info(model) == []


def test_check_large_model_through_file_same_verdicts(monkeypatch):
    monkeypatch.setattr(model_io, "SPILL_BYTES", 0)
    model = conv_model()
    assert model_io.is_large(model)
    model_io.check(model)
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(InvalidModelError, match="checker"):
        model_io.check(model)


def test_runner_large_model_through_file_same_outputs(monkeypatch):
    from onnxslim_cnn import validate

    model = conv_model()
    feed = feeds(model, 3)
    ref = run(model, feed)
    monkeypatch.setattr(model_io, "SPILL_BYTES", 0)
    runner = validate.Runner(model, "disable")
    try:
        got = runner.run_batch(feed)
    finally:
        runner.close()
    np.testing.assert_array_equal(got["y"], ref["y"])  # same model, same kernels: exact


def test_normalize_in_place_same_result_without_copy():
    model = make_model(CONSTANTS)
    copy, counts = model_io.normalize(model)
    same, counts_in_place = model_io.normalize(model, in_place=True)
    assert same is model and counts_in_place == counts
    assert same.SerializeToString() == copy.SerializeToString()
