"""``export_onnx``: any prunekit model (stock or pruned SSD, VGG16) to a clean, checked ONNX file.

Exporter: torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). The
dynamo exporter (torch >= 2.9 default) has no opset-17 implementations (it exports opset 18 and
its down-conversion fails on these graphs), takes ~20x longer, and traces the same static graph
for these models; the TorchScript path is the one that gives a stable opset 17 on torch 2.11 and
2.14 alike. Its deprecation warning is silenced here; if it is removed from torch, this is the
one function to port.

Opset: 17 by default (ONNX 1.12+, ONNX Runtime 1.12+, TensorRT 8.5+); anything from 17 up that
the installed exporter supports may be requested. Graph I/O (the cross-team contract):

- input ``images`` float32 [batch, 3, H, W], normalised ``(x/255 - mean) / std`` (RGB, NCHW);
- classifier: ``logits`` [batch, num_classes];
- ``raw`` detector: ``bbox_regression`` [batch, A, 4], ``cls_logits`` [batch, A, C], ``anchors``
  [A, 4] (xyxy pixels of the input size; constant);
- ``decoded``/``trt`` detector: ``num_detections`` [batch, 1] int32, ``detection_boxes``
  [batch, K, 4] xyxy input pixels, ``detection_scores`` [batch, K], ``detection_classes``
  [batch, K] int32 (labels 1..C-1); see ``nms.py``.

Nothing is exported unverified: tracer warnings about data-dependent Python control flow abort
the export, the graph must pass the full checker and strict shape inference, and (``check=True``)
ONNX Runtime must reproduce PyTorch on two random inputs of two batch sizes (``selfcheck.py``).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

import prunekit
from prunekit.export.cleanup import GraphSummary, clean_graph, summarize, validate_model
from prunekit.export.metadata import INPUT_NAME, set_metadata
from prunekit.export.modules import SSDDecoded, default_boxes, example_input, network_outputs
from prunekit.export.nms import TRT_DOMAIN, append_onnx_nms, append_trt_nms
from prunekit.fileio import atomic_write_bytes, file_sha256
from prunekit.models import ArchConfig, SSDRaw, get_config

log = logging.getLogger(__name__)

FORMS = ("raw", "decoded", "trt")
DEFAULT_OPSET = 17
MIN_OPSET = 17
EXPORTER = "torch.onnx TorchScript (dynamo=False)"


class ExportError(ValueError):
    """The model cannot be exported faithfully; the message names the module/op or the check."""


@dataclass
class ExportSummary:
    """What was written: the graph summary, the metadata and the self-check results."""

    path: str
    form: str
    arch: str
    opset: int
    graph: GraphSummary
    metadata: dict[str, Any]
    self_check: dict[str, Any] | None = None
    seconds: float = 0.0
    # the TensorRT lint's findings (TensorRT 10.3), filled by the caller that runs it (the pipeline,
    # `prunekit export`): the export layer does not import the deploy layer, where the lint lives
    tensorrt_lint: list[dict[str, str]] | None = None

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes

    @property
    def params(self) -> int:
        return self.graph.params

    @property
    def file_size_bytes(self) -> int | None:
        return self.graph.file_size_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        lines = [f"{self.path}: {self.arch} form={self.form} ({self.seconds:.1f} s)", self.graph.text()]
        if self.form in ("decoded", "trt"):
            m = self.metadata
            lines.append(
                f"  post-processing: score > {m['score_thresh']}, IoU > {m['nms_thresh']} suppressed, "
                f"top {m['detections_per_img']} detections, {m['topk_candidates']} candidates per class"
            )
        lint = self.tensorrt_lint
        lines.append(
            "  TensorRT lint: clean"
            if not lint
            else f"  TensorRT lint: {len(lint)} finding(s); first: "
            f"{lint[0]['severity']} [{lint[0]['rule']}] {lint[0]['node']}: {lint[0]['message']}"
        )
        if self.self_check is None:
            lines.append("  self-check: skipped")
        else:
            sc = self.self_check
            lines.append(
                f"  self-check (ONNX Runtime CPU vs PyTorch, batches {sc['batch_sizes']}): "
                f"{'PASS' if sc['passed'] else 'FAIL'}, max abs error {sc['max_abs_error']:.3g}"
                + (
                    f", detections matched {sc['detections_matched']:.3f}"
                    if "detections_matched" in sc
                    else ""
                )
                + (f" ({sc['note']})" if sc.get("note") else "")
            )
        return "\n".join(lines)


def max_opset() -> int:
    """The highest opset the TorchScript exporter of the installed torch can emit."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # private constant; 20 on torch 2.11 .. 2.14
        return 20


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _traced_module(
    model: nn.Module, cfg: ArchConfig, form: str, anchors: torch.Tensor | None
) -> tuple[nn.Module, list[str]]:
    if not cfg.is_detector:
        return model, ["logits"]
    if form == "raw":
        return SSDRaw(model).eval(), ["bbox_regression", "cls_logits"]
    return SSDDecoded(model, anchors).eval(), ["boxes", "scores"]


def _is_control_flow_warning(w: warnings.WarningMessage) -> bool:
    # torch's TracerWarnings for tensor -> Python bool/int/float/index/list conversions all say this;
    # "torch.tensor results are registered as constants" is benign and not matched.
    return issubclass(w.category, torch.jit.TracerWarning) and "might cause the trace to be incorrect" in str(
        w.message
    )


def _torch_export(module: nn.Module, x: torch.Tensor, output_names: list[str], opset: int) -> bytes:
    buf = io.BytesIO()
    dynamic = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            module,
            (x,),
            buf,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue()


def _locate_failure(module: nn.Module, x: torch.Tensor, opset: int) -> str | None:
    """The deepest submodule that fails to export on its own (run only after a failed export)."""
    calls: list[tuple[str, nn.Module, tuple]] = []
    hooks = []
    for name, sub in module.named_modules():
        if name:
            hooks.append(
                sub.register_forward_hook(lambda m, args, out, name=name: calls.append((name, m, args)))
            )
    try:
        with torch.no_grad():
            module(x)
    except Exception:  # noqa: BLE001 - the model itself may fail; then there is nothing to locate
        return None
    finally:
        for h in hooks:
            h.remove()
    failing: list[str] = []
    seen: set[str] = set()
    for name, sub, args in calls:
        if name in seen or not args or not all(isinstance(a, torch.Tensor) for a in args):
            continue
        seen.add(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(sub, args, io.BytesIO(), opset_version=opset, dynamo=False)
        except Exception:  # noqa: BLE001 - any exporter failure marks the module
            failing.append(name)
    leaves = [n for n in failing if not any(o != n and o.startswith(n + ".") for o in failing)]
    if not leaves:
        return None
    sub = module.get_submodule(leaves[0])
    return f"{leaves[0]} ({type(sub).__name__})"


def _export_graph(
    module: nn.Module, x: torch.Tensor, output_names: list[str], opset: int, what: str
) -> bytes:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            data = _torch_export(module, x, output_names, opset)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; all are re-raised
            where = _locate_failure(module, x, opset)
            msg = str(e).strip()
            first = msg.splitlines()[0] if msg else type(e).__name__
            raise ExportError(
                f"{what}: cannot export to ONNX opset {opset}"
                + (f" in module {where}" if where else "")
                + f": {first}"
            ) from e
    bad = [w for w in caught if _is_control_flow_warning(w)]
    if bad:
        w = bad[0]
        raise ExportError(
            f"{what}: data-dependent Python control flow in forward() ({Path(w.filename).name}:{w.lineno}: "
            f"{str(w.message).splitlines()[0]}); a traced ONNX graph would hard-code one branch"
        )
    return data


def _fix_output_shapes(graph: gs.Graph, ref: list[torch.Tensor]) -> None:
    """Declare output shapes from PyTorch's outputs, with the dynamic batch axis named ``batch``."""
    for var, t in zip(graph.outputs, ref):
        var.shape = ["batch", *t.shape[1:]]
        var.dtype = np.float32


def _graph_inputs_batch(graph: gs.Graph, cfg: ArchConfig) -> None:
    h, w = cfg.input_size
    graph.inputs[0].shape = ["batch", 3, h, w]
    graph.inputs[0].dtype = np.float32


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    form: str = "raw",
    opset: int = DEFAULT_OPSET,
    source_checkpoint: str | os.PathLike | None = None,
    batch_example: int = 2,
    score_thresh: float | None = None,
    iou_thresh: float | None = None,
    max_detections: int | None = None,
    check: bool = True,
) -> ExportSummary:
    """Export ``model`` to ``path`` (written atomically) and return what was written.

    ``form`` is ``raw`` (network outputs + anchors), ``decoded`` (decode + ONNX NMS, runs on ONNX
    Runtime) or ``trt`` (decode + ``EfficientNMS_TRT``); classifiers only have ``raw``. The
    post-processing thresholds default to the model config's (torchvision's SSD values).
    ``source_checkpoint`` is hashed into the metadata. The model is not modified (a CPU copy in
    eval mode is traced). Raises :class:`ExportError` when the graph would not be faithful.
    """
    t0 = time.perf_counter()
    path = Path(path)
    try:
        cfg = get_config(_unwrap(model))
    except TypeError as e:
        raise ExportError(f"{path}: {e}") from e
    if form not in FORMS:
        raise ExportError(f"{path}: unknown export form {form!r}; expected one of {FORMS}")
    if not cfg.is_detector and form != "raw":
        raise ExportError(f"{path}: form {form!r} is for detectors; a {cfg.arch} classifier exports as 'raw'")
    if not MIN_OPSET <= opset <= max_opset():
        raise ExportError(f"{path}: opset {opset} is not supported; choose {MIN_OPSET}..{max_opset()}")
    if batch_example < 1:
        raise ExportError(f"{path}: batch_example must be >= 1, got {batch_example}")
    score_thresh = cfg.score_thresh if score_thresh is None else float(score_thresh)
    iou_thresh = cfg.nms_thresh if iou_thresh is None else float(iou_thresh)
    max_detections = cfg.detections_per_img if max_detections is None else int(max_detections)
    if not 0.0 <= score_thresh < 1.0:
        raise ExportError(f"{path}: score_thresh must be in [0, 1), got {score_thresh}")
    if not 0.0 < iou_thresh <= 1.0:
        raise ExportError(f"{path}: iou_thresh must be in (0, 1], got {iou_thresh}")
    if max_detections < 1:
        raise ExportError(f"{path}: max_detections must be >= 1, got {max_detections}")
    checkpoint_sha = None
    if source_checkpoint is not None:
        if not Path(source_checkpoint).is_file():
            raise FileNotFoundError(f"{source_checkpoint}: source checkpoint not found")
        checkpoint_sha = file_sha256(source_checkpoint)

    model = copy.deepcopy(_unwrap(model)).cpu().float().eval()
    model.prunekit_config = cfg  # deepcopy keeps it; explicit for wrapped models
    anchors = default_boxes(model) if cfg.is_detector else None
    module, out_names = _traced_module(model, cfg, form, anchors)
    x = example_input(cfg, batch_example)
    what = f"{path} ({cfg.arch}, form {form})"
    # Network outputs on the example: output shapes to declare (decoded boxes/scores have the
    # shapes of the raw regression/logits), and the self-check's first sample.
    raw_ref = network_outputs(model, x)

    data = _export_graph(module, x, out_names, opset, what)
    graph = gs.import_onnx(onnx.load_from_string(data))
    _graph_inputs_batch(graph, cfg)
    _fix_output_shapes(graph, list(raw_ref))
    graph = clean_graph(graph)

    num_anchors = int(raw_ref[0].shape[1]) if cfg.is_detector else 0
    if cfg.is_detector and form == "raw":
        assert anchors is not None
        out = gs.Variable("anchors", np.float32, list(anchors.shape))
        graph.layer(
            op="Identity",
            name="anchors",
            inputs=[gs.Constant("anchors_const", anchors.numpy())],
            outputs=[out],
        )
        graph.outputs.append(out)
    elif form in ("decoded", "trt"):
        append = append_onnx_nms if form == "decoded" else append_trt_nms
        append(
            graph, num_anchors, cfg.num_classes, score_thresh, iou_thresh, max_detections, cfg.topk_candidates
        )
    # Final pass: folds the post-processing's constant arithmetic; for ``raw`` nothing is left to
    # fold and the anchors stay an Identity node's output rather than a bare initializer.
    graph = clean_graph(graph, fold=form in ("decoded", "trt"))
    onnx_model = gs.export_onnx(graph)
    onnx_model.producer_name = "prunekit"
    onnx_model.producer_version = prunekit.__version__
    _set_opsets(onnx_model, opset, custom=form == "trt")

    k = int(onnx_model.graph.output[1].type.tensor_type.shape.dim[1].dim_value) if form != "raw" else None
    weights = [float(w) for w in model.box_coder.weights] if cfg.is_detector else None
    meta = _metadata(cfg, form, out_names_final(onnx_model), num_anchors, checkpoint_sha, opset, weights)
    if form != "raw":  # the values baked into the graph
        meta.update(score_thresh=score_thresh, nms_thresh=iou_thresh, detections_per_img=k)
    set_metadata(onnx_model, meta)
    validate_model(onnx_model, where=what)

    self_check = None
    if check:  # before writing: a graph that fails never lands on disk (nor replaces a good one)
        from prunekit.export.selfcheck import self_check as run_self_check  # imports onnxruntime lazily

        self_check = run_self_check(onnx_model, model, cfg, form, meta, anchors, (x, raw_ref))
        if self_check is not None and not self_check["passed"]:
            raise ExportError(
                f"{what}: self-check failed: {self_check['reason']}; nothing was written (data-dependent "
                "behaviour, a hard-coded batch size or an exporter bug)"
            )
    atomic_write_bytes(path, onnx_model.SerializeToString())
    log.info("wrote %s (%s, %d nodes)", path, form, len(onnx_model.graph.node))
    return ExportSummary(
        path=str(path),
        form=form,
        arch=cfg.arch,
        opset=opset,
        graph=summarize(onnx_model, path),
        metadata=meta,
        self_check=self_check,
        seconds=time.perf_counter() - t0,
    )


def out_names_final(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def _set_opsets(model: onnx.ModelProto, opset: int, custom: bool) -> None:
    ops = {o.domain: o.version for o in model.opset_import}
    ops[""] = opset
    ops.pop("ai.onnx", None)
    if custom:
        ops[TRT_DOMAIN] = 1
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(ops.items()))


def _metadata(
    cfg: ArchConfig,
    form: str,
    outputs: list[str],
    num_anchors: int,
    sha: str | None,
    opset: int,
    box_weights: list[float] | None,
) -> dict[str, Any]:
    det = cfg.is_detector
    anchors = None
    if det and cfg.anchors is not None:
        anchors = {**asdict(cfg.anchors), "num_anchors": num_anchors}
    return {
        "prunekit_config": cfg.to_dict(),
        "task": "detection" if det else "classification",
        "form": form,
        "class_names": list(cfg.class_names),
        "num_classes": cfg.num_classes,
        "input_name": INPUT_NAME,
        "output_names": outputs,
        "input_size": list(cfg.input_size),
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
        "layout": "NCHW",
        "box_coding": (
            {
                "name": "torchvision_ssd",
                "weights": box_weights,
                "bbox_xform_clip": float(np.log(1000.0 / 16)),
                "anchor_format": "xyxy",
                "box_format": "xyxy",
                "units": "input_pixels",
                "clip_to_input": True,
            }
            if det
            else None
        ),
        "anchors": anchors,
        "score_thresh": cfg.score_thresh if det else None,
        "nms_thresh": cfg.nms_thresh if det else None,
        "detections_per_img": cfg.detections_per_img if det else None,
        "topk_candidates": cfg.topk_candidates if det else None,
        "prunekit_version": prunekit.__version__,
        "source_checkpoint_sha256": sha,
        "opset": opset,
        "exporter": f"{EXPORTER}, torch {torch.__version__}",
    }
