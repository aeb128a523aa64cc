"""A corpus of models and situations that real users hit, through the command line.

Each bad case must end with exit code 2, exactly one line on stderr naming the problem,
no traceback, the input byte-identical and nothing (no output, no temp file) in the
output folder. The cases that are unusual but valid (dynamic H/W, a zero-channel conv)
must compress and validate. See tests/test_cli.py for file-level damage (truncated,
empty, not ONNX) and usage errors.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from .helpers import make_model, op_counts, rand
from .test_cli import assert_one_line_failure, run_cli

# x -> Conv(w, b) -> ACT -> y, with the input/output shapes and opsets filled in per case
CONV_ACT = """
<ir_version: 8, opset_import: ["" : 13{domains}]>
g (float[{shape_in}] x) => (float[{shape_out}] y) {{
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = {act} (c)
}}
"""


def conv_act(shape_in="N, 3, 8, 8", shape_out="N, 4, 8, 8", act="Relu", domains="",
             weight=None, out_channels=4) -> onnx.ModelProto:
    text = CONV_ACT.format(shape_in=shape_in, shape_out=shape_out, act=act, domains=domains)
    w = rand((out_channels, 3, 3, 3), 0) if weight is None else weight
    return make_model(text, {"w": w, "b": rand((out_channels,), 1)})


def with_bad_value(value: float):
    def build():
        w = rand((4, 3, 3, 3), 0)
        w[1, 2, 0, 0] = value
        return conv_act(weight=w)
    return build


def unknown_op():
    model = conv_act()
    model.graph.node[1].op_type = "FancyAct"  # default domain, no such op in opset 13
    return model


def input_without_shape():
    model = conv_act()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    return model


BAD_MODELS = {
    "unknown_op": (unknown_op, "No Op registered for FancyAct"),
    "custom_domain_op": (lambda: conv_act(act="com.acme.Swish", domains=', "com.acme": 1'),
                         "custom ops com.acme:Swish"),
    "input_without_shape": (input_without_shape, "graph input 'x' has no shape"),
    "zero_size_batch": (lambda: conv_act("0, 3, 8, 8", "0, 4, 8, 8"), "size 0 on axis 0"),
    "zero_size_height": (lambda: conv_act("N, 3, 0, 8", "N, 4, 0, 8"), "size 0 on axis 2"),
    "dynamic_channels": (lambda: conv_act("N, C, 8, 8"), "axis 1 ('C')"),
    "nan_weight": (with_bad_value(np.nan), "weight 'w' has 1 NaN/Inf"),
    "inf_weight": (with_bad_value(-np.inf), "weight 'w' has 1 NaN/Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_exits_2_one_line_nothing_written(tmp_path, case):
    build, expect = BAD_MODELS[case]
    source = tmp_path / "in.onnx"
    source.write_bytes(build().SerializeToString())
    before = source.read_bytes()
    (tmp_path / "out").mkdir()
    proc = run_cli(source, tmp_path / "out" / "slim.onnx", cwd=tmp_path)
    assert_one_line_failure(proc, 2, expect)
    assert source.read_bytes() == before
    assert os.listdir(tmp_path / "out") == []


def test_nan_outside_weights_is_accepted(tmp_path):
    # A NaN bound is legal ONNX (Clip ignores nothing, but Where/Max masks use them):
    # only weights of the ops the passes compress are checked.
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Max (c, floor)
    }
    """
    model = make_model(text, {"w": rand((4, 3, 3, 3), 0), "b": rand((4,), 1),
                              "floor": np.array([-np.inf], np.float32)})
    source = tmp_path / "in.onnx"
    onnx.save(model, source)
    proc = run_cli(source, tmp_path / "slim.onnx", "--preset", "lossless", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert op_counts(onnx.load(tmp_path / "slim.onnx"))["Conv"] == 1


# Unusual but valid: must compress, validate and write.
GOOD_MODELS = {
    "dynamic_height_width": lambda: conv_act("N, 3, H, W", "N, 4, H, W"),
    "zero_output_channels": lambda: conv_act("N, 3, 8, 8", "N, 0, 8, 8", out_channels=0),
}


@pytest.mark.parametrize("case", sorted(GOOD_MODELS))
def test_unusual_valid_model_compresses(tmp_path, case):
    source = tmp_path / "in.onnx"
    source.write_bytes(GOOD_MODELS[case]().SerializeToString())
    before = source.read_bytes()
    proc = run_cli(source, tmp_path / "slim.onnx", "--report", tmp_path / "r.json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert source.read_bytes() == before
    out = onnx.load(tmp_path / "slim.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.input[0].type == onnx.load(source).graph.input[0].type


# The output folder fails under us. As root a chmod'ed folder stays writable, so the
# failures are injected into the CLI process itself (prelude) where the OS would raise.
WRITE_FAILURES = {
    "read_only_folder": (
        "import tempfile, errno\n"
        "def refuse(*a, **k): raise PermissionError(errno.EACCES, 'Permission denied')\n"
        "tempfile.mkdtemp = refuse",
        "cannot write to"),
    "disk_full": (
        "import os, errno\n"
        "def full(fd): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "os.fsync = full",
        "No space left on device"),
}


@pytest.mark.parametrize("case", sorted(WRITE_FAILURES))
def test_output_write_failure_exits_2_keeps_previous_output(tmp_path, case):
    prelude, expect = WRITE_FAILURES[case]
    source = tmp_path / "in.onnx"
    onnx.save(conv_act(), source)
    before = source.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "slim.onnx").write_bytes(b"previous result")
    proc = run_cli(source, out / "slim.onnx", "--quiet", cwd=tmp_path, prelude=prelude)
    assert_one_line_failure(proc, 2, expect)
    assert source.read_bytes() == before
    assert os.listdir(out) == ["slim.onnx"]
    assert (out / "slim.onnx").read_bytes() == b"previous result"
