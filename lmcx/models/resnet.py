"""ResNet-20, CIFAR variant: conv stem, 3 stages x 3 basic blocks (16/32/64 x width channels),
stride 2 at the start of stages 2 and 3, global average pool, one Linear.

Parameter names: `stem.conv.*`, `stem.norm.*`, `stages.{s}.{b}.{conv1,norm1,conv2,norm2}.*`,
`stages.{s}.{b}.shortcut.{conv,norm}.*` (first block of stages 1 and 2 only), `classifier.*`.

Permutations (traced): everything added into one residual stream shares a permutation, or the sum would
mix units. `stream.0` = stem output and every block output of stage 0; `stream.{s}` (s = 1, 2) starts
at stage s's shortcut conv and is shared by that stage's blocks. `stages.{s}.{b}.conv1` = the hidden
channels inside block (s, b), free to permute on their own.
"""
from __future__ import annotations

import re
from collections import OrderedDict

from torch import nn

from ..config import ModelConfig
from .layers import HeConv2d, norm2d

STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = 3


def _channels(base: int, cfg: ModelConfig) -> int:
    return max(1, round(base * cfg.width))


def _conv(c_in: int, c_out: int, kernel: int, stride: int, bias: bool) -> nn.Conv2d:
    return HeConv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)


def _has_shortcut_conv(stage: int, block: int) -> bool:
    """The shape changes (stride 2, more channels) only at the first block of stages 1 and 2."""
    return stage > 0 and block == 0


class BasicBlock(nn.Module):
    """relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ModelConfig, shortcut_conv: bool):
        super().__init__()
        self.conv1 = _conv(c_in, c_out, 3, stride, cfg.bias)
        self.norm1 = norm2d(cfg.norm, c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv(c_out, c_out, 3, 1, cfg.bias)
        self.norm2 = norm2d(cfg.norm, c_out)
        if shortcut_conv:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=_conv(c_in, c_out, 1, stride, cfg.bias), norm=norm2d(cfg.norm, c_out)))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()  # its output is the block output: what flows in the residual stream

    def forward(self, x):
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c = _channels(STAGE_CHANNELS[0], cfg)
        self.stem = nn.Sequential(OrderedDict(
            conv=_conv(in_shape[0], c, 3, 1, cfg.bias),
            norm=norm2d(cfg.norm, c),
            relu=nn.ReLU(),
        ))
        stages = []
        for s, base in enumerate(STAGE_CHANNELS):
            c_out = _channels(base, cfg)
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(c, c_out, stride, cfg, _has_shortcut_conv(s, b)))
                c = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes, bias=cfg.bias)  # PyTorch's default init

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.stages(self.stem(x)))))


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return ResNet20(cfg, in_shape, num_classes)


def permutation_name(traced: str) -> str:
    """The name permutation files have always used for a traced permutation. A stream is traced under the
    first module that produces it: the stem conv (`stream.0`), or conv2 of stage s's first block (`stream.{s}`)."""
    if traced == "stem.conv":
        return "stream.0"
    stage = re.fullmatch(r"stages\.(\d+)\.0\.conv2", traced)
    return f"stream.{stage[1]}" if stage and stage[1] != "0" else traced


def feature_points(cfg: ModelConfig) -> list[str]:
    blocks = [f"stages.{s}.{b}.relu2" for s in range(len(STAGE_CHANNELS)) for b in range(BLOCKS_PER_STAGE)]
    return ["stem.relu"] + blocks + ["classifier"]
