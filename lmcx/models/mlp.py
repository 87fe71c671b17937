"""MLP: in -> h -> h -> h -> classes with ReLU, h = 512 * width; images are flattened first.

Parameter names: `layers.{i}.linear.{weight,bias}`, `layers.{i}.norm.*`, `classifier.{weight,bias}`.
Permutations: `layers.{i}` (the units of hidden layer i), i = 0, 1, 2.
"""
from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from ..config import ModelConfig
from ..permutation.spec import PermutationSpec, permutation_spec_from_axes
from .layers import norm_axes

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


def permutation_spec(cfg: ModelConfig) -> PermutationSpec:
    axes: dict[str, tuple[str | None, ...]] = {}
    activations: dict[str, list[str]] = {}
    prev = None  # the input pixels are never permuted
    for i in range(DEPTH):
        p = f"layers.{i}"
        # Linear weight is [out, in]: rows are this layer's units, columns the previous layer's.
        axes[f"layers.{i}.linear.weight"] = (p, prev)
        if cfg.bias:
            axes[f"layers.{i}.linear.bias"] = (p,)
        axes.update(norm_axes(f"layers.{i}.norm", cfg.norm, p))
        activations[p] = [f"layers.{i}.relu"]
        prev = p
    axes["classifier.weight"] = (None, prev)  # output units (classes) are never permuted
    if cfg.bias:
        axes["classifier.bias"] = (None,)
    return permutation_spec_from_axes(axes, activations)


def feature_points(cfg: ModelConfig) -> list[str]:
    return [f"layers.{i}.relu" for i in range(DEPTH)] + ["classifier"]
