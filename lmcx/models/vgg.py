"""VGG-11 and VGG-16, CIFAR variants: 3x3 conv stacks with max-pools, global average pool, one Linear.

Channels are 64/128/256/512 times width. Works on any input size: a max-pool is skipped once the
feature map is 1 pixel wide, and adaptive average pooling to 1x1 makes the classifier's input size
independent of the image size.

Parameter names: `features.{i}.conv.{weight,bias}`, `features.{i}.norm.*`, `classifier.{weight,bias}`
(i counts conv layers, pools do not get an index). Permutations (traced): `features.{i}` (output channels
of conv i).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..config import ModelConfig
from .layers import HeConv2d, norm2d

# Output channels of each conv at width 1; "M" = 2x2 max-pool after the preceding conv.
LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def _convs(cfg: ModelConfig) -> list[tuple[int, bool]]:
    """(base channels, followed by a max-pool in the layout) for each conv layer."""
    layout = LAYOUTS[cfg.arch]
    return [(c, i + 1 < len(layout) and layout[i + 1] == "M") for i, c in enumerate(layout) if c != "M"]


class VGG(nn.Module):
    def __init__(self, cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c_in, h, w = in_shape
        blocks = []
        for base, pool in _convs(cfg):
            c_out = max(1, round(base * cfg.width))
            parts: OrderedDict[str, nn.Module] = OrderedDict(
                conv=HeConv2d(c_in, c_out, 3, padding=1, bias=cfg.bias),
                norm=norm2d(cfg.norm, c_out),
                relu=nn.ReLU(),  # named, so f_l (pre-pool) can be hooked
            )
            if pool and min(h, w) >= 2:  # small images run out of pixels before the layout does
                parts["pool"] = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
            blocks.append(nn.Sequential(parts))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes, bias=cfg.bias)  # PyTorch's default init

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return VGG(cfg, in_shape, num_classes)


def permutation_name(traced: str) -> str:
    """The name permutation files have always used for a traced permutation: `features.{i}.conv` -> `features.{i}`."""
    return traced.removesuffix(".conv")


def feature_points(cfg: ModelConfig) -> list[str]:
    return [f"features.{i}.relu" for i in range(len(_convs(cfg)))] + ["classifier"]
