"""Merge initializers that hold identical values (lossless).

Before:  Conv_a(W1), Conv_b(W2) with W1 == W2 bit for bit
After:   Conv_a(W1), Conv_b(W1)
Two constants are the same when dtype, shape and bytes are equal (hash, then a full
comparison). Graph outputs that are constants are left alone.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from .base import Pass, PassContext, PassResult, register, replace_uses


@register
class DedupInitializers(Pass):
    name = "dedup-initializers"
    summary = "merge initializers with identical dtype, shape and bytes (lossless)"
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(changed=False)
        keep: dict[tuple, gs.Constant] = {}
        for tensor in _constants(graph):
            value = np.asarray(tensor.values)
            raw = np.ascontiguousarray(value).tobytes()
            key = (value.dtype.str, value.shape, hashlib.sha1(raw).hexdigest())
            first = keep.setdefault(key, tensor)
            # Bytes, not values: -0.0 and 0.0 differ in the file, NaN equals itself.
            if first is tensor or np.ascontiguousarray(first.values).tobytes() != raw:
                continue
            replace_uses(tensor, first)
            result.stats["duplicates_merged"] = result.stats.get("duplicates_merged", 0) + 1
            result.stats["bytes_saved"] = result.stats.get("bytes_saved", 0) + value.nbytes
            result.changed = True
        return result


def _constants(graph: gs.Graph) -> list[gs.Constant]:
    outputs = {t.name for t in graph.outputs}
    seen, found = set(), []
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and tensor.name not in outputs \
                    and tensor.name not in seen:
                seen.add(tensor.name)
                found.append(tensor)
    return found
