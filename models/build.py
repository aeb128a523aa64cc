"""Build the small example CNNs in ``models/examples/`` (tests, README and benchmarks use them).

Run ``python models/build.py [--out DIR]``. The output is byte-identical on every rerun:
weights come from numpy generators seeded by the model name, the IR version is pinned
per model (never the installed onnx's default), and nothing time- or host-dependent is
written. Weights are He-normal (std = sqrt(2 / fan_in), fan_in = C_in/group * kH * kW), so
activations stay in range; every BatchNormalization has non-trivial statistics
(gamma ~ 1 + N(0, 0.1), beta ~ N(0, 0.1), mean ~ N(0, 0.1), var ~ U(0.5, 1.5)) so that
folding it has real work to do.

Models (input -> output, all float32):

- ``resnet_block.onnx`` (opset 13, IR 7): ``input`` [N, 3, 32, 32] (dim_param "N") ->
  ``logits`` [N, 10]. Stem Conv-BN-Relu, two residual basic blocks (Conv-BN-Relu-Conv-BN,
  Add, Relu), the second with stride 2 and a 1x1 projection shortcut; GAP, Flatten, Gemm.
  This is also the dynamic-batch example.
- ``mobilenet_block.onnx`` (opset 13, IR 7): ``input`` [1, 3, 32, 32] -> ``logits`` [1, 10].
  MobileNetV2 inverted residuals: 1x1 expand Conv-BN-Clip(0, 6), depthwise 3x3 Conv-BN-Clip,
  1x1 project Conv-BN, residual Add; the stride-2 block pads like TF "SAME" ([0, 0, 1, 1]).
- ``squeeze_block.onnx`` (opset 9, IR 4): ``input`` [1, 3, 32, 32] -> ``prob`` [1, 10, 1, 1].
  SqueezeNet fire modules (squeeze 1x1 -> expand 1x1 | 3x3 -> Concat), MaxPool, Dropout,
  final Conv + Relu + GlobalAveragePool + Softmax as in Caffe2's SqueezeNet.
- ``old_opset.onnx`` (opset 7, IR 3): ``input`` [1, 3, 32, 32] -> ``logits`` [1, 10].
  Every initializer is also a graph input (IR 3 style); has an Identity and a Dropout.
- ``constant_weights.onnx`` (opset 13, IR 7): ``input`` [1, 3, 32, 32] -> ``logits``
  [1, 10]. Conv/Gemm/MatMul weights and the Clip (ReLU6) bounds live in ``Constant``
  nodes; BatchNormalization follows the convs, the Gemm and the MatMul. Duplicates:
  ``fc_bn.B`` holds the bytes of ``fc.B`` (both initializers; BN folding consumes it) and
  ``act2.min``/``act2.max`` repeat ``act1.min``/``act1.max`` (these survive folding).
  ``unused.W`` is read by nothing; a dead Mul -> Relu chain (``dead.out``) hangs off the
  first activation.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXAMPLES = Path(__file__).resolve().parent / "examples"
SAME_STRIDE2 = (0, 0, 1, 1)  # TF "SAME" for a 3x3 stride-2 window on an even size


class Net:
    """Collects nodes and weights of one graph; every weight comes from one seeded rng."""

    def __init__(self, name: str, weight_nodes: bool = False):
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.weight_nodes = weight_nodes  # conv/gemm weights as Constant nodes
        self.count = 0
        self.clip_bounds: set[str] = set()  # bounds tensors already written

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        if not self.weight_nodes:
            return self.init(name, array)
        tensor = numpy_helper.from_array(np.asarray(array, np.float32), name)
        self.nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self.count += 1
        out = out or f"{op.lower()}{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def normal(self, shape, std: float) -> np.ndarray:
        return self.rng.standard_normal(shape) * std

    def he(self, shape, fan_in: int) -> np.ndarray:
        return self.normal(shape, np.sqrt(2.0 / fan_in))

    def conv(self, name, x, cin, cout, k, stride=1, pads=None, group=1, bias=False) -> str:
        w = self.weight(f"{name}.W", self.he((cout, cin // group, k, k), cin // group * k * k))
        inputs = [x, w] + ([self.weight(f"{name}.B", self.normal(cout, 0.01))] if bias else [])
        pads = list(pads) if pads is not None else [k // 2] * 4
        return self.node("Conv", inputs, name, kernel_shape=[k, k], strides=[stride] * 2,
                         pads=pads, group=group)

    def bn(self, name: str, x: str, c: int, out: str | None = None, beta=None) -> str:
        stats = [1 + self.normal(c, 0.1), self.normal(c, 0.1), self.normal(c, 0.1),
                 self.rng.uniform(0.5, 1.5, c)]
        stats[1] = stats[1] if beta is None else beta
        names = [self.init(f"{name}.{k}", v) for k, v in zip("SBMV", stats, strict=True)]
        return self.node("BatchNormalization", [x, *names], out or name, epsilon=1e-5)

    def conv_bn(self, name, x, cin, cout, k, stride=1, pads=None, group=1) -> str:
        return self.bn(f"{name}_bn", self.conv(name, x, cin, cout, k, stride, pads, group), cout)

    def clip6(self, x: str, bounds: str = "relu6") -> str:
        """ReLU6 as Clip(x, min, max); Clips naming the same ``bounds`` share them."""
        names = [f"{bounds}.min", f"{bounds}.max"]
        if names[0] not in self.clip_bounds:
            self.clip_bounds.add(names[0])
            self.weight(names[0], np.array(0.0))
            self.weight(names[1], np.array(6.0))
        return self.node("Clip", [x, *names])

    def head(self, x: str, c: int, classes: int = 10, out: str = "logits") -> str:
        x = self.node("Flatten", [self.node("GlobalAveragePool", [x])])
        w = self.weight("fc.W", self.he((classes, c), c))
        b = self.weight("fc.B", self.normal(classes, 0.01))
        return self.node("Gemm", [x, w, b], out, transB=1)

    def model(self, inputs, outputs, opset: int, ir: int, inits_as_inputs=False):
        f32 = TensorProto.FLOAT
        ins = [helper.make_tensor_value_info(n, f32, s) for n, s in inputs]
        if inits_as_inputs:
            ins += [helper.make_tensor_value_info(t.name, f32, t.dims) for t in self.inits]
        outs = [helper.make_tensor_value_info(n, f32, s) for n, s in outputs]
        graph = helper.make_graph(self.nodes, "main", ins, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  ir_version=ir, producer_name="onnxslim_cnn models/build.py")
        onnx.checker.check_model(model, full_check=True)
        return model


IMAGE = ("input", [1, 3, 32, 32])
LOGITS = ("logits", [1, 10])


def basic_block(net: Net, name: str, x: str, cin: int, cout: int, stride: int) -> str:
    y = net.node("Relu", [net.conv_bn(f"{name}.conv1", x, cin, cout, 3, stride)])
    y = net.conv_bn(f"{name}.conv2", y, cout, cout, 3)
    if stride != 1 or cin != cout:
        x = net.conv_bn(f"{name}.proj", x, cin, cout, 1, stride, pads=[0] * 4)
    return net.node("Relu", [net.node("Add", [y, x])])


def resnet_block() -> onnx.ModelProto:
    net = Net("resnet_block")
    x = net.node("Relu", [net.conv_bn("stem", "input", 3, 16, 3)])
    for name, cin, cout, stride in (("block1", 16, 16, 1), ("block2", 16, 32, 2)):
        x = basic_block(net, name, x, cin, cout, stride)
    net.head(x, 32)
    return net.model([("input", ["N", 3, 32, 32])], [("logits", ["N", 10])], opset=13, ir=7)


def inverted_residual(net: Net, name, x, cin, cout, expand, stride) -> str:
    hidden = cin * expand
    y = net.clip6(net.conv_bn(f"{name}.expand", x, cin, hidden, 1))
    pads = SAME_STRIDE2 if stride == 2 else None
    y = net.clip6(net.conv_bn(f"{name}.dw", y, hidden, hidden, 3, stride, pads, group=hidden))
    y = net.conv_bn(f"{name}.project", y, hidden, cout, 1)
    return net.node("Add", [y, x]) if stride == 1 and cin == cout else y


MOBILENET_BLOCKS = (  # name, cin, cout, expansion, stride
    ("ir1", 16, 16, 4, 1),
    ("ir2", 16, 24, 4, 2),
    ("ir3", 24, 24, 4, 1),
)


def mobilenet_block() -> onnx.ModelProto:
    net = Net("mobilenet_block")
    x = net.clip6(net.conv_bn("stem", "input", 3, 16, 3))
    for name, cin, cout, expand, stride in MOBILENET_BLOCKS:
        x = inverted_residual(net, name, x, cin, cout, expand, stride)
    net.head(x, 24)
    return net.model([IMAGE], [LOGITS], opset=13, ir=7)


def fire(net: Net, name: str, x: str, cin: int, squeeze: int, expand: int) -> str:
    s = net.node("Relu", [net.conv(f"{name}.squeeze1x1", x, cin, squeeze, 1, bias=True)])
    branches = [net.node("Relu", [net.conv(f"{name}.expand{k}x{k}", s, squeeze, expand, k,
                                           bias=True)]) for k in (1, 3)]
    return net.node("Concat", branches, axis=1)


def squeeze_block() -> onnx.ModelProto:
    net = Net("squeeze_block")
    x = net.node("Relu", [net.conv("conv1", "input", 3, 32, 3, stride=2, pads=[0] * 4,
                                   bias=True)])
    pool = {"kernel_shape": [3, 3], "strides": [2, 2]}
    x = net.node("MaxPool", [x], **pool)
    x = fire(net, "fire2", x, 32, 8, 16)
    x = fire(net, "fire3", x, 32, 8, 16)
    x = fire(net, "fire4", net.node("MaxPool", [x], **pool), 32, 16, 32)
    x = net.node("Dropout", [x], ratio=0.5)
    x = net.node("Relu", [net.conv("conv10", x, 64, 10, 1, bias=True)])
    net.node("Softmax", [net.node("GlobalAveragePool", [x])], "prob", axis=1)
    return net.model([IMAGE], [("prob", [1, 10, 1, 1])], opset=9, ir=4)


def old_opset() -> onnx.ModelProto:
    net = Net("old_opset")
    x = net.node("Relu", [net.conv_bn("conv1", "input", 3, 8, 3)])
    x = net.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = net.node("Identity", [net.node("Relu", [net.conv("conv2", x, 8, 16, 3, bias=True)])])
    x = net.node("Flatten", [net.node("GlobalAveragePool", [x])])
    x = net.node("Dropout", [x], ratio=0.2)
    w, b = net.init("fc.W", net.he((10, 16), 16)), net.init("fc.B", net.normal(10, 0.01))
    net.node("Gemm", [x, w, b], "logits", transB=1)
    return net.model([IMAGE], [LOGITS], opset=7, ir=3, inits_as_inputs=True)


def constant_weights() -> onnx.ModelProto:
    net = Net("constant_weights", weight_nodes=True)
    x = net.conv("conv1", "input", 3, 16, 3, 2, bias=True)
    x = net.clip6(net.bn("conv1_bn", x, 16), "act1")
    net.node("Relu", [net.node("Mul", [x, net.weight("dead.scale", np.full(1, 0.5))])],
             "dead.out")
    x = net.clip6(net.conv_bn("conv2", x, 16, 32, 3, 2), "act2")  # act2.* == act1.*
    x = net.node("Flatten", [net.node("GlobalAveragePool", [x])])
    w, b = net.weight("fc.W", net.he((32, 32), 32)), net.normal(32, 0.1)
    x = net.node("Gemm", [x, w, net.init("fc.B", b)], transB=1)
    x = net.node("Relu", [net.bn("fc_bn", x, 32, beta=b)])  # fc_bn.B duplicates fc.B
    x = net.node("MatMul", [x, net.weight("head.W", net.he((32, 10), 32))])
    net.bn("head_bn", x, 10, out="logits")
    net.init("unused.W", net.normal((16, 16), 0.1))
    return net.model([IMAGE], [LOGITS], opset=13, ir=7)


BUILDERS = {f.__name__: f for f in (resnet_block, mobilenet_block, squeeze_block, old_opset,
                                    constant_weights)}


def build(out_dir: Path = EXAMPLES) -> list[Path]:
    """Write every example into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, builder in BUILDERS.items():
        path = out_dir / f"{name}.onnx"
        path.write_bytes(builder().SerializeToString())
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXAMPLES, help="output folder")
    for path in build(parser.parse_args(argv).out):
        print(f"{path}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
