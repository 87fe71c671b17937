"""MLP: in -> h -> h -> h -> classes with ReLU, h = 512 * width; images are flattened first.

Parameter names: `layers.{i}.linear.{weight,bias}`, `layers.{i}.norm.*`, `classifier.{weight,bias}`.
Permutations (traced): `layers.{i}` (the units of hidden layer i), i = 0, 1, 2.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from ..config import ModelConfig

BASE_UNITS = 512
DEPTH = 3  # hidden layers


def _units(cfg: ModelConfig) -> int:
    return max(1, round(BASE_UNITS * cfg.width))


def _hidden_layer(n_in: int, n_out: int, cfg: ModelConfig) -> nn.Sequential:
    """Linear -> norm -> ReLU; the ReLU is a named module so its output (f_l) can be hooked."""
    norm = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm}.get(cfg.norm)
    return nn.Sequential(OrderedDict(
        linear=nn.Linear(n_in, n_out, bias=cfg.bias),  # PyTorch's default init
        norm=norm(n_out) if norm else nn.Identity(),  # Identity keeps names the same for every norm
        relu=nn.ReLU(),
    ))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        h = _units(cfg)
        sizes = [math.prod(in_shape)] + [h] * DEPTH
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*[_hidden_layer(sizes[i], sizes[i + 1], cfg) for i in range(DEPTH)])
        self.classifier = nn.Linear(h, num_classes, bias=cfg.bias)

    def forward(self, x):
        return self.classifier(self.layers(self.flatten(x)))


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return MLP(cfg, in_shape, num_classes)


def permutation_name(traced: str) -> str:
    """The name permutation files have always used for a traced permutation: `layers.{i}.linear` -> `layers.{i}`."""
    return traced.removesuffix(".linear")


def feature_points(cfg: ModelConfig) -> list[str]:
    return [f"layers.{i}.relu" for i in range(DEPTH)] + ["classifier"]
