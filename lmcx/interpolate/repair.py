"""REPAIR (Jordan et al., ICLR 2023), the `repair` norm fix of θ(λ).

Each unit's activation mean and std in θ(λ) are made to match `(1 − λ)·stat_A + λ·stat_B`, the
interpolation of the endpoints' statistics, measured (once per model, not per λ) on the same training
batches as the other norm fixes (in BN networks on the endpoints with their running statistics reset on
those batches, as every θ(λ) is; see `endpoint_stats`). The repaired activations are the BN outputs in
BN networks and the outputs of every Linear/Conv except the output layer in norm-free networks. As in
Jordan et al.'s implementation, one pass over the batches corrects every layer at once: during it each
repaired activation is standardised with its batch statistics and mapped to the target, so later layers
see corrected inputs; the correction is then folded into the model:
  * BN networks: the BN affine parameters are set to the target (weight = sign(weight)·target std,
    bias = target mean), then the running statistics are reset under them (that pass *is* the
    measurement: a BN output in train mode has exactly mean = bias and std = |weight| per batch);
  * norm-free networks: the preceding Linear/Conv is rescaled per output unit and its bias shifted
    (W' = r·W, b' = r·b + (target mean − r·mean), r = target std / std); without biases only the
    scale can be corrected.
Not defined for LayerNorm networks (their normalisation is per sample, not per unit): an error.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import progress
from ..errors import LmcxError
from ..models import forward_hooks
from .norm_fix import BATCH_NORM, model_norm, reset_bn_stats

BN_EPS = 1e-5


def repair_points(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs REPAIR corrects: every BatchNorm (BN nets), or every Linear/Conv but
    the last one, the output layer (norm-free nets)."""
    norm = model_norm(model)
    if norm == "ln":
        raise LmcxError("norm_fix=repair (REPAIR) is not defined for LayerNorm models (norm ln); use none")
    if norm == "bn":
        points = [(n, m) for n, m in model.named_modules() if isinstance(m, BATCH_NORM)]
        if any(m.weight is None for _, m in points):
            raise LmcxError("norm_fix=repair needs BatchNorm layers with affine parameters; use reset")
        return points
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    return layers[:-1]


@torch.no_grad()
def activation_stats(model: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and (population) std of the outputs of modules `names` of `model` in eval mode,
    over `inputs` (float64)."""
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n in names}

    def hook(name):
        def fn(_module, _inp, out):
            dims = [0] + list(range(2, out.ndim))
            y = out.detach().double()
            acc = sums[name]
            acc[0] = acc[0] + y.sum(dims)
            acc[1] = acc[1] + (y * y).sum(dims)
            acc[2] += out.numel() // out.shape[1]
        return fn

    was_training = model.training
    model.eval()
    with forward_hooks(model, {n: hook(n) for n in names}):
        for x in inputs:
            progress.tick()
            model(x)
    model.train(was_training)
    stats = {}
    for n, (s, s2, count) in sums.items():
        mean = s / count
        stats[n] = (mean, (s2 / count - mean * mean).clamp_min(0).sqrt())
    return stats


def endpoint_stats(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR's statistics of an endpoint: per-unit mean and std at every repair point, measured in eval
    mode on `inputs`. For BN networks they are measured on a copy of the endpoint whose running statistics
    were reset on the same inputs, as every θ(λ) is: stale running averages left by training must not
    become REPAIR's target (and so, at λ = 0 and 1, REPAIR agrees with reset up to sampling noise)."""
    names = [n for n, _ in repair_points(model)]
    if model_norm(model) == "bn":
        model = copy.deepcopy(model)
        reset_bn_stats(model, inputs)
    return activation_stats(model, names, inputs)


@torch.no_grad()
def repair(model: nn.Module, inputs: Sequence[torch.Tensor], stats_a: dict, stats_b: dict, lam: float) -> None:
    """REPAIR θ(λ) in place (see the module docstring): targets (1 − λ)·stat_A + λ·stat_B."""
    points = repair_points(model)
    targets = {}
    for name, module in points:
        (ma, sa), (mb, sb) = stats_a[name], stats_b[name]
        dev, dt = module.weight.device, module.weight.dtype
        targets[name] = ((ma * (1.0 - lam) + mb * lam).to(dev, dt), (sa * (1.0 - lam) + sb * lam).to(dev, dt))
    if model_norm(model) == "bn":
        for name, bn in points:
            t_mean, t_std = targets[name]
            bn.weight.copy_(torch.where(bn.weight < 0, -t_std, t_std))
            bn.bias.copy_(t_mean)
        reset_bn_stats(model, inputs)
        return

    # Norm-free: one pass with every repaired output standardised by its batch statistics and mapped to
    # the target (exactly a BatchNorm in train mode with weight = target std and bias = target mean),
    # keeping the cumulative average of batch means and unbiased variances, like BN with momentum=None.
    running = {name: [torch.zeros_like(targets[name][0]), torch.ones_like(targets[name][0]), 0]
               for name, _ in points}

    def hook(name, has_bias):
        t_mean, t_std = targets[name]

        def fn(_module, _inp, out):
            r = running[name]
            r[2] += 1
            if has_bias:
                return F.batch_norm(out, r[0], r[1], t_std, t_mean, training=True, momentum=1.0 / r[2], eps=BN_EPS)
            # no bias to shift with: only the scale is corrected, so only the std is matched
            dims = [0] + list(range(2, out.ndim))
            var, mean = torch.var_mean(out, dim=dims, correction=1)
            r[0].mul_(1 - 1.0 / r[2]).add_(mean / r[2])
            r[1].mul_(1 - 1.0 / r[2]).add_(var / r[2])
            return out * (t_std / (var + BN_EPS).sqrt()).view((1, -1) + (1,) * (out.ndim - 2))
        return fn

    model.eval()
    with forward_hooks(model, {n: hook(n, m.bias is not None) for n, m in points}):
        for x in inputs:
            progress.tick()
            model(x)
    for name, module in points:  # fold: W' = r·W, b' = r·b + (target mean − r·mean), r = target std / std
        mean, var, _ = running[name]
        t_mean, t_std = targets[name]
        r = t_std / (var + BN_EPS).sqrt()
        module.weight.mul_(r.view((-1,) + (1,) * (module.weight.ndim - 1)))
        if module.bias is not None:
            module.bias.copy_(r * module.bias + (t_mean - r * mean))
