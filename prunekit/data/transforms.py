"""Data augmentation on tensors: SSD's training pipeline and the usual small-image classification one.

Detection transforms take and return ``(image, target)`` with ``image`` float [3, H, W] in [0, 1]
and ``target["boxes"]`` xyxy absolute pixels; every per-box field (``labels``, ``difficult``...)
is filtered together with the boxes. Randomness comes from torch's global generator (or the
``generator`` given), so DataLoader worker seeding and ``torch.manual_seed`` make runs repeatable.

SSD augmentation (Liu et al. 2016, section 2.2): photometric distortion, zoom-out ("expand") onto
a mean-coloured canvas, a random crop whose IoU with some object exceeds a sampled minimum, and a
horizontal flip. Resizing to the network input is left to the model (torchvision's SSD resizes
internally); :class:`Resize` exists for fixed-size batching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Target = dict[str, Any]
# Fields indexed like target["boxes"] (first dimension = number of objects).
PER_BOX_KEYS = ("boxes", "labels", "difficult", "area", "iscrowd")
# The mean image colour in [0, 1] (ImageNet / torchvision SSD), used to fill zoomed-out canvases.
DEFAULT_FILL = (0.485, 0.456, 0.406)


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _coin(p: float, generator: torch.Generator | None) -> bool:
    return p > 0 and float(torch.rand((), generator=generator)) < p


def select_boxes(target: Target, keep: Tensor) -> Target:
    """``target`` with only the objects where ``keep`` (bool [n]) is true."""
    out = dict(target)
    for k in PER_BOX_KEYS:
        if k in out and isinstance(out[k], Tensor):
            out[k] = out[k][keep]
    return out


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix [len(a), len(b)] for xyxy boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: Target | None = None):
        for t in self.transforms:
            if target is None:
                image = t(image)
            else:
                image, target = t(image, target)
        return image if target is None else (image, target)

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"{type(self).__name__}([{inner}])"


_LUMA = (0.299, 0.587, 0.114)


def colour_matrix(saturation: float = 1.0, hue: float = 0.0) -> Tensor:
    """3x3 RGB matrix that scales saturation (blend with luma grey) and rotates hue by ``hue``
    turns about the grey axis. One matmul instead of an RGB->HSV->RGB round trip, which costs
    ~50x more on a CPU; the rotation is the usual linear approximation of an HSV hue shift."""
    t = 2 * math.pi * hue
    c, s3 = math.cos(t), math.sin(t) / math.sqrt(3.0)
    k = (1 - c) / 3
    rot = torch.tensor([[c + k, k - s3, k + s3], [k + s3, c + k, k - s3], [k - s3, k + s3, c + k]])
    grey = torch.tensor(_LUMA).expand(3, 3)
    sat = saturation * torch.eye(3) + (1 - saturation) * grey
    return sat @ rot


class PhotometricDistort:
    """SSD's colour jitter: brightness (additive), contrast (multiplicative), saturation and hue,
    each applied with probability ``p``; contrast goes before or after the colour changes at
    random. ``channel_swap_p`` > 0 adds SSD's random channel permutation (off by default: it
    destroys colour cues that some classes, e.g. traffic signs, depend on)."""

    def __init__(
        self,
        brightness: float = 32 / 255,
        contrast: tuple[float, float] = (0.5, 1.5),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: float = 18 / 360,
        p: float = 0.5,
        channel_swap_p: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p, self.channel_swap_p, self.generator = p, channel_swap_p, generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        g = self.generator
        img = image
        if _coin(self.p, g):
            img = (img + _uniform(-self.brightness, self.brightness, g)).clamp_(0.0, 1.0)
        contrast_first = _coin(0.5, g)
        alpha = _uniform(*self.contrast, g) if _coin(self.p, g) else 1.0
        sat = _uniform(*self.saturation, g) if _coin(self.p, g) else 1.0
        hue = _uniform(-self.hue, self.hue, g) if _coin(self.p, g) else 0.0
        if alpha != 1.0 and contrast_first:
            img = (img * alpha).clamp_(0.0, 1.0)
        if sat != 1.0 or hue != 0.0:
            m = colour_matrix(sat, hue).to(img)
            img = torch.einsum("ij,jhw->ihw", m, img).clamp_(0.0, 1.0)
        if alpha != 1.0 and not contrast_first:
            img = (img * alpha).clamp_(0.0, 1.0)
        if _coin(self.channel_swap_p, g):
            img = img[torch.randperm(3, generator=g)]
        return img, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class RandomZoomOut:
    """SSD's "expand": place the image on a canvas ``ratio`` in [1, max_ratio] times larger,
    filled with the mean colour, so that objects become small (trains the early detection layers)."""

    def __init__(
        self,
        max_ratio: float = 4.0,
        p: float = 0.5,
        fill: Sequence[float] = DEFAULT_FILL,
        generator: torch.Generator | None = None,
    ):
        if max_ratio < 1:
            raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
        self.max_ratio, self.p, self.fill, self.generator = max_ratio, p, tuple(fill), generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        g = self.generator
        if not _coin(self.p, g):
            return image, target
        _, h, w = image.shape
        ratio = _uniform(1.0, self.max_ratio, g)
        ch, cw = int(h * ratio), int(w * ratio)
        top = int(_uniform(0, ch - h, g))
        left = int(_uniform(0, cw - w, g))
        canvas = torch.tensor(self.fill, dtype=image.dtype, device=image.device).view(3, 1, 1)
        canvas = canvas.expand(3, ch, cw).clone()
        canvas[:, top : top + h, left : left + w] = image
        target = dict(target)
        target["boxes"] = target["boxes"] + torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        return canvas, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_ratio={self.max_ratio}, p={self.p})"


class RandomIoUCrop:
    """SSD's crop: pick a minimum IoU from ``options`` (``None`` = keep the whole image), then try
    ``trials`` crops of scale [min_scale, 1] and aspect [min_aspect, max_aspect] until one overlaps
    some object at least that much; objects whose centre falls outside the crop are dropped, the
    rest clipped to it. Images without objects are returned unchanged."""

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect: float = 0.5,
        max_aspect: float = 2.0,
        options: Sequence[float | None] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0),
        trials: int = 50,
        generator: torch.Generator | None = None,
    ):
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self.options, self.trials, self.generator = list(options), trials, generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        g = self.generator
        boxes = target["boxes"]
        if boxes.numel() == 0:
            return image, target
        _, h, w = image.shape
        for _ in range(10):  # bounded: SSD loops forever; giving up means "keep the whole image"
            choice = self.options[int(torch.randint(len(self.options), (), generator=g))]
            if choice is None:
                return image, target
            for _ in range(self.trials):
                cw = w * _uniform(self.min_scale, self.max_scale, g)
                chh = h * _uniform(self.min_scale, self.max_scale, g)
                if not self.min_aspect <= cw / chh <= self.max_aspect:
                    continue
                left = int(_uniform(0, w - cw, g))
                top = int(_uniform(0, h - chh, g))
                right, bottom = int(left + cw), int(top + chh)
                if right - left < 1 or bottom - top < 1:
                    continue
                cx = (boxes[:, 0] + boxes[:, 2]) / 2
                cy = (boxes[:, 1] + boxes[:, 3]) / 2
                inside = (cx > left) & (cx < right) & (cy > top) & (cy < bottom)
                if not inside.any():
                    continue
                crop = torch.tensor([[left, top, right, bottom]], dtype=boxes.dtype)
                if box_iou(boxes[inside], crop).max() < choice:
                    continue
                out = select_boxes(target, inside)
                b = out["boxes"] - torch.tensor([left, top, left, top], dtype=boxes.dtype)
                b[:, 0::2] = b[:, 0::2].clamp(0, right - left)
                b[:, 1::2] = b[:, 1::2].clamp(0, bottom - top)
                out["boxes"] = b
                return image[:, top:bottom, left:right].contiguous(), out
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_scale={self.min_scale}, trials={self.trials})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p, self.generator = p, generator

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        if not _coin(self.p, self.generator):
            return image, target
        w = image.shape[-1]
        target = dict(target)
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class Resize:
    """Resize to ``size`` (H, W) and scale the boxes; for fixed-size batching outside the model."""

    def __init__(self, size: int | Sequence[int]):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        _, h, w = image.shape
        oh, ow = self.size
        if (h, w) == (oh, ow):
            return image, target
        image = F.interpolate(
            image[None], size=(oh, ow), mode="bilinear", align_corners=False, antialias=True
        )[0]
        target = dict(target)
        scale = torch.tensor([ow / w, oh / h, ow / w, oh / h], dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
        return image.clamp_(0.0, 1.0), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class SanitizeBoxes:
    """Drop objects whose box became narrower/shorter than ``min_size`` pixels (after cropping)."""

    def __init__(self, min_size: float = 1.0):
        self.min_size = min_size

    def __call__(self, image: Tensor, target: Target) -> tuple[Tensor, Target]:
        b = target["boxes"]
        keep = ((b[:, 2] - b[:, 0]) >= self.min_size) & ((b[:, 3] - b[:, 1]) >= self.min_size)
        if bool(keep.all()):
            return image, target
        return image, select_boxes(target, keep)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size})"


class SSDAugmentation(Compose):
    """The SSD training pipeline; ``size`` adds a final resize for fixed-size batches."""

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        fill: Sequence[float] = DEFAULT_FILL,
        max_zoom_out: float = 4.0,
        generator: torch.Generator | None = None,
    ):
        steps: list[Callable] = [
            PhotometricDistort(generator=generator),
            RandomZoomOut(max_zoom_out, fill=fill, generator=generator),
            RandomIoUCrop(generator=generator),
            RandomHorizontalFlip(generator=generator),
            SanitizeBoxes(),
        ]
        if size is not None:
            steps.append(Resize(size))
        super().__init__(steps)


def ssd_train_transforms(size: int | Sequence[int] | None = None, **kw: Any) -> SSDAugmentation:
    return SSDAugmentation(size, **kw)


def ssd_eval_transforms(size: int | Sequence[int] | None = None) -> Compose | None:
    """Evaluation: nothing (the model resizes), or a plain resize for fixed-size batches."""
    return None if size is None else Compose([Resize(size)])


# ---- classification (single image, no target) ------------------------------------------------


class RandomCropPadded:
    """Random ``size`` crop (default: the input size) from the image zero-padded by ``padding``
    pixels (the CIFAR recipe)."""

    def __init__(
        self,
        size: int | Sequence[int] | None = None,
        padding: int = 4,
        generator: torch.Generator | None = None,
    ):
        self.size = (
            None if size is None else (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        )
        self.padding, self.generator = padding, generator

    def __call__(self, image: Tensor) -> Tensor:
        p = self.padding
        oh, ow = self.size if self.size is not None else image.shape[-2:]
        padded = F.pad(image, (p, p, p, p)) if p else image
        h, w = padded.shape[-2:]
        top = int(torch.randint(h - oh + 1, (), generator=self.generator))
        left = int(torch.randint(w - ow + 1, (), generator=self.generator))
        return padded[..., top : top + oh, left : left + ow]


class RandomFlipImage:
    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None):
        self.p, self.generator = p, generator

    def __call__(self, image: Tensor) -> Tensor:
        return image.flip(-1) if _coin(self.p, self.generator) else image


class ResizeImage:
    def __init__(self, size: int | Sequence[int]):
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, image: Tensor) -> Tensor:
        if tuple(image.shape[-2:]) == self.size:
            return image
        is_uint8 = image.dtype == torch.uint8
        x = image.float() if is_uint8 else image
        x = F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        return x.round().clamp(0, 255).to(torch.uint8) if is_uint8 else x


def classification_train_transforms(
    size: int | Sequence[int] | None = None, padding: int = 4, flip: bool = True
) -> Compose:
    """Random crop with ``padding`` + horizontal flip (CIFAR). Traffic signs (GTSRB) need
    ``flip=False``: a mirrored "turn left" is a "turn right"."""
    steps: list[Callable] = [RandomCropPadded(size, padding)]
    if flip:
        steps.append(RandomFlipImage())
    return Compose(steps)
