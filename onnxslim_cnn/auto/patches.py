"""Per-layer patches: one layer's compressed weights taken from a whole-model variant.

A weight-storage pass (qdq-int8 weights-only, cluster-weights, ...) run on the whole
model gives a *variant* in which every layer it accepted reads its weight (and maybe a
corrected bias) from a new constant-only decode subgraph. Because those passes treat
layers independently (data-aware steps use the float model's inputs), any mix of
layers from different variants is a valid model. A patch is that subgraph for one layer:

Before (base):     W (fp32 initializer) -> Conv "c1"
Variant:           idx, book -> Unpack -> Gather -> W' -> Conv "c1"
Patch for "c1":    {input 1: W'}, nodes [Unpack, Gather], initializers [idx, book]

``splice`` puts patches into the base model: their nodes go first (they read only
initializers), the layer reads the new tensors, and initializers no longer read by any
node are dropped. Names inside a patch get the variant's tag as a suffix, so patches of
different variants never collide.

Declines when: the layer changed op type or attributes, or a changed input is not
computed from initializers alone (a pass that rewired activations, e.g. static QDQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Patch:
    """One layer's new constant inputs.

    Attributes:
        layer: the compute node's ``layer_key``.
        tag: the variant it comes from (``int8``, ``c4`` ...).
        inputs: input index -> the (renamed) tensor the layer reads instead.
        nodes: decode nodes, in topological order, renamed.
        initializers: the initializers those nodes and inputs read, renamed.
        bytes: serialized bytes of those initializers and nodes.
        base_bytes: serialized bytes of the base initializers the layer stops reading.
    """

    layer: str
    tag: str
    inputs: dict[int, str]
    nodes: tuple[onnx.NodeProto, ...]
    initializers: tuple[onnx.TensorProto, ...]
    bytes: int
    base_bytes: int


def layer_key(node: onnx.NodeProto) -> str:
    """A layer's name: the node's, or its first output's when the node has none."""
    return node.name or node.output[0]


def compute_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Conv/Gemm/MatMul nodes of ``model`` by ``layer_key``."""
    return {layer_key(n): n for n in model.graph.node if n.op_type in COMPUTE_OPS}


def extract(base: onnx.ModelProto, variant: onnx.ModelProto, tag: str) -> dict[str, Patch]:
    """The patches ``variant`` offers over ``base``, by layer name."""
    producers = {o: (k, n) for k, n in enumerate(variant.graph.node) for o in n.output}
    inits = {t.name: t for t in variant.graph.initializer}
    base_inits = {t.name: t for t in base.graph.initializer}
    found = {}
    var_nodes = compute_nodes(variant)
    for name, node in compute_nodes(base).items():
        other = var_nodes.get(name)
        if other is None or not _same_op(node, other):
            continue
        patch = _patch(name, node, other, tag, producers, inits, base_inits)
        if patch is not None:
            found[name] = patch
    return found


def _same_op(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    return a.op_type == b.op_type and list(a.attribute) == list(b.attribute) \
        and a.input[:1] == b.input[:1]


def _patch(key, node, other, tag, producers, inits, base_inits) -> Patch | None:
    old = list(node.input) + [""] * (len(other.input) - len(node.input))
    changed = [i for i, name in enumerate(other.input) if name != old[i]]
    if not changed or any(old[i] and old[i] not in base_inits for i in changed):
        return None
    nodes, names = {}, set()
    for i in changed:
        if not _closure(other.input[i], producers, inits, nodes, names):
            return None
    rename = {n: f"{n}.{tag}" for n in names}
    return Patch(
        layer=key, tag=tag,
        inputs={i: rename[other.input[i]] for i in changed},
        nodes=tuple(_renamed_node(nodes[k], rename, tag) for k in sorted(nodes)),
        initializers=tuple(_renamed_tensor(inits[n], rename[n]) for n in sorted(names)
                           if n in inits),
        bytes=sum(inits[n].ByteSize() for n in names if n in inits)
        + sum(n.ByteSize() for n in nodes.values()),
        base_bytes=sum(base_inits[old[i]].ByteSize() for i in changed if old[i]),
    )


def _closure(name: str, producers, inits, nodes: dict, names: set) -> bool:
    """Collect the subgraph computing ``name`` into ``nodes`` (position -> node, so
    sorting the positions gives the variant's topological order); False if it reads
    anything but initializers."""
    if name in names or not name:
        return True
    names.add(name)
    if name in inits:
        return True
    if name not in producers:
        return False
    position, node = producers[name]
    nodes[position] = node
    names.update(node.output)
    return all(_closure(i, producers, inits, nodes, names) for i in node.input)


def _renamed_node(node: onnx.NodeProto, rename: dict[str, str], tag: str) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = f"{node.name}.{tag}" if node.name else ""
    copy.input[:] = [rename.get(n, n) for n in node.input]
    copy.output[:] = [rename.get(n, n) for n in node.output]
    return copy


def _renamed_tensor(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def splice(base: onnx.ModelProto, patches: list[Patch]) -> onnx.ModelProto:
    """A copy of ``base`` whose layers read their patches (at most one per layer)."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    if not patches:
        return model
    targets = compute_nodes(model)
    new_nodes, have, replaced = [], {t.name for t in model.graph.initializer}, set()
    for patch in patches:
        node = targets[patch.layer]
        for index, name in patch.inputs.items():
            while len(node.input) <= index:
                node.input.append("")
            replaced.add(node.input[index])
            node.input[index] = name
        new_nodes += [n for n in patch.nodes if n.output[0] not in have]
        have.update(o for n in patch.nodes for o in n.output)
        for tensor in patch.initializers:
            if tensor.name not in have:
                model.graph.initializer.append(tensor)
                have.add(tensor.name)
    old = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes + old)
    _drop_unread(model, replaced)
    return model


def _drop_unread(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Drop the initializers in ``candidates`` that nothing reads any more."""
    read = {i for n in model.graph.node for i in n.input} | \
        {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    kept = [t for t in model.graph.initializer if t.name in read or t.name not in candidates]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
