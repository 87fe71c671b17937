"""Model zoo: each architecture is one module (mlp.py, vgg.py, resnet.py) holding its model and its
permutation spec, with three functions of a `ModelConfig`:

- `build_model(cfg, in_shape, num_classes)`: the network; input [N, C, H, W], output logits [N, classes].
- `permutation_spec(cfg)`: which permutation acts on which axis of every state-dict entry
  (all except `num_batches_tracked`), plus `activation_points` for activation matching.
- `feature_points(cfg)`: module names whose outputs are f_1..f_L counted from the input
  (post-ReLU hidden outputs, ResNet stream outputs), the last being the logits.

layers.py holds the building blocks the architectures share (initialised convs, the norm choice and a
norm layer's permutation axes). To add an architecture, write its module and list it in ARCHITECTURES
(and in ModelConfig.arch).
"""
from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import Callable, Iterator, Mapping

from torch import nn

from ..config import ModelConfig
from ..errors import LmcxError
from ..permutation.spec import PermutationSpec
from . import mlp, resnet, vgg

# vgg.py serves both VGG depths; it reads cfg.arch to pick the layout.
ARCHITECTURES: dict[str, ModuleType] = {"mlp": mlp, "vgg11": vgg, "vgg16": vgg, "resnet20": resnet}


def _architecture(cfg: ModelConfig) -> ModuleType:
    if cfg.arch not in ARCHITECTURES:
        raise LmcxError(f"model.arch: unknown architecture {cfg.arch!r}; valid names are {', '.join(ARCHITECTURES)}")
    if not cfg.width > 0:
        raise LmcxError(f"model.width: must be > 0, got {cfg.width}")
    if cfg.norm not in ("bn", "ln", "none"):
        raise LmcxError(f"model.norm: {cfg.norm!r} is not one of bn, ln, none")
    return ARCHITECTURES[cfg.arch]


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    arch = _architecture(cfg)
    if len(in_shape) != 3 or any(int(s) <= 0 for s in in_shape):
        raise LmcxError(f"input shape must be [channels, height, width], all > 0, got {list(in_shape)}")
    if num_classes < 1:
        raise LmcxError(f"the number of classes must be >= 1, got {num_classes}")
    return arch.build_model(cfg, tuple(int(s) for s in in_shape), int(num_classes))


def permutation_spec(cfg: ModelConfig) -> PermutationSpec:
    return _architecture(cfg).permutation_spec(cfg)


def feature_points(cfg: ModelConfig) -> list[str]:
    return _architecture(cfg).feature_points(cfg)


@contextmanager
def forward_hooks(model: nn.Module, hooks: Mapping[str, Callable]) -> Iterator[None]:
    """Forward hooks on the named modules of `model` for the duration of the block (feature analyses,
    activation matching, REPAIR); a name the model lacks means a spec that does not fit the model."""
    modules = dict(model.named_modules())
    missing = [name for name in hooks if name not in modules]
    if missing:
        raise LmcxError(f"the model has no module {missing[0]!r}; the permutation spec or feature points do not "
                        "match this architecture")
    handles = [modules[name].register_forward_hook(fn) for name, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
