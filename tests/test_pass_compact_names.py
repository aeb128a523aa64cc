"""compact-names: shorter file, same outputs, interface names kept."""

from onnxslim_cnn.passes.compact_names import CompactNames, short_name

from .helpers import apply_pass, assert_same_outputs, make_model, rand

TEXT = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] input_image) => (float[N, 4, 8, 8] scores) {
    a_very_long_intermediate_name = Conv <pads = [1, 1, 1, 1]> (
        input_image, conv_weight_long_name, conv_bias_long_name)
    scores = Relu (a_very_long_intermediate_name)
}
"""


def long_named():
    model = make_model(TEXT, {"conv_weight_long_name": rand((4, 3, 3, 3), 1),
                              "conv_bias_long_name": rand((4,), 2)})
    for node in model.graph.node:
        node.name = "node_with_a_long_name_" + node.op_type
    return model


def test_compact_names_shrinks_file_and_keeps_interface():
    model = long_named()
    out, result = apply_pass(CompactNames, model)
    assert result.stats["name_bytes_saved"] > 80
    assert out.ByteSize() < model.ByteSize() - 80
    assert [i.name for i in out.graph.input] == ["input_image"]
    assert [o.name for o in out.graph.output] == ["scores"]
    assert all(len(i.name) <= 3 for i in out.graph.initializer)
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_compact_names_idempotent_and_deterministic():
    model = make_model(TEXT, {"conv_weight_long_name": rand((4, 3, 3, 3), 1),
                              "conv_bias_long_name": rand((4,), 2)})
    once, _ = apply_pass(CompactNames, model)
    again, _ = apply_pass(CompactNames, model)
    assert once.SerializeToString() == again.SerializeToString()
    twice, result = apply_pass(CompactNames, once)
    assert result.stats["name_bytes_saved"] == 0


def test_compact_names_short_name_sequence():
    assert [short_name(i) for i in (0, 9, 10, 35, 36)] == ["a0", "a9", "aa", "az", "a10"]


def test_compact_names_compacted_bytes_predicts_the_pass():
    from onnxslim_cnn import model_io
    from onnxslim_cnn.passes.compact_names import compacted_bytes
    from onnxslim_cnn.passes.dedup_initializers import DedupInitializers
    from onnxslim_cnn.passes.qdq import QdqInt8

    model = long_named()
    # as exported by a pass (raw tensor data), and with decode subgraphs (int8 weights:
    # Cast, Mul and their constants)
    plain, _ = apply_pass(DedupInitializers, model)
    int8, _ = apply_pass(QdqInt8, model, {"weights_only": "int8"})
    for m in (plain, int8):
        out, _ = apply_pass(CompactNames, m)
        assert compacted_bytes(m) == model_io.model_bytes(out) < model_io.model_bytes(m)
