"""The path between two models: the λ grid and θ(λ) = (1 − λ) θ_A + λ θ_B with a norm fix applied.

Convention (one for all of lmcx): θ(λ) = (1 − λ) θ_A + λ θ_B, so λ = 0 is A and λ = 1 is B.
"""
from __future__ import annotations

import copy
import time
from typing import Sequence

import torch
from torch import nn

from ..checkpoint import check_weights
from ..config import InterpolateConfig, validate
from ..data import Dataset
from ..errors import LmcxError
from .norm_fix import model_norm, norm_fix_inputs, reset_bn_stats, resolve_norm_fix
from .repair import endpoint_stats, repair

LAMBDA_CONVENTION = "theta(lambda) = (1 - lambda) * theta_A + lambda * theta_B; lambda = 0 is A"


def lambda_grid(cfg: InterpolateConfig) -> list[float]:
    """cfg.lambdas (sorted, unique) or cfg.points evenly spaced values; 0, ½ and 1 always included."""
    validate(cfg)
    if cfg.lambdas is not None:
        values = [float(x) for x in cfg.lambdas]
    else:
        values = [i / (cfg.points - 1) for i in range(cfg.points)]
    return sorted(set(values) | {0.0, 0.5, 1.0})


def lerp_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """θ(λ) = (1 − λ) θ_A + λ θ_B for floating tensors; integer buffers (num_batches_tracked) from A.

    λ = 0 is a copy of A and λ = 1 of B, bit for bit (arithmetic would not be: 0·NaN is NaN, −0 + 0 is +0)."""
    check_same_layout(a, b)
    out = {}
    for k, ta in a.items():
        tb = b[k].to(ta.device)
        if not ta.is_floating_point() or lam == 0:
            out[k] = ta.clone()
        elif lam == 1:
            out[k] = tb.clone()
        else:
            out[k] = ta * (1.0 - lam) + tb * lam
    return out


def check_same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same parameter names and shapes, or LmcxError."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise LmcxError(f"the two models have different parameters (e.g. {missing[0]!r}); "
                        "only models of one architecture can be interpolated")
    for k, ta in a.items():
        if ta.shape != b[k].shape:
            raise LmcxError(f"parameter {k!r} has shape {list(ta.shape)} in A but {list(b[k].shape)} in B; "
                            "only models of one architecture and width can be interpolated")


class Interpolator:
    """θ(λ) of one pair (A, B) with a norm fix, reusing one model object for every λ.

    REPAIR's endpoint statistics are measured once here (pass `stats_a` to share A's between pairs)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, inputs: Sequence[torch.Tensor], norm_fix: str,
                 stats_a: dict | None = None):
        self.norm = model_norm(model_a)
        self.norm_fix = resolve_norm_fix(norm_fix, self.norm)
        if model_norm(model_b) != self.norm or type(model_a) is not type(model_b):
            raise LmcxError("models A and B are of different architectures; only models of one architecture "
                            "can be interpolated")
        self.state_a = {k: v.detach().clone() for k, v in model_a.state_dict().items()}
        state_b = model_b.state_dict()
        check_weights(self.state_a, "model A")  # the library path too: 0·NaN would spread B's NaN along the path
        check_weights(state_b, "model B")
        check_same_layout(self.state_a, state_b)
        self.state_b = {k: v.detach().to(self.state_a[k].device).clone() for k, v in state_b.items()}
        self.model = copy.deepcopy(model_a).eval()
        self._tensors = self.model.state_dict()  # views of the model's own storage, written in place per λ
        self.inputs = inputs
        self.stats_a = self.stats_b = None
        if self.norm_fix == "repair":
            self.stats_a = stats_a if stats_a is not None else endpoint_stats(model_a, inputs)
            self.stats_b = endpoint_stats(model_b, inputs)
        self.norm_fix_seconds = 0.0

    @torch.no_grad()
    def at(self, lam: float) -> nn.Module:
        """The (shared) model set to θ(λ), norm fix applied, in eval mode."""
        for k, t in self._tensors.items():  # lerp_state's values (endpoints copied exactly), written in place
            a = self.state_a[k]
            if not a.is_floating_point() or lam == 0:
                t.copy_(a)
            elif lam == 1:
                t.copy_(self.state_b[k])
            else:
                torch.mul(a, 1.0 - lam, out=t)
                t.add_(self.state_b[k] * lam)
        started = time.perf_counter()
        if self.norm_fix == "reset":
            reset_bn_stats(self.model, self.inputs)
        elif self.norm_fix == "repair":
            repair(self.model, self.inputs, self.stats_a, self.stats_b, lam)
        if self.norm_fix != "none":
            _sync(self.model)
            self.norm_fix_seconds += time.perf_counter() - started
        return self.model.eval()


def _sync(model: nn.Module) -> None:
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


def interpolated_model(model_a: nn.Module, model_b: nn.Module, lam: float, ds: Dataset, norm_fix: str, *,
                       batches: int = 10, batch_size: int = 500) -> nn.Module:
    """A new model (same architecture and device as A, eval mode) at θ(λ) = (1 − λ)θ_A + λθ_B with the
    norm fix (reset | repair | none; `auto` is resolved from the model) applied, its statistics taken on
    `batches` fixed training batches of `batch_size` images."""
    if not 0 <= lam <= 1:
        raise LmcxError(f"λ must be in [0, 1] (λ = 0 is A, 1 is B), got {lam}")
    inputs = norm_fix_inputs(ds, batches, batch_size) if norm_fix != "none" else []
    return Interpolator(model_a, model_b, inputs, norm_fix).at(lam)

