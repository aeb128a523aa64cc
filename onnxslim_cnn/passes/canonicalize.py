"""Rewrite equivalent ops into the forms other passes and runtimes recognise (lossless).

Why: Caffe2/MXNet exports write residual additions as ``Sum``; onnxruntime's int8 fusion
(QLinearAdd) and our passes match ``Add``. A two-input Sum is an Add; a one-input Sum is
the identity.

Before:  Sum(a, b) -> y            Sum(a) -> y
After:   Add(a, b) -> y            Identity(a) -> y   (removed by remove-identity)

Declines when: a Sum has three or more inputs (left as it is).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .base import Pass, PassContext, PassResult, register


@register
class Canonicalize(Pass):
    name = "canonicalize"
    summary = "two-input Sum -> Add, one-input Sum -> Identity (lossless)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        for node in graph.nodes:
            if node.op != "Sum" or node.domain not in ("", "ai.onnx", None):
                continue
            if len(node.inputs) > 2:
                result.declined["Sum with more than two inputs"] += 1
                continue
            node.op = "Add" if len(node.inputs) == 2 else "Identity"
            key = "sum_to_add" if node.op == "Add" else "sum_to_identity"
            result.stats[key] = result.stats.get(key, 0) + 1
            result.changed = True
        return result
