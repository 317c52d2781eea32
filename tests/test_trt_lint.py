"""The TensorRT lint: every rule finds its planted violation, and a clean Q/DQ model passes.

The graphs are written by hand with onnx.helper (a clean explicit-quantization graph, then one
change per rule), so each test names exactly the construct TensorRT rejects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prunekit.deploy.trt_lint import RULES, counts, lint_onnx

C = 16  # channels of the hidden layer (a multiple of 8: clean)


def _graph(
    *,
    opset: int = 17,
    zp_dtype: Any = np.int8,
    zp_value: int = 0,
    act_scale: float = 0.02,
    w_axis: int = 0,
    w_per_tensor: bool = False,
    int32_bias: bool = False,
    hidden: int = C,
    q_on_conv_output: bool = False,
    float_input: bool = False,
    q_read_by_relu: bool = False,
    extra_nodes: list[Any] | None = None,
    input_shape: list[Any] | None = None,
) -> onnx.ModelProto:
    """image [1,3,8,8] -> Conv1 (image reader, float) -> Relu -> Q/DQ -> Conv2 (INT8 weights) -> Relu
    -> Q/DQ -> Conv3 (head, float) -> y. Keyword arguments plant one violation each."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((C, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(C, np.float32), "b1"),
        numpy_helper.from_array(rng.integers(-127, 128, (hidden, C, 3, 3)).astype(np.int8), "w2_q"),
        numpy_helper.from_array(
            np.full((1,) if w_per_tensor else (C if w_axis == 1 else hidden,), 0.01, np.float32), "w2_scale"
        ),
        numpy_helper.from_array(rng.standard_normal((5, hidden, 1, 1)).astype(np.float32), "w3"),
        numpy_helper.from_array(np.array(act_scale, np.float32), "s"),
        numpy_helper.from_array(np.array(zp_value, zp_dtype), "zp"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("QuantizeLinear", ["r1", "s", "zp"], ["r1_q"], name="q1"),
        helper.make_node("DequantizeLinear", ["r1_q", "s", "zp"], ["r1_dq"], name="dq1"),
        helper.make_node("DequantizeLinear", ["w2_q", "w2_scale"], ["w2"], name="dq_w2", axis=w_axis),
    ]
    conv2_in = ["r1" if float_input else "r1_dq", "w2"]
    if int32_bias:
        inits += [
            numpy_helper.from_array(np.zeros(hidden, np.int32), "b2_q"),
            numpy_helper.from_array(np.full(hidden, 2e-4, np.float32), "b2_scale"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["b2_q", "b2_scale"], ["b2"], name="dq_b2", axis=0))
        conv2_in.append("b2")
    nodes.append(helper.make_node("Conv", conv2_in, ["c2"], name="conv2", pads=[1, 1, 1, 1]))
    relu_in = "c2"
    if q_on_conv_output:
        nodes += [
            helper.make_node("QuantizeLinear", ["c2", "s", "zp"], ["c2_q"], name="q_out"),
            helper.make_node("DequantizeLinear", ["c2_q", "s", "zp"], ["c2_dq"], name="dq_out"),
        ]
        relu_in = "c2_dq"
    nodes.append(helper.make_node("Relu", [relu_in], ["r2"], name="relu2"))
    if q_read_by_relu:
        nodes.append(helper.make_node("Relu", ["r1_q"], ["odd"], name="relu_on_int8"))
    nodes += [
        helper.make_node("QuantizeLinear", ["r2", "s", "zp"], ["r2_q"], name="q2"),
        helper.make_node("DequantizeLinear", ["r2_q", "s", "zp"], ["r2_dq"], name="dq2"),
        helper.make_node("Conv", ["r2_dq", "w3"], ["y"], name="head"),
        *(extra_nodes or []),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 8, 8])]
    if q_read_by_relu:
        outputs.append(helper.make_tensor_value_info("odd", TensorProto.FLOAT, None))
    for n in extra_nodes or []:
        outputs.append(helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape or ["batch", 3, 8, 8])],
        outputs, inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model: onnx.ModelProto, tensorrt: str = "10.3") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in lint_onnx(model, tensorrt):
        out.setdefault(f.rule, []).append(f.node)
    return out


def test_clean_graph_passes_and_runs() -> None:
    m = _graph()
    onnx.checker.check_model(m)
    assert lint_onnx(m) == [] and lint_onnx(m, "11") == []
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"image": np.ones((2, 3, 8, 8), np.float32)})[0].shape == (2, 5, 8, 8)


@pytest.mark.parametrize(
    ("rule", "kwargs", "node"),
    [
        ("opset", {"opset": 21}, "model"),
        ("qdq-type", {"zp_dtype": np.uint8, "zp_value": 128}, "q1"),
        ("qdq-zero-point", {"zp_value": 3}, "q1"),
        ("qdq-scale", {"act_scale": 0.0}, "q1"),
        ("dq-int32", {"int32_bias": True}, "dq_b2"),
        ("qdq-unpaired", {"q_read_by_relu": True}, "q1"),
        ("weight-axis", {"w_axis": 1}, "conv2"),
        ("weight-per-tensor", {"w_per_tensor": True}, "conv2"),
        ("qdq-on-output", {"q_on_conv_output": True}, "q_out"),
        ("float-input-int8-weights", {"float_input": True}, "conv2"),
        ("channel-alignment", {"hidden": 12}, "conv2"),
        ("dynamic-shape", {"input_shape": ["batch", 3, "h", "w"]}, "image"),
        ("unsupported-op", {"extra_nodes": [helper.make_node("Unique", ["y"], ["u"], name="uniq")]}, "uniq"),
        (
            "unsupported-op",
            {
                "extra_nodes": [
                    helper.make_node("QLinearAdd", ["y"], ["u"], name="ms", domain="com.microsoft")
                ]
            },
            "ms",
        ),
    ],
)
def test_each_rule_finds_its_planted_violation(rule: str, kwargs: dict[str, Any], node: str) -> None:
    found = _rules(_graph(**kwargs))
    assert node in found.get(rule, []), found
    assert RULES[rule][0] in ("error", "warning")


def test_rule_details() -> None:
    # opset 21 is too new for 10.3 (9..20) and fine for TensorRT 11 (..25)
    assert "opset" not in _rules(_graph(opset=21), "11")
    # the plugin TensorRT ships is not an unsupported op
    nms = helper.make_node("EfficientNMS_TRT", ["y"], ["n"], name="nms", domain="TRT")
    assert "unsupported-op" not in _rules(_graph(extra_nodes=[nms]))
    # both ends of a 12-channel hidden layer are flagged, with the fix; the image's 3 channels and
    # the head's 5 outputs (fixed by the task) are not
    findings = [f for f in lint_onnx(_graph(hidden=12)) if f.rule == "channel-alignment"]
    assert {f.node for f in findings} == {"conv2", "head"}
    assert all("--align 8" in f.message for f in findings)
    assert counts(lint_onnx(_graph(int32_bias=True, zp_value=3))) == {"error": 5, "warning": 0}
    with pytest.raises(ValueError, match="unknown TensorRT target"):
        lint_onnx(_graph(), "9")


def test_quantizer_layouts_against_the_lint(tmp_path: Path) -> None:
    """The tensorrt layout is clean; the ORT-CPU layout is not, each finding naming its rule."""
    pytest.importorskip("onnxruntime")
    from prunekit.deploy.quantize import QuantizeConfig, quantize_model

    rng = np.random.default_rng(0)
    w = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((C, 3, 3, 3), (C, C, 3, 3), (C, C, 3, 3))]
    nodes = [
        helper.make_node("Conv", ["image", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["logits"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(w)]
    inits += [numpy_helper.from_array(np.full(C, 0.1, np.float32), f"b{i}") for i in range(3)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C, 8, 8])], inits,
    )  # fmt: skip
    src = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    batches = [rng.random((4, 3, 8, 8), dtype=np.float32) for _ in range(2)]
    trt, cpu = tmp_path / "trt.onnx", tmp_path / "cpu.onnx"
    quantize_model(src, trt, batches, QuantizeConfig(keep_heads_float=False))
    quantize_model(src, cpu, batches, QuantizeConfig(target="ort-cpu", keep_heads_float=False))
    q = onnx.load(str(trt))
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) >= 2  # something was quantized
    assert lint_onnx(q) == []
    rules = _rules(onnx.load(str(cpu)))
    assert "qdq-type" in rules  # uint8 activations


def test_inspect_tensorrt_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from prunekit.cli import main as cli

    clean, bad = tmp_path / "clean.onnx", tmp_path / "bad.onnx"
    onnx.save(_graph(), str(clean))
    onnx.save(_graph(int32_bias=True), str(bad))
    r = CliRunner().invoke(cli, ["inspect", str(clean), "--tensorrt"])
    assert r.exit_code == 0 and "TensorRT 10.3 lint: clean" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(bad), "--json"])
    assert r.exit_code == 1
    report = json.loads(r.output)
    assert report["error"] == 1 and report["findings"][0]["rule"] == "dq-int32"
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "junk.onnx"), "--tensorrt"])
    assert r.exit_code == 2 and "junk.onnx: not a readable ONNX model" in r.output
