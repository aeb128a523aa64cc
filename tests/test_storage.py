"""storage: exact decodes under onnxruntime, folding at session creation, bytes stored.

Decodes are compared bit for bit (tolerance 0) except where a float product is
involved, where the tolerance is stated at the assertion.
"""

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from onnxslim_cnn import storage
from onnxslim_cnn.errors import PreconditionError, UsageError
from onnxslim_cnn.manager import export_graph, import_graph
from onnxslim_cnn.passes.base import PassContext, taken_names
from onnxslim_cnn.passes.dedup_initializers import DedupInitializers
from onnxslim_cnn.passes.fold_constants import FoldConstants

from .helpers import feeds, make_model, op_counts, rand, run

SHAPE = (5, 4, 3, 3)  # 180 elements: not a multiple of 8, so the Slice path is exercised
DECODE_OPS = {"BitShift", "Mod", "Reshape", "Slice", "Cast", "Add", "Gather", "CumSum", "Mul",
              "Concat", "DequantizeLinear"}
LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def conv_text(opset=13, ir=8):
    # x[1,4,6,6] -> Conv(w[5,4,3,3]) -> y[1,5,4,4]
    return f"""
    <ir_version: {ir}, opset_import: ["" : {opset}]>
    g (float[1, 4, 6, 6] x) => (float[1, 5, 4, 4] y) {{
        y = Conv (x, w)
    }}
    """


def export(graph):
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return export_graph(graph, onnx.ModelProto())


def decode_alone(opset, build):
    """Model whose only output is the tensor ``build(graph)`` decodes (no inputs)."""
    graph = gs.Graph(opset=opset)
    encoded = build(graph)
    graph.outputs = [encoded.tensor]
    model = export(graph)
    return run(model, {})[encoded.tensor.name], encoded


def encode_conv(dense_w, encode, opset=13, ir=8):
    """(model with w, model with w encoded by ``encode(graph, const)``, Encoded)."""
    model = make_model(conv_text(opset, ir), {"w": dense_w})
    graph = import_graph(model)
    const = graph.tensors()["w"]
    encoded = encode(graph, const)
    assert storage.replace_with(graph, const, encoded) == 1
    return model, export_graph(_cleaned(graph), model), encoded


def _cleaned(graph):
    return graph.cleanup(remove_unused_graph_inputs=False).toposort()


def optimized_ops(model, level, tmp_path):
    path = tmp_path / f"optimized_{level}.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(path)))


def assert_conv_same(reference, encoded_model, atol):
    feed = feeds(reference, seed=3, batch=1)
    np.testing.assert_allclose(run(encoded_model, feed, "all")["y"],
                               run(reference, feed, "all")["y"], rtol=0, atol=atol)


def cluster(seed, bits, channels=None):
    rng = np.random.default_rng(seed)
    k = 1 << bits
    codebook = rng.standard_normal((k,) if channels is None else (channels, k))
    return rng.integers(0, k, SHAPE), codebook.astype(np.float32)


def plane_bytes(count, bits):
    """pack_bits' size: each bit plane holds 8 / width values per byte."""
    return sum(math.ceil(count / (8 // width)) for width in storage.PLANES[bits])


def sparse_weight(seed, density=0.4):
    rng = np.random.default_rng(seed)
    return np.where(rng.random(SHAPE) < density, rand(SHAPE, seed + 1), 0).astype(np.float32)


# -- 1. exact decodes -----------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_every_width_odd_lengths_round_trips(bits):
    rng = np.random.default_rng(bits)
    for length in (1, 7, 13, 101):
        values = rng.integers(0, 1 << bits, length)
        packed = storage.pack_bits(values, bits)
        assert packed.dtype == np.uint8 and packed.size == plane_bytes(length, bits)
        assert packed.size <= math.ceil(length * bits / 8) + len(storage.PLANES[bits]) - 1
        assert np.array_equal(storage.unpack_bits(packed, bits, length), values)


def test_pack_bits_layout_is_planar():
    # one byte per row, slot r of byte j holds element r*rows + j, slot 0 in the low bits
    assert storage.pack_bits([1, 2, 3], 2).tolist() == [0b00_11_10_01]
    assert storage.pack_bits([1, 0, 0, 1, 1], 4).tolist() == [0x11, 0x10, 0x00]
    # 3 bits = a 2-bit plane of bits 2..1 (2, 3, 3), then a 1-bit plane of bit 0 (1, 0, 1)
    assert storage.pack_bits([5, 6, 7], 3).tolist() == [0b00_11_11_10, 0b101]


def test_pack_bits_value_too_wide_raises():
    with pytest.raises(UsageError):
        storage.pack_bits([4], 2)
    with pytest.raises(UsageError):
        storage.pack_bits([0], 9)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", range(1, 9))
def test_codebook_decode_every_width_equals_lookup_exactly(bits, per_channel):
    indices, codebook = cluster(bits, bits, SHAPE[0] if per_channel else None)
    got, encoded = decode_alone(14, lambda g: storage.encode_codebook(
        g, "w", indices, codebook, bits, per_channel_axis=0 if per_channel else None))
    rows = np.arange(SHAPE[0]).reshape(-1, 1, 1, 1)
    want = codebook[rows, indices] if per_channel else codebook[indices]
    assert np.array_equal(got, want)
    assert encoded.min_opset == (11 if bits in (1, 2, 4, 8) else 14)
    assert encoded.encoding == f"codebook{bits}"
    # stored = bit planes + codebook (+ channel offsets) + < 100 B of small constants
    payload = plane_bytes(indices.size, bits) + codebook.nbytes + 4 * SHAPE[0] * per_channel
    assert payload <= encoded.stored_bytes < payload + 100 < encoded.file_bytes


def test_codebook_per_channel_inner_axis_equals_lookup_exactly():
    indices, codebook = cluster(11, 3, SHAPE[1])
    got, _ = decode_alone(14, lambda g: storage.encode_codebook(
        g, "w", indices, codebook, 3, per_channel_axis=1))
    assert np.array_equal(got, codebook[np.arange(SHAPE[1]).reshape(1, -1, 1, 1), indices])


@pytest.mark.parametrize("axis", [0, 1])
def test_codebook_scaled_per_channel_equals_lookup_times_scale_exactly(axis):
    indices, codebook = cluster(12, 4)
    scale = np.random.default_rng(3).uniform(0.01, 2, SHAPE[axis]).astype(np.float32)
    got, encoded = decode_alone(14, lambda g: storage.encode_codebook(
        g, "w", indices, codebook, 4, per_channel_axis=axis, channel_scale=scale))
    view = [1, 1, 1, 1]
    view[axis] = -1
    assert np.array_equal(got, codebook[indices] * scale.reshape(view))  # float32 product
    payload = plane_bytes(indices.size, 4) + codebook.nbytes + scale.nbytes  # no offsets
    assert payload <= encoded.stored_bytes < payload + 100
    with pytest.raises(UsageError):  # the scale must match the channel axis
        storage.encode_codebook(gs.Graph(opset=14), "w", indices, codebook, 4,
                                per_channel_axis=axis, channel_scale=scale[:2])


def test_codebook_bad_input_declines():
    indices, codebook = cluster(0, 2)
    graph = gs.Graph(opset=13)
    with pytest.raises(UsageError):
        storage.encode_codebook(graph, "w", indices + 4, codebook, 2)
    with pytest.raises(UsageError):  # 4 entries do not fit 1 bit
        storage.encode_codebook(graph, "w", indices, codebook, 1)
    with pytest.raises(PreconditionError):
        storage.encode_codebook(gs.Graph(opset=10), "w", indices, codebook, 2)
    with pytest.raises(PreconditionError, match="opset 14"):
        storage.encode_codebook(gs.Graph(opset=13), "w", indices, codebook, 3)
    assert graph.nodes == []


def test_sparse_decode_zeros_exact_and_values_exact():
    weight = sparse_weight(0)
    got, encoded = decode_alone(13, lambda g: storage.encode_sparse(g, "w", weight))
    assert np.array_equal(got, weight)
    nnz = int(np.count_nonzero(weight))
    payload = math.ceil(weight.size / 8) + 4 * nnz
    assert payload <= encoded.stored_bytes < payload + 100 and encoded.min_opset == 11


def test_sparse_with_codebook_values_decodes_exactly():
    indices, codebook = cluster(5, 3)
    keep = np.random.default_rng(6).random(SHAPE) < 0.3
    weight = np.where(keep, codebook[indices], 0).astype(np.float32)
    encoder = storage.codebook_values(codebook, 3)
    got, encoded = decode_alone(14, lambda g: storage.encode_sparse(
        g, "w", weight, values_encoder=encoder))
    assert np.array_equal(got, weight)
    assert encoded.encoding == "sparse+codebook3" and encoded.min_opset == 14
    graph = gs.Graph(opset=13)  # too old for the 3-bit codebook: nothing is added
    with pytest.raises(PreconditionError):
        storage.encode_sparse(graph, "w", weight, values_encoder=encoder)
    assert graph.nodes == []


def test_sparse_with_int8_values_keeps_zeros_exact():
    weight = sparse_weight(7)
    got, encoded = decode_alone(13, lambda g: storage.encode_sparse(
        g, "w", weight, values_encoder=storage.int_values(8)))
    assert np.array_equal(got == 0, weight == 0)
    q, scale = storage.quantize_symmetric(weight[weight != 0], 8, axis=None)
    # tolerance 0: Cast + Mul computes the same float32 product as numpy
    assert np.array_equal(got[weight != 0], q.astype(np.float32) * scale)
    assert encoded.encoding == "sparse+int8-float"


@pytest.mark.parametrize("decode", ["dq", "float"])
@pytest.mark.parametrize("axis", [0, None])
@pytest.mark.parametrize("bits", [8, 4])
def test_int_decode_equals_q_times_scale(bits, axis, decode):
    weight = rand(SHAPE, 2)
    const = gs.Constant("w", weight)
    got, encoded = decode_alone(
        21, lambda g: storage.encode_int(g, const, bits, axis, decode=decode))
    q, scale = storage.quantize_symmetric(weight, bits, axis)
    view = (-1, 1, 1, 1) if axis == 0 else ()
    # tolerance 0: one float32 product (q - 0) * s, the same as numpy's
    assert np.array_equal(got, q.astype(np.float32) * scale.reshape(view))
    assert np.abs(q).max() == 2 ** (bits - 1) - 1
    int8_opset = {"float": 7, "dq": 13 if axis == 0 else 10}[decode]
    assert encoded.min_opset == (21 if bits == 4 else int8_opset)


def test_int_precomputed_values_and_zero_channel():
    q = np.zeros(SHAPE, np.int8)
    q[1:] = np.random.default_rng(1).integers(-8, 8, (4, 4, 3, 3))
    scale = np.array([1.0, 0.5, 0.25, 2.0, 0.1], np.float32)
    got, _ = decode_alone(21, lambda g: storage.encode_int_values(g, "w", q, scale, 4, 0))
    assert np.array_equal(got, q * scale.reshape(-1, 1, 1, 1)) and not got[0].any()
    _, zero_scale = storage.quantize_symmetric(np.zeros(SHAPE), 8, 0)
    assert np.array_equal(zero_scale, np.ones(SHAPE[0], np.float32))


def test_int4_below_opset_21_declines():
    graph = gs.Graph(opset=13)
    with pytest.raises(PreconditionError, match="opset 21"):
        storage.encode_int(graph, gs.Constant("w", rand(SHAPE, 0)), 4)
    with pytest.raises(UsageError):
        storage.encode_int_values(graph, "w", np.full(SHAPE, 9, np.int8),
                                  np.ones(5, np.float32), 4)
    assert graph.nodes == []


# -- 2. a Conv reading an encoded weight: same outputs, decode folded at load -------

def _codebook(graph, const):
    indices, codebook = cluster(1, 4)
    return storage.encode_codebook(graph, const.name, indices, codebook, 4), codebook[indices]


def _codebook_per_channel(graph, const):
    indices, codebook = cluster(2, 3, SHAPE[0])
    dense = codebook[np.arange(SHAPE[0]).reshape(-1, 1, 1, 1), indices]
    encoded = storage.encode_codebook(graph, const.name, indices, codebook, 3,
                                      per_channel_axis=0)
    return encoded, dense


def _sparse(graph, const):
    weight = sparse_weight(3)
    return storage.encode_sparse(graph, const.name, weight), weight


def _sparse_codebook(graph, const):
    indices, codebook = cluster(4, 4)
    keep = np.random.default_rng(5).random(SHAPE) < 0.3
    weight = np.where(keep, codebook[indices], 0).astype(np.float32)
    encoder = storage.codebook_values(codebook, 4)
    return storage.encode_sparse(graph, const.name, weight, values_encoder=encoder), weight


def _int(bits, decode):
    def encode(graph, const):
        q, scale = storage.quantize_symmetric(const.values, bits, 0)
        dense = q.astype(np.float32) * scale.reshape(-1, 1, 1, 1)
        return storage.encode_int(graph, const, bits, 0, decode=decode), dense
    return encode


# name -> (encoder, opset): int4 needs opset 21 (IR 10)
FOLDED = {"codebook4": (_codebook, 13), "codebook3-per-channel": (_codebook_per_channel, 14),
          "sparse": (_sparse, 13), "sparse+codebook4": (_sparse_codebook, 13),
          "int8-float": (_int(8, "float"), 13),
          "int4-float": (_int(4, "float"), 21)}
KEPT = {"int8-dq": (_int(8, "dq"), 13), "int4-dq": (_int(4, "dq"), 21)}


def _conv_pair(make, opset=13):
    dense = {}

    def encode(graph, const):
        encoded, dense["w"] = make(graph, const)
        return encoded

    ir = 10 if opset >= 21 else 8
    _, model, encoded = encode_conv(rand(SHAPE, 9), encode, opset, ir)
    reference = make_model(conv_text(opset, ir), {"w": dense["w"]})
    return reference, model, encoded


@pytest.mark.parametrize("name", sorted(FOLDED))
def test_conv_encoded_weight_folds_at_load_and_matches(name, tmp_path):
    reference, model, encoded = _conv_pair(*FOLDED[name])
    assert op_counts(model)["Conv"] == 1 and len(model.graph.node) > 1
    assert_conv_same(reference, model, atol=1e-5)  # same weights, conv kernels may differ
    for level in LEVELS:
        ops = optimized_ops(model, level, tmp_path)
        assert ops.get("Conv") == 1, (level, ops)
        assert not DECODE_OPS & set(ops), f"{level}: decode left in {ops}"


def test_int8_float_decode_of_a_float16_weight_folds_at_load(tmp_path):
    # onnxruntime has no float16 Mul on CPU: a float16 Cast+Mul decode would stay in the
    # graph and run every inference; it decodes in float32 and casts at the end instead
    weight = rand(SHAPE, 4).astype(np.float16)
    got, _ = decode_alone(13, lambda g: storage.encode_int(g, gs.Constant("w", weight), 8, 0,
                                                            decode="float"))
    q, scale = storage.quantize_symmetric(weight, 8, 0)
    # the scale is stored as float16 values (the weight's dtype), the product rounded once
    want = q.astype(np.float32) * scale.astype(np.float16).astype(np.float32).reshape(
        -1, 1, 1, 1)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want.astype(np.float16))  # tolerance 0
    text = conv_text().replace("float[", "float16[")
    graph = import_graph(make_model(text, {"w": weight}))
    const = graph.tensors()["w"]
    storage.replace_with(graph, const, storage.encode_int(graph, const, 8, 0, decode="float"))
    model = export_graph(_cleaned(graph), make_model(text, {"w": weight}))
    for level in LEVELS:
        ops = optimized_ops(model, level, tmp_path)
        assert "Mul" not in ops and ops.get("Conv", 0) + ops.get("FusedConv", 0) == 1, \
            (level, ops)


def _float16_conv(weight, encode):
    """(float16 Conv model reading ``encode(graph, const)``, Encoded)."""
    text = conv_text(14).replace("float[", "float16[")
    graph = import_graph(make_model(text, {"w": weight}))
    const = graph.tensors()["w"]
    encoded = encode(graph, const)
    storage.replace_with(graph, const, encoded)
    return export_graph(_cleaned(graph), make_model(text, {"w": weight})), encoded


@pytest.mark.parametrize("axis", [0, 1])
def test_scaled_codebook_of_a_float16_weight_multiplies_in_float32_and_folds(axis, tmp_path):
    # a float16 Mul would not fold (onnxruntime has none on CPU): float32 table and
    # product, one Cast(to=FLOAT16) at the end
    indices, codebook = cluster(12, 4)
    book = codebook.astype(np.float16)  # a float16 weight's entries
    scale = np.random.default_rng(3).uniform(0.01, 2, SHAPE[axis]).astype(np.float32)
    view = [1, 1, 1, 1]
    view[axis] = -1
    # float32 product of float32 values, rounded once to float16
    want = (book.astype(np.float32)[indices] * scale.reshape(view)).astype(np.float16)
    model, encoded = _float16_conv(want, lambda g, c: storage.encode_codebook(
        g, c.name, indices, book, 4, per_channel_axis=axis, channel_scale=scale,
        dtype=np.float16))
    assert [n.op_type for n in model.graph.node][-3:] == ["Mul", "Cast", "Conv"]
    assert encoded.dense_bytes == want.nbytes
    got = storage.decoded_values([encoded.tensor], 14)[0]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)  # tolerance 0
    dense = make_model(conv_text(14).replace("float[", "float16["), {"w": want})
    for level in LEVELS:
        assert optimized_ops(model, level, tmp_path) == optimized_ops(dense, level, tmp_path)
    found = storage.find_codebook(import_graph(model).nodes[-1].inputs[1])
    assert found is not None and found.cast is not None and found.mul is not None


def test_int8_dq_decode_of_a_float16_weight_is_valid_below_opset_19():
    # DequantizeLinear takes a float16 scale from opset 19 only: float32 scale, then Cast
    weight = rand(SHAPE, 6).astype(np.float16)
    model, encoded = _float16_conv(weight, lambda g, c: storage.encode_int(
        g, c, 8, 0, decode="dq"))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Cast", "Conv"]
    assert encoded.dense_bytes == weight.nbytes
    got = storage.decoded_values([encoded.tensor], 14)[0]
    q, scale = storage.quantize_symmetric(weight, 8, 0)
    # the scale holds float16 values (the weight's dtype), the product rounded once
    want = q.astype(np.float32) * scale.astype(np.float16).astype(np.float32).reshape(
        -1, 1, 1, 1)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want.astype(np.float16))  # tolerance 0


@pytest.mark.parametrize("name", sorted(KEPT))
def test_conv_lone_dequantize_is_kept_by_onnxruntime(name, tmp_path):
    # Measured, by design of onnxruntime: DequantizeLinear is never constant-folded
    # (QDQ fusion needs it). Without activation Q/DQ it stays and runs every inference.
    reference, model, _ = _conv_pair(*KEPT[name])
    assert_conv_same(reference, model, atol=1e-5)
    for level in LEVELS:
        ops = optimized_ops(model, level, tmp_path)
        assert ops == {"DequantizeLinear": 1, "Conv": 1}, (level, ops)


def test_fold_constants_pass_leaves_decode_alone():
    _, model, _ = _conv_pair(_codebook)
    graph = import_graph(model)
    result = FoldConstants().run(graph, PassContext())
    after = export(graph)
    assert op_counts(after) == op_counts(model)
    assert not result.changed and any("decode" in reason for reason in result.declined)


def test_encoder_names_are_tagged_and_deterministic():
    _, first, _ = _conv_pair(_sparse)
    _, second, _ = _conv_pair(_sparse)
    names = [n.name for n in first.graph.node if n.op_type != "Conv"]
    assert names == [n.name for n in second.graph.node if n.op_type != "Conv"]
    assert all(name.startswith(f"w/{storage.DECODE_TAG}/") for name in names)
    assert len(set(names)) == len(names)


def test_replace_with_rewires_every_consumer():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 6, 6] x) => (float[1, 5, 4, 4] y, float[1, 5, 4, 4] z) {
        y = Conv (x, w)
        z = Conv (x, w)
    }
    """
    indices, codebook = cluster(4, 2)
    model = make_model(text, {"w": codebook[indices]})
    graph = import_graph(model)
    const = graph.tensors()["w"]
    encoded = storage.encode_codebook(graph, "w", indices, codebook, 2, taken=taken_names(graph))
    assert storage.replace_with(graph, const, encoded) == 2
    out = export(graph)
    assert "w" not in {i.name for i in out.graph.initializer}
    feed = feeds(model, seed=1, batch=1)
    ref, got = run(model, feed), run(out, feed)
    for name in ("y", "z"):  # tolerance 0: the decoded weight is bit-identical
        assert np.array_equal(got[name], ref[name])


# -- 3. int8 codebook -> DequantizeLinear -> Conv between activation Q/DQ ------------

QDQ_CONV = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1, 4, 6, 6] x) => (float[1, 5, 4, 4] y) {
    xq = QuantizeLinear (x, xs, xz)
    xd = DequantizeLinear (xq, xs, xz)
    c = Conv (xd, w)
    cq = QuantizeLinear (c, ys, yz)
    y = DequantizeLinear (cq, ys, yz)
}
"""


def test_int8_codebook_dequantize_fuses_into_qlinearconv(tmp_path):
    # x -> Q -> DQ -> Conv(DQ(Gather(codebook_i8, unpack(idx)), s)) -> Q -> DQ -> y
    rng = np.random.default_rng(0)
    # |w| <= 63 (7 bits, as onnxruntime's quantizer's reduce_range): the u8 x s8 AVX2
    # kernel sums pairs of products in int16, which saturates with full-range weights
    codebook = (np.arange(-8, 8) * 7).astype(np.int8)
    indices = rng.integers(0, 16, SHAPE)
    scale = rng.uniform(0.002, 0.01, SHAPE[0]).astype(np.float32)
    acts = {"xs": np.float32(0.03), "xz": np.uint8(128), "ys": np.float32(0.05),
            "yz": np.uint8(128)}
    dense = codebook[indices].astype(np.float32) * scale.reshape(-1, 1, 1, 1)
    reference = make_model(QDQ_CONV, {"w": dense, **acts})
    graph = import_graph(reference)
    const = graph.tensors()["w"]
    coded = storage.encode_codebook(graph, "w", indices, codebook, 4)
    encoded = storage.dequantize(graph, coded, scale, axis=0)
    storage.replace_with(graph, const, encoded)
    model = export(graph)
    assert encoded.encoding == "codebook4+dq" and encoded.min_opset == 13
    assert encoded.dense_bytes == dense.nbytes
    ops = optimized_ops(model, "all", tmp_path)
    assert ops.get("QLinearConv") == 1 and not {"Gather", "Conv"} & set(ops), ops
    feed = feeds(reference, seed=2, batch=1)
    # The reference runs unoptimized: at level BASIC and up onnxruntime quantizes a float
    # weight between activation Q/DQ itself (its own scale), so it is no reference there.
    # Tolerance one output quantization step (ys = 0.05): both round Conv's output once.
    np.testing.assert_allclose(run(model, feed, "all")["y"], run(reference, feed)["y"],
                               rtol=0, atol=0.05 + 1e-6)


# -- sparse initializer, chooser, int4 export ---------------------------------------

def test_best_sparse_picks_the_smaller_measured_encoding():
    rng = np.random.default_rng(0)
    big = (64, 64, 3, 3)
    for density, expected in ((0.5, "sparse"), (0.005, "sparse-initializer")):
        weight = np.where(rng.random(big) < density, rng.standard_normal(big), 0)
        weight = weight.astype(np.float32)
        graph = gs.Graph(opset=13)
        chosen = storage.best_sparse(graph, "w", weight)
        bitmask = storage.encode_sparse(gs.Graph(opset=13), "w", weight)
        marked = storage.mark_sparse_initializer(gs.Graph(opset=13), "w", weight)
        assert chosen.encoding == expected
        assert chosen.file_bytes == min(bitmask.file_bytes, marked.file_bytes)


def test_sparse_initializer_matches_and_is_stored_sparse():
    weight = sparse_weight(4, density=0.01)
    model, marked, encoded = encode_conv(
        weight, lambda g, c: storage.mark_sparse_initializer(g, c.name, c.values))
    out = storage.to_sparse_initializers(marked)
    onnx.checker.check_model(out)
    assert len(out.graph.sparse_initializer) == 1 and not out.graph.initializer
    sparse = out.graph.sparse_initializer[0]
    assert sparse.indices.data_type == onnx.TensorProto.INT64
    assert sparse.ByteSize() == encoded.stored_bytes < weight.nbytes
    feed = feeds(model, seed=1, batch=1)
    assert np.array_equal(run(out, feed)["y"], run(model, feed)["y"])  # same weight: exact


def test_int4_survives_a_pass_that_reads_values():
    # dedup-initializers reads every constant's values; graphsurgeon then exports int4
    # unpacked (invalid) unless protect_int4 re-packs it
    _, model, _ = _conv_pair(*KEPT["int4-dq"])
    graph = import_graph(model)
    DedupInitializers().run(graph, PassContext())
    assert storage.protect_int4(graph) == 2  # q and zero point
    out = export(graph)
    onnx.checker.check_model(out)
    feed = feeds(model, seed=1, batch=1)
    assert np.array_equal(run(out, feed)["y"], run(model, feed)["y"])


# -- 4. file size -------------------------------------------------------------------

def test_file_size_256x256x3x3_codebook4_is_an_eighth():
    shape = (256, 256, 3, 3)
    rng = np.random.default_rng(0)
    indices, codebook = rng.integers(0, 16, shape), rng.standard_normal(16).astype(np.float32)
    dense = codebook[indices]
    graph = gs.Graph(opset=13)
    encoded = storage.encode_codebook(graph, "w", indices, codebook, 4)
    graph.outputs = [encoded.tensor]
    file_bytes = export(graph).ByteSize()
    assert encoded.dense_bytes == dense.nbytes == 2_359_296
    assert dense.nbytes / 8 + 64 <= encoded.stored_bytes < dense.nbytes / 8 + 64 + 100
    assert encoded.file_bytes <= file_bytes < encoded.file_bytes + 200
    int4 = storage.encode_int(gs.Graph(opset=21), gs.Constant("w", dense), 4)
    int8 = storage.encode_int(gs.Graph(opset=13), gs.Constant("w", dense), 8)
    assert int4.stored_bytes == dense.size // 2 + 256 * 4 + 256 // 2
    assert int8.stored_bytes == dense.size + 256 * 4 + 256
    # 10% nonzero: 1-bit mask + values (fp32, or 4-bit codebook indices)
    sparse = np.where(rng.random(shape) < 0.1, dense, 0).astype(np.float32)
    nnz = np.count_nonzero(sparse)
    raw = storage.encode_sparse(gs.Graph(opset=13), "w", sparse)
    coded = storage.encode_sparse(gs.Graph(opset=13), "w", sparse,
                                  values_encoder=storage.codebook_values(codebook, 4))
    assert dense.size / 8 + 4 * nnz <= raw.stored_bytes < dense.size / 8 + 4 * nnz + 100
    coded_payload = dense.size / 8 + math.ceil(nnz / 2) + 64
    assert coded_payload <= coded.stored_bytes < coded_payload + 200
