"""Graph hygiene and validation: constant folding, dead-node removal, topological order, checks.

onnx-graphsurgeon does the rewriting (its constant folder evaluates foldable subgraphs with ONNX
Runtime); ``onnx.checker`` (full check) and strict shape inference are the gate every exported
graph must pass. :class:`GraphSummary` is the result as data, with a text view.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)


class GraphValidationError(ValueError):
    """An exported graph failed ``onnx.checker`` or strict shape inference."""


def clean_graph(graph: gs.Graph, fold: bool = True) -> gs.Graph:
    """Fold constants (shape arithmetic included), drop dead nodes, sort topologically.

    Returns the cleaned graph (a new object when folding: shapes are inferred first so that the
    folder sees static dims). Shape arithmetic that only forwards the dynamic batch size into a
    ``Reshape`` is replaced by Reshape's "0 = copy this dim" (see :func:`simplify_batch_reshapes`).
    """
    if fold:
        _quiet_onnxruntime()
        # Two passes: folding shapes can expose more foldable nodes downstream.
        for _ in range(2):
            graph = _with_inferred_shapes(graph)
            graph.fold_constants(fold_shapes=True, error_ok=True)
            simplify_batch_reshapes(graph)
            graph.cleanup(remove_unused_graph_inputs=False)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return graph


def _quiet_onnxruntime() -> None:
    # The folder evaluates subgraphs with ONNX Runtime, whose graph optimizer logs harmless warnings.
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:
        pass


def _with_inferred_shapes(graph: gs.Graph) -> gs.Graph:
    model = gs.export_onnx(graph)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001 - folding without shapes still works, only less
        log.debug("shape inference before folding failed: %s", e)
    return gs.import_onnx(model)


def _batch_dim_source(t: gs.Tensor) -> gs.Tensor | None:
    """``X`` when ``t`` is ``Unsqueeze(Gather(Shape(X), 0), [0])`` (X's first dim as a 1-element tensor)."""
    if len(t.inputs) != 1 or t.inputs[0].op != "Unsqueeze":
        return None
    unsq = t.inputs[0]
    axes = unsq.inputs[1] if len(unsq.inputs) > 1 else None
    axes_v = axes.values if isinstance(axes, gs.Constant) else unsq.attrs.get("axes")
    if axes_v is None or list(np.asarray(axes_v).reshape(-1)) != [0]:
        return None
    g = unsq.inputs[0]
    if len(g.inputs) != 1 or g.inputs[0].op != "Gather" or g.inputs[0].attrs.get("axis", 0) != 0:
        return None
    gather = g.inputs[0]
    idx = gather.inputs[1]
    if not isinstance(idx, gs.Constant) or np.asarray(idx.values).shape != () or int(idx.values) != 0:
        return None
    sh = gather.inputs[0]
    if len(sh.inputs) != 1 or sh.inputs[0].op != "Shape" or sh.inputs[0].attrs.get("start", 0) != 0:
        return None
    return sh.inputs[0].inputs[0]


def simplify_batch_reshapes(graph: gs.Graph) -> int:
    """Rewrite ``Reshape(x, Concat(batch_of(y), c1, c2...))`` as ``Reshape(x, [0, c1, c2...])``.

    Only when ``x`` and ``y`` have the same symbolic first dim (same ``dim_param``, hence equal
    by ONNX semantics), the other parts are constants without zeros, and ``allowzero`` is off:
    then "0" copies exactly the value the shape arithmetic computed. Returns the rewrite count.
    """
    n = 0
    for node in graph.nodes:
        if node.op != "Reshape" or node.attrs.get("allowzero", 0) or len(node.inputs) != 2:
            continue
        data, shape = node.inputs
        if isinstance(shape, gs.Constant) or len(shape.inputs) != 1 or shape.inputs[0].op != "Concat":
            continue
        parts = shape.inputs[0].inputs
        rest = parts[1:]
        if not parts or not all(isinstance(p, gs.Constant) for p in rest):
            continue
        vals = [int(v) for p in rest for v in np.asarray(p.values).reshape(-1)]
        if 0 in vals:
            continue
        src = _batch_dim_source(parts[0])
        if src is None or not data.shape or not src.shape:
            continue
        d0, s0 = data.shape[0], src.shape[0]
        if not (isinstance(d0, str) and d0 == s0):
            continue
        node.inputs[1] = gs.Constant(f"{node.name}_shape_b0", np.array([0, *vals], dtype=np.int64))
        n += 1
    return n


def clean_model(model: onnx.ModelProto, fold: bool = True) -> onnx.ModelProto:
    """:func:`clean_graph` on a ModelProto, keeping its opsets and metadata."""
    graph = clean_graph(gs.import_onnx(model), fold=fold)
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    out.metadata_props.extend(model.metadata_props)
    return out


def validate_model(model: onnx.ModelProto, where: str = "exported model") -> onnx.ModelProto:
    """Run the full ONNX checker and strict shape inference; return the shape-inferred model.

    Nodes of custom domains (TensorRT plugins) are skipped by both; their outputs must carry
    declared shapes.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise GraphValidationError(f"{where}: onnx.checker rejected the graph: {_first_line(e)}") from e
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as e:
        raise GraphValidationError(f"{where}: strict shape inference failed: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list[int | str | None]


@dataclass
class GraphSummary:
    """Nodes by op type, parameter count, file size, opset and I/O of an ONNX graph."""

    opset: int
    ir_version: int
    num_nodes: int
    ops: dict[str, int]
    params: int
    file_size_bytes: int | None
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    custom_domains: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        def io(t: TensorInfo) -> str:
            dims = ", ".join("?" if d is None else str(d) for d in t.shape)
            return f"    {t.name}: {t.dtype}[{dims}]"

        size = "-" if self.file_size_bytes is None else f"{self.file_size_bytes / 1e6:.2f} MB"
        lines = [
            f"  opset {self.opset}"
            + "".join(f", {d} v{v}" for d, v in self.custom_domains.items())
            + f", IR {self.ir_version}, {self.num_nodes} nodes, {self.params:,} parameters, {size}",
            "  inputs:",
            *map(io, self.inputs),
            "  outputs:",
            *map(io, self.outputs),
            "  nodes by op type: " + ", ".join(f"{op} {n}" for op, n in self.ops.items()),
        ]
        return "\n".join(lines)


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    shape: list[int | str | None] = []
    for d in tt.shape.dim:
        shape.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return TensorInfo(vi.name, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, shape)


def summarize(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> GraphSummary:
    """Summarise a graph; ``path`` (the written file) gives the on-disk size."""
    g = model.graph
    ops = Counter(n.op_type for n in g.node)
    params = sum(int(np.prod(t.dims)) for t in g.initializer)
    for n in g.node:  # weights a folder left as Constant nodes
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    params += int(np.prod(a.t.dims))
    opsets = {o.domain: o.version for o in model.opset_import}
    return GraphSummary(
        opset=opsets.get("", opsets.get("ai.onnx", 0)),
        ir_version=model.ir_version,
        num_nodes=len(g.node),
        ops=dict(ops.most_common()),
        params=params,
        file_size_bytes=os.path.getsize(path) if path is not None and os.path.exists(path) else None,
        inputs=[_tensor_info(v) for v in g.input],
        outputs=[_tensor_info(v) for v in g.output],
        custom_domains={d: v for d, v in opsets.items() if d not in ("", "ai.onnx")},
    )
