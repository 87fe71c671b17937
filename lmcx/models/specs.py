"""Permutation specs and feature points of every model, read off the model itself.

`permutation_spec` traces the model (lmcx/permutation/trace.py) on a random batch of the dataset's
shape and checks the spec on it (check.py): no architecture has a hand-written spec, so adding one
means writing the model and nothing else. Results are cached per (arch, width, norm, bias, input
shape, classes) for the life of the process.

Built-in architectures are traced at width min(width, 1): their structure does not depend on the
width (only the unit counts do, and the spec holds no sizes), while checking a 64x ResNet-20 in float64
would need tens of GB. Their permutations keep the names that permutation files have always stored
(each module's `permutation_name`), and they keep their own feature points (`feature_points` of their
module). Models from outside lmcx get the traced names, and feature points from the traced spec (see
`feature_points`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from ..arch import arch_kind
from ..config import ModelConfig
from ..errors import LmcxError
from ..permutation.check import Coverage, spec_coverage
from ..permutation.spec import PermutationSpec, permutation_spec_from_axes
from ..permutation.trace import trace_spec

TRACE_SEED = 0  # the model and the example batch a spec is traced on: the same in every process
TRACE_BATCH = 2  # the smallest batch BatchNorm trains on (the check runs the model in train mode too)

_traced: dict[tuple, tuple[PermutationSpec, Coverage, list[str] | str | None]] = {}


def permutation_spec(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> PermutationSpec:
    return _trace(cfg, in_shape, num_classes)[0]


def permutation_coverage(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> Coverage:
    """How much of the model its spec permutes, and what is pinned and why (check.py's Coverage)."""
    return _trace(cfg, in_shape, num_classes)[1]


def feature_points(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> list[str]:
    """Module names whose outputs are f_1..f_L from the input, the last being the logits (LEWC's layers).

    Built-ins: their module's list (post-ReLU hidden outputs, ResNet-20's stream outputs). Other models:
    the activation points of the traced spec in execution order, where consecutive points of one
    permutation count once (the last of them: conv -> bn keeps the bn), then the module that returns
    the logits. A model without such points, or whose logits no module returns, is refused."""
    from . import builtin_module

    if arch_kind(cfg.arch) == "builtin":
        return builtin_module(cfg).feature_points(cfg)
    points = _trace(cfg, in_shape, num_classes)[2]
    if isinstance(points, str):
        raise LmcxError(f"{cfg.arch} has no feature points for layerwise analyses: {points}")
    return points


def _trace(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int):
    builtin = arch_kind(cfg.arch) == "builtin"
    traced_cfg = replace(cfg, width=min(cfg.width, 1.0)) if builtin else cfg
    key = (cfg.arch, traced_cfg.width, cfg.norm, cfg.bias, tuple(int(s) for s in in_shape), int(num_classes))
    if key not in _traced:
        from . import build_model, builtin_module  # (the package imports this module)

        with torch.random.fork_rng(devices=[]):  # tracing must not move the caller's random stream
            torch.manual_seed(TRACE_SEED)
            model = build_model(traced_cfg, in_shape, num_classes)
            example = torch.randn(TRACE_BATCH, *in_shape)
        spec = trace_spec(model, example)
        if builtin:
            spec = _renamed(spec, builtin_module(cfg).permutation_name)
        points = None if builtin else _traced_feature_points(model, spec, example)
        _traced[key] = (spec, spec_coverage(spec, model.state_dict()), points)
    return _traced[key]


def _renamed(spec: PermutationSpec, rename: Callable[[str], str]) -> PermutationSpec:
    names = {p: rename(p) for p in spec.names}
    if len(set(names.values())) != len(names):
        raise AssertionError(f"permutation names collide after renaming: {names}")
    axes = {k: tuple(names.get(p) for p in entry) for k, entry in spec.axes_to_perm.items()}
    points = {names[p]: list(v) for p, v in spec.activation_points.items()}
    return permutation_spec_from_axes(axes, points, spec.block_sizes, spec.pinned)


def _traced_feature_points(model: nn.Module, spec: PermutationSpec, example: torch.Tensor) -> list[str] | str:
    """`feature_points` of an outside model, or the reason it has none."""
    perm_of = {name: p for p, names in spec.activation_points.items() for name in names}
    finished: list[tuple[str, object]] = []  # (module, its output), in the order the modules return
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: finished.append((name, out)))
               for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            out = model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    points: list[str] = []
    for name, _ in finished:
        if name in perm_of:
            if points and perm_of[points[-1]] == perm_of[name]:
                points[-1] = name
            else:
                points.append(name)
    logits = next((name for name, value in finished if value is out), None)
    if not points:
        return ("no module's output carries a permutation (every hidden axis is pinned, or only modules called "
                "more than once carry them)")
    if logits is None:
        return "its logits are computed outside any module (the last operation of forward() is not a module call)"
    return points + [logits]

