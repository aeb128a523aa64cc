"""Shared test helpers: tiny graphs from ONNX text with seeded weights, onnxruntime runs.

Every comparison helper takes its tolerance explicitly: there is no default tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxslim_cnn import validate
from onnxslim_cnn.manager import export_graph, import_graph

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"


def make_model(text: str, weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Parse an ONNX text model and attach ``weights`` as initializers; checker-valid."""
    model = onnx.parser.parse_model(text)
    for name, value in (weights or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model)
    return model


def rand(shape, seed: int, scale: float = 1.0, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def positive(shape, seed: int, low: float = 0.5, high: float = 1.5) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Seeded normal inputs for every real input (dynamic dims -> ``batch``)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch
                for d in inp.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        out[inp.name] = rng.standard_normal(dims).astype(dtype)
    return out


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray],
        optimization: str = "disable") -> dict[str, np.ndarray]:
    runner = validate.Runner(model, optimization)
    try:
        return runner.run_batch(feed)
    finally:
        runner.close()


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, *, rtol: float,
                        atol: float, seed: int = 0) -> None:
    """Both models give the same outputs on seeded inputs within rtol/atol."""
    feed = feeds(before, seed)
    ref, got = run(before, feed), run(after, feed)
    assert set(ref) <= set(got), f"outputs lost: {set(ref) - set(got)}"
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=name)


def apply_pass(pass_cls, model: onnx.ModelProto, options: dict | None = None, ctx=None):
    """Run one pass the way the manager does (import, run, cleanup, export).

    Returns (new_model, PassResult).
    """
    from onnxslim_cnn.passes.base import PassContext

    graph = import_graph(model)
    result = pass_cls(options).run(graph, ctx or PassContext())
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return export_graph(graph, model), result


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def shared_model(name: str) -> Path:
    """Path of ``../shared/models/<name>/model.onnx``; skips the test when absent."""
    import pytest

    path = SHARED_MODELS / name / "model.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def run_pipeline(model: onnx.ModelProto, passes, **config_fields):
    """Run ``passes`` through the Manager on seeded random inputs, as ``compress`` does.

    Returns (result_model, report).
    """
    from onnxslim_cnn.calibration import load_dataset
    from onnxslim_cnn.config import Config
    from onnxslim_cnn.manager import Manager
    from onnxslim_cnn.report import Report

    config = Config(passes=tuple(passes), **config_fields)
    report = Report(input="<memory>", output="<memory>")
    result = Manager(config).run(model, load_dataset(config.data, model), report)
    return result, report


__all__ = ["gs"]
