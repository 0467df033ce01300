"""The pool updates of an exported step, run in place by onnxruntime.

The exporter writes `aten.index_put` as `Transpose(perm=identity) -> ScatterND -> Transpose(perm=identity)`.
onnxruntime runs an identity Transpose as a full copy, so every layer's pool update copied the pool three times
per step; without them the update is one ScatterND from the pool input to the pool output, which onnxruntime
runs in place when the output is bound to the input's buffer (`OrtCausalLM` does).
"""

from __future__ import annotations

import onnx

__all__ = ["drop_identity_transposes", "in_place_pool_outputs"]


def _is_identity_transpose(node: onnx.NodeProto) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and node.domain in ("", "ai.onnx") and perm == list(range(len(perm or [])))


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of `old` in `graph` and its subgraphs (which may read outer names) becomes a read of `new`."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_uses(sub, old, new)


def drop_identity_transposes(graph: onnx.GraphProto) -> int:
    """Remove `graph`'s Transposes whose perm is the identity (they return their input); returns how many.

    A removed node's readers read its input instead; where its output is a graph output, the node producing its
    input writes that output directly (kept when that input is itself a graph input, initializer or output,
    which no node can be renamed to produce)."""
    outputs = {o.name for o in graph.output}
    fixed = {i.name for i in graph.input} | {t.name for t in graph.initializer} | outputs
    producer = {name: node for node in graph.node for name in node.output}
    removed = []
    for node in graph.node:
        if not _is_identity_transpose(node):
            continue
        src, dst = node.input[0], node.output[0]
        if dst not in outputs:
            _rename_uses(graph, dst, src)
        elif src in fixed or src not in producer:
            continue
        else:  # the producer writes the graph output; its other readers follow the new name
            made = producer[src]
            made.output[list(made.output).index(src)] = dst
            _rename_uses(graph, src, dst)
            producer[dst] = made
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def in_place_pool_outputs(graph: onnx.GraphProto, pools: list[str], outputs: list[str]) -> list[str]:
    """The pools of `pools` (graph inputs) whose data no node reads except one ScatterND writing the matching
    graph output of `outputs`: only those may have their output bound to their own buffer (nothing reads the
    pool before the scatter has written it, and the scatter itself skips the copy when source and destination
    are the same).  Shape-only readers do not count."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    safe = []
    for pool, out in zip(pools, outputs, strict=True):
        data = [n for n in readers.get(pool, []) if n.op_type != "Shape"]
        if len(data) == 1 and data[0].op_type == "ScatterND" and list(data[0].input).count(pool) == 1 \
                and data[0].input[0] == pool and data[0].output[0] == out:
            safe.append(pool)
    return safe
