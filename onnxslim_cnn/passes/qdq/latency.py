"""Is the int8 model actually faster here? A latency check of the quantized graph.

int8 kernels are not always a win: on ShuffleNet, onnxruntime wraps every channel
shuffle (Reshape -> Transpose -> Reshape) in NCHW <-> NHWC Transposes around its int8
convs, and the int8 model ran 2x slower than float32 on this AVX2 machine. A user asks
for int8 to get a smaller *and* faster model; when the int8 kernels are slower, the
pass keeps the float compute and stores the weights as int8 (Cast+Mul, folded at load:
the same file size, float speed) and says so in the report.

The check runs both models alternately in one process (batch of the first calibration
sample, 1 thread, onnxruntime's full optimisation) and takes the median of per-round
time ratios, which a shared, noisy machine shifts far less than absolute times.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from ... import validate

ROUNDS = 15
WARMUP = 3
SLOWER = 1.1  # int8/float time ratio above which int8 is declined (noise margin)


def ratio(float_model: onnx.ModelProto, quant_model: onnx.ModelProto,
          feed: dict[str, np.ndarray], rounds: int = ROUNDS) -> float:
    """Median over alternating rounds of (int8 time / float time)."""
    runners = [validate.Runner(m, optimization="all", threads=1)
               for m in (float_model, quant_model)]
    try:
        for _ in range(WARMUP):
            for runner in runners:
                runner.run_batch(feed)
        ratios = []
        for round_ in range(rounds):
            spent = [0.0, 0.0]
            for which in ((0, 1) if round_ % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                runners[which].run_batch(feed)
                spent[which] = time.perf_counter() - start
            ratios.append(spent[1] / max(spent[0], 1e-9))
        return float(statistics.median(ratios))
    finally:
        for runner in runners:
            runner.close()


def first_sample(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]
                 ) -> dict[str, np.ndarray]:
    """Batch-1 feed from the first calibration batch (latency is quoted at batch 1), or
    the whole batch when the model's batch size is fixed."""
    fixed = {i.name for i in model.graph.input
             if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_value}
    return {name: value if name in fixed else value[:1]
            for name, value in batches[0].items()}
