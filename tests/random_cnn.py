"""Random small CNNs for property tests: a hypothesis strategy for a readable spec, and a
builder turning the spec into a checker-valid ModelProto with seeded weights.

A spec is a stem input, a chain of blocks and a head:

    x[N, C, H, W] -> block -> block -> ... -> head -> y

Blocks: Conv (any kernel, stride, asymmetric pads, dilation, groups incl. depthwise,
optional bias, BatchNorm, per-channel Mul/Add, Relu/Clip, Identity, a weight computed
from constants, a weight duplicating an earlier one), a residual Add around a
same-shape Conv, a Concat of a 1x1 and a 3x3 branch, Max/Average pooling.
Heads: GlobalAveragePool -> Flatten -> Gemm, Flatten -> Gemm, MatMul + Add, or none.
A dead branch (computed, never used) is optional. Shapes are tracked while building, so
a drawn kernel that does not fit the feature map falls back to 1x1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class ConvBlock:
    out: int
    kernel: tuple[int, int]
    stride: int
    pads: tuple[int, int, int, int]
    dilation: int
    groups: str  # "full", "grouped" (2 groups) or "depthwise" (out = in * multiplier)
    bias: bool
    bn: bool
    affine: bool  # per-channel Mul then Add after the Conv (fold-affine's pattern)
    act: str  # "none", "relu" or "clip"
    identity: bool
    const_weight: bool  # weight = Mul(W0, 2): a constant subexpression to fold
    dup_weight: bool  # reuse the values of an earlier same-shape weight (dedup target)


@dataclass(frozen=True)
class Residual:
    bn: bool
    act: str
    sum: bool  # written as Sum (Caffe2 style) instead of Add


@dataclass(frozen=True)
class Concat:
    out_a: int
    out_b: int


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" or "avg"


@dataclass(frozen=True)
class CnnSpec:
    channels: int
    height: int
    width: int
    dynamic_batch: bool
    blocks: tuple
    head: str  # "gap_gemm", "flatten_gemm", "matmul", "none"
    classes: int
    dead_branch: bool
    seed: int


ACTS = ("none", "relu", "clip")


RARELY = st.sampled_from((False, False, False, True))


@st.composite
def conv_blocks(draw) -> ConvBlock:
    return ConvBlock(
        out=draw(st.sampled_from((1, 2, 3, 4, 6, 8, 12, 16))),
        kernel=(draw(st.sampled_from((1, 2, 3, 5))), draw(st.sampled_from((1, 2, 3)))),
        stride=draw(st.sampled_from((1, 1, 2))),
        pads=tuple(draw(st.integers(0, 2)) for _ in range(4)),
        dilation=draw(st.sampled_from((1, 1, 2))),
        groups=draw(st.sampled_from(("full", "full", "grouped", "depthwise"))),
        bias=draw(st.booleans()), bn=draw(st.booleans()), affine=draw(st.booleans()),
        act=draw(st.sampled_from(ACTS)), identity=draw(st.booleans()),
        const_weight=draw(RARELY), dup_weight=draw(RARELY),
    )


BLOCKS = st.one_of(
    conv_blocks(), conv_blocks(),
    st.builds(Residual, bn=st.booleans(), act=st.sampled_from(ACTS), sum=st.booleans()),
    st.builds(Concat, out_a=st.integers(1, 6), out_b=st.integers(1, 6)),
    st.builds(Pool, kind=st.sampled_from(("max", "avg"))),
)


def cnn_specs(max_blocks: int = 4) -> st.SearchStrategy[CnnSpec]:
    """Strategy for CnnSpec; ``build`` turns one into a model."""
    return st.builds(
        CnnSpec,
        channels=st.integers(1, 4), height=st.integers(4, 10), width=st.integers(4, 10),
        dynamic_batch=st.booleans(),
        blocks=st.lists(BLOCKS, min_size=1, max_size=max_blocks).map(tuple),
        head=st.sampled_from(("gap_gemm", "flatten_gemm", "matmul", "none")),
        classes=st.integers(2, 10), dead_branch=st.booleans(),
        seed=st.integers(0, 2**16),
    )


@dataclass
class _Builder:
    rng: np.random.Generator
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    weights_by_shape: dict = field(default_factory=dict)
    counter: int = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}{self.counter}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out


@dataclass
class _Feature:
    tensor: str
    channels: int
    height: int
    width: int


def build(spec: CnnSpec) -> onnx.ModelProto:
    """The ModelProto of ``spec`` (opset 17, float32, weights seeded by ``spec.seed``)."""
    b = _Builder(np.random.default_rng(spec.seed))
    x = _Feature("x", spec.channels, spec.height, spec.width)
    for block in spec.blocks:
        x = _BLOCK_BUILDERS[type(block)](b, x, block)
    if spec.dead_branch:
        b.node("Relu", [b.node("Neg", [x.tensor])])  # nothing reads it
    y, y_shape = _head(b, x, spec)
    batch = "N" if spec.dynamic_batch else 2
    graph = helper.make_graph(
        b.nodes, "random_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                       [batch, spec.channels, spec.height, spec.width])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [batch, *y_shape])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(b: _Builder, x: _Feature, block: ConvBlock) -> _Feature:
    groups, out = _groups(x.channels, block)
    (kh, kw), d = block.kernel, block.dilation
    pads = list(block.pads)
    if d * (kh - 1) + 1 > x.height + pads[0] + pads[2] or \
            d * (kw - 1) + 1 > x.width + pads[1] + pads[3]:
        (kh, kw), d, pads = (1, 1), 1, [0, 0, 0, 0]
    weight = _conv_weight(b, (out, x.channels // groups, kh, kw), block)
    inputs = [x.tensor, weight] + ([b.const("b", _rand(b, (out,), 0.1))] if block.bias else [])
    t = b.node("Conv", inputs, kernel_shape=[kh, kw], strides=[block.stride] * 2,
               pads=pads, dilations=[d, d], group=groups)
    height = (x.height + pads[0] + pads[2] - d * (kh - 1) - 1) // block.stride + 1
    width = (x.width + pads[1] + pads[3] - d * (kw - 1) - 1) // block.stride + 1
    t = _bn(b, t, out) if block.bn else t
    if block.affine:
        t = b.node("Mul", [t, b.const("m", _positive(b, (out, 1, 1)))])
        t = b.node("Add", [t, b.const("a", _rand(b, (out, 1, 1), 0.1))])
    t = _act(b, t, block.act)
    t = b.node("Identity", [t]) if block.identity else t
    return _Feature(t, out, height, width)


def _groups(channels: int, block: ConvBlock) -> tuple[int, int]:
    if block.groups == "depthwise":
        return channels, channels * (1 + block.out % 2)
    if block.groups == "grouped" and channels % 2 == 0:
        return 2, 2 * -(-block.out // 2)
    return 1, block.out


def _conv_weight(b: _Builder, shape: tuple, block: ConvBlock) -> str:
    fan_in = int(np.prod(shape[1:]))
    earlier = b.weights_by_shape.get(shape)
    if block.dup_weight and earlier is not None:
        value = earlier  # bit-identical copy under another name
    else:
        value = _rand(b, shape, np.sqrt(2.0 / fan_in))
        b.weights_by_shape[shape] = value
    if block.const_weight:
        return b.node("Mul", [b.const("w0_", value / 2), b.const("two", np.float32(2.0))])
    return b.const("w", value)


def _bn(b: _Builder, t: str, channels: int) -> str:
    params = [_positive(b, (channels,)), _rand(b, (channels,), 0.1),
              _rand(b, (channels,), 0.1), _positive(b, (channels,))]
    return b.node("BatchNormalization", [t, *(b.const("bn", p) for p in params)],
                  epsilon=1e-5)


def _act(b: _Builder, t: str, act: str) -> str:
    if act == "relu":
        return b.node("Relu", [t])
    if act == "clip":
        return b.node("Clip", [t, b.const("lo", np.float32(0)), b.const("hi", np.float32(6))])
    return t


def _residual(b: _Builder, x: _Feature, block: Residual) -> _Feature:
    conv = ConvBlock(out=x.channels, kernel=(3, 3), stride=1, pads=(1, 1, 1, 1), dilation=1,
                     groups="full", bias=True, bn=block.bn, affine=False, act="none",
                     identity=False, const_weight=False, dup_weight=False)
    branch = _conv(b, x, conv)
    added = b.node("Sum" if block.sum else "Add", [x.tensor, branch.tensor])
    return _Feature(_act(b, added, block.act), x.channels, x.height, x.width)


def _concat(b: _Builder, x: _Feature, block: Concat) -> _Feature:
    def branch(out: int, k: int) -> _Feature:
        return _conv(b, x, ConvBlock(out, (k, k), 1, (k // 2,) * 4, 1, "full", True, False,
                                     False, "relu", False, False, False))
    left, right = branch(block.out_a, 1), branch(block.out_b, 3)
    t = b.node("Concat", [left.tensor, right.tensor], axis=1)
    return _Feature(t, left.channels + right.channels, x.height, x.width)


def _pool(b: _Builder, x: _Feature, block: Pool) -> _Feature:
    if x.height < 2 or x.width < 2:
        return x
    op = "MaxPool" if block.kind == "max" else "AveragePool"
    t = b.node(op, [x.tensor], kernel_shape=[2, 2], strides=[2, 2])
    return _Feature(t, x.channels, x.height // 2, x.width // 2)


_BLOCK_BUILDERS = {ConvBlock: _conv, Residual: _residual, Concat: _concat, Pool: _pool}


def _head(b: _Builder, x: _Feature, spec: CnnSpec) -> tuple[str, list[int]]:
    if spec.head == "none":
        return x.tensor, [x.channels, x.height, x.width]
    if spec.head == "gap_gemm":
        flat, features = b.node("Flatten", [b.node("GlobalAveragePool", [x.tensor])]), x.channels
    else:
        flat, features = b.node("Flatten", [x.tensor]), x.channels * x.height * x.width
    scale = np.sqrt(1.0 / features)
    if spec.head == "matmul":
        weight = b.const("fc_w", _rand(b, (features, spec.classes), scale))
        y = b.node("Add", [b.node("MatMul", [flat, weight]),
                           b.const("fc_b", _rand(b, (spec.classes,), 0.1))])
    else:
        weight = b.const("fc_w", _rand(b, (spec.classes, features), scale))
        y = b.node("Gemm", [flat, weight, b.const("fc_b", _rand(b, (spec.classes,), 0.1))],
                   transB=1)
    return y, [spec.classes]


def _rand(b: _Builder, shape, scale: float) -> np.ndarray:
    return (b.rng.standard_normal(shape) * scale).astype(np.float32)


def _positive(b: _Builder, shape) -> np.ndarray:
    return b.rng.uniform(0.5, 1.5, shape).astype(np.float32)
