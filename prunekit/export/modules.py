"""The torch modules that are traced for each export form, and the SSD default boxes.

``raw`` traces :class:`prunekit.models.SSDRaw`; ``decoded``/``trt`` trace :class:`SSDDecoded`
(network + box decoding + softmax) and get their NMS appended as ONNX nodes (see ``nms.py``), so
the decode is written once, in torch, where it is checked against torchvision.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD

from prunekit.models import ArchConfig, SSDRaw, get_config


def example_input(cfg: ArchConfig, batch: int, seed: int = 0) -> Tensor:
    """A normalised batch of random RGB images in [0, 1] (what a real image looks like to the net)."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.input_size
    img = torch.rand(batch, 3, h, w, generator=g)
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (img - mean) / std


@torch.no_grad()
def network_outputs(model: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
    """The network's outputs on normalised images: ``(logits,)`` or ``(bbox_regression, cls_logits)``."""
    if not get_config(model).is_detector:
        return (model(x),)
    return tuple(SSDRaw(model).eval()(x))


@torch.no_grad()
def default_boxes(model: SSD) -> Tensor:
    """SSD default boxes [A, 4], xyxy in pixels of the model input size (a constant of the model).

    Computed by the model's own ``anchor_generator`` on the feature-map sizes of one dummy image,
    so a pruned-Kdet model gets exactly the boxes it was trained with.
    """
    h, w = get_config(model).input_size
    p = next(model.parameters())
    x = torch.zeros(1, 3, h, w, dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    try:
        feats = list(model.backbone(x).values())
        anchors = model.anchor_generator(ImageList(x, [(h, w)]), feats)[0]
    finally:
        model.train(was_training)
    return anchors.detach().float().cpu()


class SSDDecoded(nn.Module):
    """Normalised images [N,3,H,W] -> (boxes [N,A,4] xyxy input pixels, scores [N,A,C] softmax).

    Box decoding follows torchvision's ``BoxCoder.decode_single`` (weights, exp clamp) and
    ``clip_boxes_to_image`` on the input size, so the pre-NMS tensors are those torchvision's
    ``SSD.postprocess_detections`` works on. Anchors are constants of the graph.
    """

    def __init__(self, model: SSD, anchors: Tensor | None = None):
        super().__init__()
        self.raw = SSDRaw(model)
        cfg = get_config(model)
        anchors = default_boxes(model) if anchors is None else anchors.float().cpu()
        # Same float32 arithmetic as decode_single, precomputed once.
        widths = anchors[:, 2] - anchors[:, 0]
        heights = anchors[:, 3] - anchors[:, 1]
        self.register_buffer("anchor_wh", torch.stack([widths, heights], dim=1), persistent=False)
        self.register_buffer(
            "anchor_ctr",
            torch.stack([anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights], dim=1),
            persistent=False,
        )
        wx, wy, ww, wh = model.box_coder.weights
        self.register_buffer("xy_weights", torch.tensor([wx, wy], dtype=torch.float32), persistent=False)
        self.register_buffer("wh_weights", torch.tensor([ww, wh], dtype=torch.float32), persistent=False)
        self.xform_clip = float(model.box_coder.bbox_xform_clip)
        self.height, self.width = (float(v) for v in cfg.input_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.decode(*self.raw(images))

    def decode(self, reg: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Decode raw outputs ``bbox_regression`` [N,A,4] / ``cls_logits`` [N,A,C]."""
        dxy = reg[..., 0:2] / self.xy_weights
        dwh = torch.clamp(reg[..., 2:4] / self.wh_weights, max=self.xform_clip)
        ctr = dxy * self.anchor_wh + self.anchor_ctr
        half = 0.5 * (torch.exp(dwh) * self.anchor_wh)
        lo, hi = ctr - half, ctr + half
        x1 = lo[..., 0].clamp(min=0.0, max=self.width)
        y1 = lo[..., 1].clamp(min=0.0, max=self.height)
        x2 = hi[..., 0].clamp(min=0.0, max=self.width)
        y2 = hi[..., 1].clamp(min=0.0, max=self.height)
        boxes = torch.stack([x1, y1, x2, y2], dim=-1)
        return boxes, torch.softmax(logits, dim=-1)


@torch.no_grad()
def torchvision_detections(
    model: SSD,
    images: Tensor,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    detections_per_img: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """torchvision's own ``SSD.postprocess_detections`` on normalised images [N,3,H,W].

    The reference the ``decoded`` graph must reproduce: boxes in input pixels (no rescaling to an
    original image size), numpy ``boxes``/``scores``/``labels`` per image. Thresholds default to
    the model's; overrides apply only for this call.
    """
    reg, logits = SSDRaw(model).eval()(images)
    return postprocess_torchvision(
        model, reg, logits, default_boxes(model), score_thresh, nms_thresh, detections_per_img
    )


@torch.no_grad()
def postprocess_torchvision(
    model: SSD,
    reg: Tensor,
    logits: Tensor,
    anchors: Tensor,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    detections_per_img: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """:func:`torchvision_detections` from already computed raw outputs and default boxes."""
    h, w = get_config(model).input_size
    anchors = anchors.to(reg.device, reg.dtype)
    saved = (model.score_thresh, model.nms_thresh, model.detections_per_img)
    try:
        if score_thresh is not None:
            model.score_thresh = score_thresh
        if nms_thresh is not None:
            model.nms_thresh = nms_thresh
        if detections_per_img is not None:
            model.detections_per_img = detections_per_img
        dets = model.postprocess_detections(
            {"bbox_regression": reg, "cls_logits": logits}, [anchors] * len(reg), [(h, w)] * len(reg)
        )
    finally:
        model.score_thresh, model.nms_thresh, model.detections_per_img = saved
    return [{k: v.cpu().numpy() for k, v in d.items()} for d in dets]
