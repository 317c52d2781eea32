"""VGG16 classifiers: the ImageNet layout (torchvision-compatible) and a CIFAR layout.

``variant="imagenet"`` keeps torchvision's module names and its 7x7 adaptive pool, so on 32x32
CIFAR images it is the 134.3M-parameter network of the paper's Table 8 (25088-4096-4096-10).
``variant="cifar"`` is the usual CIFAR VGG16 with batch norm and a 512-512-512-C classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from prunekit.models.config import ArchConfig, scaled

_CONVS = [
    ("conv1_1", 64), ("conv1_2", 64), "M",
    ("conv2_1", 128), ("conv2_2", 128), "M",
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), "M",
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), "M",
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), "M",
]  # fmt: skip
_FCS = {"imagenet": [("fc6", 4096), ("fc7", 4096)], "cifar": [("fc6", 512), ("fc7", 512)]}
CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def default_channels(variant: str, width: float = 1.0) -> dict[str, int]:
    convs = {name: scaled(c, width) for name, c in (p for p in _CONVS if isinstance(p, tuple))}
    return {**convs, **{name: scaled(c, width) for name, c in _FCS[variant]}}


class VGG(nn.Module):
    """``features`` -> ``avgpool`` -> flatten -> ``classifier``, as in torchvision."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        variant = cfg.variant or "imagenet"
        ch = {**default_channels(variant), **cfg.channels}
        layers: list[nn.Module] = []
        cin = 3
        for item in _CONVS:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            name, _ = item
            layers.append(nn.Conv2d(cin, ch[name], kernel_size=3, padding=1))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(ch[name]))
            layers.append(nn.ReLU(inplace=True))
            cin = ch[name]
        self.features = nn.Sequential(*layers)
        pool = 7 if variant == "imagenet" else 1
        self.avgpool = _adaptive_pool(pool, tuple(cfg.input_size))
        flat = cin * pool * pool
        self.classifier = nn.Sequential(
            nn.Linear(flat, ch["fc6"]),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(ch["fc6"], ch["fc7"]),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(ch["fc7"], cfg.num_classes),
        )
        self.prunekit_config = cfg
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # PyTorch's fan-in scaled default, not torchvision's fixed N(0, 0.01): at width 0.25
                # the fixed std starves a 6272-1024-1024 head and the loss sits at ln(10) for an epoch.
                m.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def _adaptive_pool(out: int, input_size: tuple[int, ...]) -> nn.Module:
    """``AdaptiveAvgPool2d(out)``, or the nearest-neighbour upsampling it equals when the feature
    map (input / 32) divides ``out``: torchvision's 7x7 pool on a 32x32 CIFAR image replicates a 1x1
    map, which ONNX cannot export as a pool (output size not a factor of the input) but can as a
    resize. Same function, same (empty) state dict."""
    fh, fw = (max(1, int(s) // 32) for s in input_size[:2]) if len(input_size) >= 2 else (0, 0)
    if fh == fw and fh < out and out % fh == 0:
        return nn.Upsample(scale_factor=out // fh, mode="nearest")
    return nn.AdaptiveAvgPool2d((out, out))


def vgg16_config(
    num_classes: int = 10,
    variant: str = "cifar",
    width: float = 1.0,
    batch_norm: bool | None = None,
    class_names: list[str] | None = None,
) -> ArchConfig:
    if variant not in _FCS:
        raise ValueError(f"unknown VGG16 variant {variant!r}; expected 'imagenet' or 'cifar'")
    cifar = variant == "cifar"
    return ArchConfig(
        arch="vgg16",
        num_classes=num_classes,
        input_size=(32, 32) if cifar else (224, 224),
        channels=default_channels(variant, width),
        image_mean=list(CIFAR_MEAN if cifar else IMAGENET_MEAN),
        image_std=list(CIFAR_STD if cifar else IMAGENET_STD),
        variant=variant,
        batch_norm=cifar if batch_norm is None else batch_norm,
        class_names=list(class_names or []),
    )


def vgg16(
    num_classes: int = 10, variant: str = "cifar", width: float = 1.0, batch_norm: bool | None = None, **kw
) -> VGG:
    """VGG16 classifier. ``batch_norm`` defaults to True for "cifar", False for "imagenet"."""
    return VGG(vgg16_config(num_classes, variant, width, batch_norm, **kw))
