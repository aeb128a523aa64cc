"""Small graph-edit helpers every layer of the package uses (passes, storage, recover).

They live below ``passes`` so that ``storage`` (which the passes build on) does not
import the pass package, which imports every pass, some of which import ``storage``.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def unique_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_N`` with the smallest N not in ``taken``; records the result."""
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def taken_names(graph: gs.Graph) -> set[str]:
    """Every tensor and node name in use in ``graph``."""
    return set(graph.tensors().keys()) | {node.name for node in graph.nodes}


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def replace_output(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make ``node`` produce ``new`` where it produced ``old``."""
    for index, tensor in enumerate(node.outputs):
        if tensor is old:
            node.outputs[index] = new
