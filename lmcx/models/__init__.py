"""Model zoo: the built-in architectures (mlp.py, vgg.py, resnet.py, one module each) and models from
outside lmcx (external.py: `torchvision.<name>` and the user's `module:callable` factories; lmcx/arch.py
says which names exist). Four functions of a `ModelConfig`:

- `build_model(cfg, in_shape, num_classes)`: the network; input [N, C, H, W], output logits [N, classes].
- `permutation_spec(cfg, in_shape, num_classes)`: which permutation acts on which axis of every
  state-dict entry, plus `activation_points` for activation matching; traced from the model itself
  and checked on it, for every architecture (specs.py).
- `permutation_coverage(...)`: how much of the model that spec permutes, and what is pinned and why.
- `feature_points(cfg, in_shape, num_classes)`: module names whose outputs are f_1..f_L counted from
  the input, the last being the logits (specs.py says how they are found).

layers.py holds the building blocks the built-ins share (initialised convs, the norm choice). To add a
built-in architecture, write its module (the model, `build_model`, `feature_points`) and list it in
ARCHITECTURES and lmcx.arch.BUILTIN_ARCHS; no permutation spec is written by hand.
"""
from __future__ import annotations

from contextlib import contextmanager
from types import ModuleType
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from ..arch import arch_kind
from ..config import ModelConfig
from ..errors import LmcxError
from . import mlp, resnet, vgg
from .specs import feature_points, permutation_coverage, permutation_spec

__all__ = ["ARCHITECTURES", "build_model", "check_model_size", "permutation_spec", "permutation_coverage",
           "feature_points", "forward_hooks"]

# vgg.py serves both VGG depths; it reads cfg.arch to pick the layout.
ARCHITECTURES: dict[str, ModuleType] = {"mlp": mlp, "vgg11": vgg, "vgg16": vgg, "resnet20": resnet}
# Bounds of what lmcx builds (far beyond the papers' widths 1-16 and CIFAR-100's 100 classes): a value
# beyond them is a typo or a hostile checkpoint header, refused before any memory is allocated.
MAX_WIDTH = 1024
MAX_INPUT_SHAPE = (64, 4096, 4096)  # channels, height, width
MAX_CLASSES = 100_000
MAX_PARAMETERS = 2 ** 32  # 16 GiB of float32 weights


def builtin_module(cfg: ModelConfig) -> ModuleType:
    """The module of a built-in architecture, after checking the settings it reads."""
    if not cfg.width > 0:
        raise LmcxError(f"model.width: must be > 0, got {cfg.width}")
    if cfg.norm not in ("bn", "ln", "none"):
        raise LmcxError(f"model.norm: {cfg.norm!r} is not one of bn, ln, none")
    return ARCHITECTURES[cfg.arch]


def _kind(cfg: ModelConfig) -> str:
    try:
        return arch_kind(cfg.arch)
    except LmcxError as e:
        raise LmcxError(f"model.arch: {e}") from None


def check_model_size(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> None:
    """Range-check what decides a model's size (from a config, a flag or a checkpoint header) before
    anything is allocated: the parameters are counted on the `meta` device, which allocates nothing."""
    builtin = _kind(cfg) == "builtin"
    arch = builtin_module(cfg) if builtin else None
    if not cfg.width <= MAX_WIDTH:
        raise LmcxError(f"model.width: {cfg.width:g} is more than {MAX_WIDTH}; lower it")
    if len(in_shape) != 3 or not all(1 <= int(s) <= limit for s, limit in zip(in_shape, MAX_INPUT_SHAPE)):
        raise LmcxError(f"input shape must be [channels, height, width], each >= 1 and at most "
                        f"{list(MAX_INPUT_SHAPE)}, got {list(in_shape)[:8]}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise LmcxError(f"the number of classes must be in [1, {MAX_CLASSES}], got {num_classes}")
    with torch.device("meta"):
        if builtin:
            model = arch.build_model(cfg, tuple(in_shape), num_classes)
        else:
            from .external import build_unchecked

            try:
                model = build_unchecked(cfg, tuple(int(s) for s in in_shape), num_classes)
            except LmcxError:
                if _kind(cfg) == "factory":
                    return  # the user's code may not build on `meta`: the real build counts and reports
                raise
        count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise LmcxError(f"model.width={cfg.width:g} gives a {cfg.arch} of {count:.3g} parameters for input "
                        f"{list(in_shape)} and {num_classes} classes, more than the {MAX_PARAMETERS:.3g} lmcx "
                        "builds; lower model.width")


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    in_shape = tuple(int(s) for s in in_shape)
    check_model_size(cfg, in_shape, int(num_classes))
    if _kind(cfg) != "builtin":
        from .external import build_external

        return build_external(cfg, in_shape, int(num_classes))
    return builtin_module(cfg).build_model(cfg, in_shape, int(num_classes))


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
