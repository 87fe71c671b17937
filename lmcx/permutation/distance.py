"""What weight matching's objective and lmcx's "L2 to A" sum over, and that distance itself.

`objective_keys` turns `match.wm_objective` into the tensors weight matching's `||θ_A − π(θ_B)||²` counts
(the trainable parameters, or every floating tensor the spec names); `l2_distance` is the Euclidean
distance of two state dicts, reported everywhere over the trainable parameters (`L2_DEFINITION`).
"""
from __future__ import annotations

import math
from typing import Collection

import torch

from ..errors import LmcxError
from .spec import StateDict

OBJECTIVES = {"params": "trainable parameters only (BatchNorm running statistics excluded)",
              "all": "every floating tensor the permutation spec names (BatchNorm running statistics included)"}


# How lmcx reports "L2 to A" everywhere (match metrics, svd.json): one definition, whatever WM's objective.
L2_DEFINITION = ("||theta_A - theta_B|| over the trainable parameters (weights, biases, norm affines; BatchNorm "
                 "running statistics excluded), float64")


def objective_keys(parameter_names: Collection[str], objective: str) -> set[str] | None:
    """The `keys` of `weight_matching` for `match.wm_objective`: the trainable parameters' names
    (`params`), or None for every floating tensor the spec names (`all`)."""
    if objective not in OBJECTIVES:
        raise LmcxError(f"unknown weight matching objective {objective!r}; choose {' or '.join(OBJECTIVES)}")
    return set(parameter_names) if objective == "params" else None


def is_float(t: torch.Tensor) -> bool:
    return torch.is_tensor(t) and t.is_floating_point()


def l2_distance(
    params_a: StateDict, params_b: StateDict, keys: list[str] | None = None
) -> tuple[float, dict[str, float]]:
    """Euclidean distance `||θ_A − θ_B||` over floating tensors, in total and per parameter name.

    `keys` defaults to every floating tensor of `params_a` (buffers such as BN running statistics
    included; pass `keys` to restrict, e.g. to weights). Computed in float64.
    """
    if keys is None:
        keys = [k for k, v in params_a.items() if is_float(v)]
    per_param: dict[str, float] = {}
    for k in keys:
        if k not in params_a or k not in params_b:
            raise LmcxError(f"parameter {k!r} is missing from one of the two models; they must have the same architecture")
        va, vb = params_a[k], params_b[k]
        if not (is_float(va) and is_float(vb)):
            continue
        if tuple(va.shape) != tuple(vb.shape):
            raise LmcxError(f"parameter {k!r} has shape {tuple(va.shape)} in one model but {tuple(vb.shape)} in the other; "
                            "they must have the same architecture and width")
        diff = va.detach().double() - vb.detach().to(va.device).double()
        per_param[k] = torch.linalg.vector_norm(diff).item()
    total = math.sqrt(math.fsum(v * v for v in per_param.values()))
    return total, per_param
