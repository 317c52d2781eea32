"""A TensorRT lint that runs without TensorRT: what its ONNX parser and explicit quantization reject.

No machine here has TensorRT, so an ONNX that will not build would otherwise be found on the
device. This reads the graph (onnx + numpy only, torch-free) and reports each construct that
TensorRT 10.3 (JetPack 6) or 11 rejects or handles badly, with the rule that found it, so a
finding can be tested with a planted violation and a clean model can be shown clean.

Sources of the rules: onnx-tensorrt's ``docs/operators.md`` (operators and opsets the parser
imports; ``QuantizeLinear``/``DequantizeLinear``: zero point must be 0), TensorRT's "Working with
Quantized Types" (explicit quantization: INT8 Q/DQ, symmetric, weights per output channel, Q/DQ on
the inputs of quantizable layers) and the parser error for a quantized bias reported in
onnx/onnx-tensorrt#850 and microsoft/onnxruntime#17738 ("only activation types allowed as input
to this layer").

``error`` findings stop a build (or its INT8 path); ``warning`` findings build but cost speed or
accuracy. ``prunekit inspect MODEL.onnx --tensorrt`` prints them; export and quantize record them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from prunekit.deploy.onnx_graph import head_nodes, input_nodes

log = logging.getLogger(__name__)

# The newest default-domain opset each TensorRT's parser reads (oldest: 9 for both).
MAX_OPSET = {"10.3": 20, "11": 25}
MIN_OPSET = 9
DEFAULT_TENSORRT = "10.3"  # JetPack 6: the strictest target a user ships to
# Rows marked "N" in onnx-tensorrt's operators.md for the 10.x parsers, plus the string/optional
# operators it has never imported. Anything here fails the parse.
UNSUPPORTED_OPS = frozenset({
    "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "BlackmanWindow",
    "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "Det", "DynamicQuantizeLinear",
    "HammingWindow", "HannWindow", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
    "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "STFT", "StringConcat",
    "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})  # fmt: skip
# Custom-domain nodes the parser hands to a plugin shipped with TensorRT (libnvinfer_plugin).
PLUGIN_OPS = frozenset({"EfficientNMS_TRT", "BatchedNMS_TRT", "BatchedNMSDynamic_TRT"})
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CHANNEL_ALIGN = 8

RULES: dict[str, tuple[str, str]] = {
    "opset": ("error", f"default-domain opset outside what the parser reads ({MIN_OPSET}..20 for 10.3, ..25 for 11)"),
    "unsupported-op": ("error", "an operator the parser does not import, or a custom-domain node with no plugin"),
    "dynamic-shape": ("error", "an input with a dynamic dimension other than the batch"),
    "qdq-type": ("error", "Q/DQ to a type other than INT8 (uint8 from the ORT-CPU layout, int16, ...)"),
    "qdq-zero-point": ("error", "a non-zero zero point: TensorRT's quantization is symmetric"),
    "qdq-scale": ("error", "a scale that is not a constant, or not positive and finite"),
    "dq-int32": ("error", "DequantizeLinear of an INT32 tensor (a quantized bias): the parser rejects it"),
    "qdq-unpaired": ("error", "a QuantizeLinear not read by DequantizeLinear only, or a DequantizeLinear of an "
                              "activation no QuantizeLinear produced"),
    "weight-axis": ("error", "weights quantized per channel along an axis other than the output channels"),
    "weight-per-tensor": ("warning", "Conv/Gemm weights with one scale for all output channels (accuracy)"),
    "qdq-on-output": ("warning", "Q/DQ directly on a Conv/Gemm output: TensorRT wants them on layer inputs; "
                                 "here they split the Conv from its activation"),
    "float-input-int8-weights": ("warning", "INT8 weights under a float input: the layer runs in float"),
    "channel-alignment": ("warning", f"Conv/Gemm channels not a multiple of {CHANNEL_ALIGN}: tensor cores pad "
                                     "them (the image's channels and task-fixed head outputs are exempt)"),
}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    """One construct TensorRT rejects (``error``) or handles badly (``warning``)."""

    rule: str
    severity: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity} [{self.rule}] {self.node}: {self.message}"


def lint_onnx(model: Any, tensorrt: str = DEFAULT_TENSORRT) -> list[Finding]:
    """Every finding for ``model`` (an ``onnx.ModelProto`` or a path) against ``tensorrt`` ("10.3" or "11")."""
    import onnx

    if tensorrt not in MAX_OPSET:
        raise ValueError(f"unknown TensorRT target {tensorrt!r}; expected one of {', '.join(MAX_OPSET)}")
    if isinstance(model, str | os.PathLike):
        model = onnx.load(os.fspath(model), load_external_data=False)
    g = _Graph(model)
    out: list[Finding] = []
    out += _opset(model, tensorrt)
    out += _ops(g)
    out += _dynamic(model)
    out += _qdq(g)
    out += _weights(g)
    out += _alignment(g, model)
    return out


def lint_file(path: str | os.PathLike, tensorrt: str = DEFAULT_TENSORRT) -> list[dict[str, str]]:
    """:func:`lint_onnx` of a written model, logged (a warning naming the first finding) and JSON-ready."""
    found = lint_onnx(path, tensorrt)
    if found:
        log.warning("%s: TensorRT lint: %d finding(s) (`prunekit inspect %s --tensorrt` lists them); first: %s",
                    path, len(found), os.path.basename(path), found[0])  # fmt: skip
    return as_dicts(found)


def as_dicts(findings: Iterable[Finding]) -> list[dict[str, str]]:
    """JSON-ready findings (``rule``, ``severity``, ``node``, ``message``)."""
    return [asdict(f) for f in findings]


def counts(findings: Iterable[Finding]) -> dict[str, int]:
    """``{"error": n, "warning": m}``."""
    c = {"error": 0, "warning": 0}
    for f in findings:
        c[f.severity] += 1
    return c


def _finding(rule: str, node: str, message: str) -> Finding:
    return Finding(rule, RULES[rule][0], node, message)


class _Graph:
    """Producers, consumers and constants of one graph, computed once."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.const: dict[str, np.ndarray] = {
            i.name: numpy_helper.to_array(i) for i in model.graph.initializer
        }
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def weight(self, tensor: str) -> tuple[np.ndarray | None, Any]:
        """The constant behind ``tensor`` (through a DequantizeLinear of a constant), and that DQ node."""
        if tensor in self.const:
            return self.const[tensor], None
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in self.const:
            return self.const[p.input[0]], p
        return None, None


def _attr(node: Any, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _name(node: Any) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def _opset(model: Any, tensorrt: str) -> list[Finding]:
    top = MAX_OPSET[tensorrt]
    return [
        _finding("opset", "model", f"opset {o.version} (TensorRT {tensorrt} reads {MIN_OPSET}..{top}): "
                                   f"export with --opset {min(max(o.version, MIN_OPSET), top)}")
        for o in model.opset_import
        if o.domain in ("", "ai.onnx") and not MIN_OPSET <= o.version <= top
    ]  # fmt: skip


def _ops(g: _Graph) -> list[Finding]:
    out = []
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx") and n.op_type not in PLUGIN_OPS:
            out.append(
                _finding("unsupported-op", _name(n), f"{n.domain}::{n.op_type} has no TensorRT plugin")
            )
        elif n.domain in ("", "ai.onnx") and n.op_type in UNSUPPORTED_OPS:
            out.append(
                _finding("unsupported-op", _name(n), f"{n.op_type} is not imported by TensorRT's ONNX parser")
            )
    return out


def _dynamic(model: Any) -> list[Finding]:
    out = []
    inits = {i.name for i in model.graph.initializer}
    for t in model.graph.input:
        if t.name in inits:
            continue
        dims = list(t.type.tensor_type.shape.dim)
        bad = [k for k, d in enumerate(dims) if k > 0 and not d.HasField("dim_value")]
        if bad:
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            out.append(_finding("dynamic-shape", t.name, f"shape {shape}: dimension(s) {bad} are dynamic; "
                                                         "export with a fixed input size"))  # fmt: skip
    return out


def _qdq(g: _Graph) -> list[Finding]:
    out: list[Finding] = []
    for n in g.nodes:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = _name(n)
        scale = g.const.get(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            out.append(
                _finding(
                    "qdq-scale", where, f"scale {n.input[1] if len(n.input) > 1 else '?'!r} is not a constant"
                )
            )
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            out.append(
                _finding(
                    "qdq-scale", where, f"scale has non-positive or non-finite values ({scale.ravel()[:3]})"
                )
            )
        zp = g.const.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if n.op_type == "QuantizeLinear":
            dtype = zp.dtype if zp is not None else np.dtype(np.uint8)  # ONNX: no zero point means uint8
            readers = g.consumers.get(n.output[0], [])
            if any(r.op_type != "DequantizeLinear" for r in readers):
                out.append(_finding("qdq-unpaired", where, "its output is read by "
                                    f"{sorted({r.op_type for r in readers} - {'DequantizeLinear'})}, not only by DequantizeLinear"))  # fmt: skip
            p = g.producer.get(n.input[0])
            if p is not None and p.op_type in WEIGHTED_OPS:
                out.append(
                    _finding("qdq-on-output", where, f"quantizes the output of {p.op_type} {_name(p)!r}")
                )
        else:
            x = n.input[0]
            if x in g.const:
                dtype = g.const[x].dtype
            else:
                p = g.producer.get(x)
                if p is None or p.op_type != "QuantizeLinear":
                    out.append(
                        _finding(
                            "qdq-unpaired", where, f"dequantizes {x!r}, which no QuantizeLinear produced"
                        )
                    )
                    continue
                pz = g.const.get(p.input[2]) if len(p.input) > 2 and p.input[2] else None
                dtype = pz.dtype if pz is not None else np.dtype(np.uint8)
            if dtype == np.int32:
                out.append(_finding("dq-int32", where, f"dequantizes INT32 {x!r} (a quantized bias?): "
                                                       "quantize with the bias left float"))  # fmt: skip
                continue
        if dtype != np.int8:
            out.append(_finding("qdq-type", where, f"quantizes to {dtype}, not int8"))
        elif zp is not None and np.any(zp != 0):
            out.append(_finding("qdq-zero-point", where, f"zero point {zp.ravel()[:3].tolist()}, not 0"))
    return out


def _weight_axis(node: Any) -> int:
    """The output-channel axis of a weighted node's weight tensor."""
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "ConvTranspose":
        return 1
    return 0


def _weights(g: _Graph) -> list[Finding]:
    out = []
    for n in g.nodes:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        w, dq = g.weight(n.input[1])
        if w is None or dq is None:
            continue  # float weights: nothing quantized here
        where, axis = _name(n), _weight_axis(n)
        scale = g.const.get(dq.input[1])
        channels = int(w.shape[axis]) if w.ndim > axis else 1
        if scale is not None and scale.size > 1 and _attr(dq, "axis", 1) % w.ndim != axis:
            out.append(_finding("weight-axis", where, f"weights quantized along axis {_attr(dq, 'axis', 1)}, "
                                                      f"output channels are axis {axis}"))  # fmt: skip
        elif scale is not None and scale.size == 1 and channels > 1:
            out.append(_finding("weight-per-tensor", where, f"one scale for {channels} output channels"))
        p = g.producer.get(n.input[0])
        if p is None or p.op_type != "DequantizeLinear":
            out.append(_finding("float-input-int8-weights", where, "INT8 weights, float input"))
    return out


def _alignment(g: _Graph, model: Any) -> list[Finding]:
    image_readers, heads = set(input_nodes(model)), set(head_nodes(model))
    out = []
    for n in g.nodes:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 2:
            continue
        w, _ = g.weight(n.input[1])
        if w is None or w.ndim < 2:
            continue
        axis = _weight_axis(n)
        c_out = int(w.shape[axis])
        c_in = int(w.shape[1 - axis]) * (_attr(n, "group", 1) if n.op_type == "Conv" else 1)
        bad = []
        if c_in % CHANNEL_ALIGN and n.name not in image_readers:
            bad.append(f"{c_in} input")
        if c_out % CHANNEL_ALIGN and n.name not in heads:
            bad.append(f"{c_out} output")
        if bad:
            out.append(_finding("channel-alignment", _name(n), f"{' and '.join(bad)} channels; prune with "
                                                                f"--align {CHANNEL_ALIGN}"))  # fmt: skip
    return out
