"""Where the compute layers sit in an ONNX graph: the first (reading the image), the last (heads).

Read by the quantizer (what stays float) and the TensorRT lint (which channel counts are fixed by
the task): both ask the same questions of the graph, so they share these answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")


def head_nodes(model: Any) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes with no other such node between them and a graph output.

    Found from the graph, not from layer names: for SSD these are the box and score heads, for a
    classifier its last layer, whatever the exporter called them.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    heads: list[str] = []
    seen: set[str] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in QUANTIZED_OPS:
            heads.append(node.name)
            continue  # stop here: what feeds a head is the trunk
        stack.extend(node.input)
    return sorted(set(heads))


def _consumers(model: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return consumers


def input_nodes(model: Any) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes with no other such node between them and a graph input:
    the layer that reads the image (3 channels in, full resolution)."""
    consumers = _consumers(model)
    first: set[str] = set()
    seen: set[int] = set()
    stack = [i.name for i in model.graph.input]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in QUANTIZED_OPS:
                first.add(node.name)
            else:
                stack.extend(node.output)
    return sorted(first)


def downstream_of(model: Any, roots: Iterable[str]) -> list[str]:
    """Names of the nodes fed, directly or not, by the nodes named ``roots`` (roots excluded)."""
    consumers = _consumers(model)
    by_name = {n.name: n for n in model.graph.node}
    stack = [o for r in roots if r in by_name for o in by_name[r].output]
    seen: set[str] = set()
    while stack:
        for n in consumers.get(stack.pop(), []):
            if n.name not in seen:
                seen.add(n.name)
                stack.extend(n.output)
    return sorted(seen - set(roots))
