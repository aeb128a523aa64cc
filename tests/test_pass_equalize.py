"""equalize: exact in float, evens out activation channel ranges, declines non-homogeneous."""

import numpy as np

from onnxslim_cnn.passes.base import PassContext
from onnxslim_cnn.passes.equalize import Equalize

from .helpers import apply_pass, assert_same_outputs, make_model, rand, run

# Fire-module-like site: squeeze -> Relu -> two expands -> Relu -> Concat -> MaxPool -> conv
#   x -> S -> Relu -> t --> E1 -> Relu --+
#                       \-> E3 -> Relu --+-> Concat -> MaxPool -> C -> y
FIRE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 4, 8, 8] x) => (float[N, 6, 4, 4] y) {
    s = Conv (x, ws, bs)
    t = Relu (s)
    e1 = Conv (t, w1, b1)
    e3 = Conv <pads = [1, 1, 1, 1]> (t, w3, b3)
    r1 = Relu (e1)
    r3 = Relu (e3)
    k = Concat <axis = 1> (r1, r3)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (k)
    y = Conv (p, wc, bc)
}
"""


def fire_weights():
    ws = rand((3, 4, 1, 1), 1)
    ws[0] *= 20.0  # one channel of t far larger than the others
    return {"ws": ws, "bs": rand((3,), 2, 0.1), "w1": rand((5, 3, 1, 1), 3),
            "b1": rand((5,), 4, 0.1), "w3": rand((5, 3, 3, 3), 5), "b3": rand((5,), 6, 0.1),
            "wc": rand((6, 10, 1, 1), 7), "bc": rand((6,), 8, 0.1)}


def calib():
    return [{"x": rand((4, 4, 8, 8), 50 + i)} for i in range(2)]


def channel_spread(model, tensor):
    from onnxslim_cnn.validate import with_outputs

    value = run(with_outputs(model, [tensor]), calib()[0])[tensor]
    cmax = value.max(axis=(0, 2, 3))
    return float(cmax.max() / max(cmax[cmax > 0].min(), 1e-9))


def test_equalize_fire_module_exact_and_evens_ranges():
    model = make_model(FIRE, fire_weights())
    out, result = apply_pass(Equalize, model, ctx=PassContext(calib=calib()))
    assert result.stats["tensors_equalized"] == 2  # t, and p (through Concat + MaxPool)
    assert_same_outputs(model, out, rtol=1e-4, atol=1e-5)
    assert channel_spread(out, "t") < channel_spread(model, "t") / 2


def test_equalize_clip_between_layers_declines():
    text = FIRE.replace("t = Relu (s)", "t = Clip (s, lo, hi)")
    weights = fire_weights() | {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    model = make_model(text, weights)
    out, result = apply_pass(Equalize, model, ctx=PassContext(calib=calib()))
    assert result.declined["Clip between the layers is not scale-homogeneous"] == 1
    assert result.stats["tensors_equalized"] == 1  # only p
    assert_same_outputs(model, out, rtol=1e-4, atol=1e-5)


def test_equalize_without_calibration_declines():
    model = make_model(FIRE, fire_weights())
    out, result = apply_pass(Equalize, model, ctx=PassContext())
    assert not result.changed
    assert result.declined["no calibration data"] == 2
