"""Matching three or more models: MergeMany (Git Re-Basin) and [A]'s anchor protocol.

- `merge_many`: repeatedly match each model, in a random order, to the mean of the others (each with
  its current permutation applied) by weight matching, until a full round changes no permutation.
- `match_to_anchor`: [A]'s protocol: match every other model to one anchor model; the permuted others
  were never matched to each other.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Collection, Mapping, Sequence

import torch

from ..errors import LmcxError
from .spec import (
    Permutation,
    PermutationSpec,
    StateDict,
    compose_permutations,
    get_permuted_param,
    identity_permutation,
    invert_permutation,
)
from .weight_matching import WeightMatchingResult, matchable_params, weight_matching

__all__ = ["MergeManyResult", "merge_many", "match_to_anchor"]


@dataclass
class MergeManyResult:
    """`perms[i]` is the permutation to apply to model i (`perms[0]` is the identity); `iterations` counts
    rounds (one round matches every model once), including the final round that changed nothing."""

    perms: list[dict[str, torch.Tensor]]
    iterations: int
    converged: bool = True
    seconds: float = 0.0


def _same(p: Mapping[str, Permutation], q: Mapping[str, Permutation]) -> bool:
    return all(torch.equal(p[k].cpu(), q[k].cpu()) for k in p)


def merge_many(
    spec: PermutationSpec,
    models: Sequence[StateDict],
    *,
    max_iter: int = 100,
    seed: int = 0,
    keys: Collection[str] | None = None,
) -> MergeManyResult:
    """MergeMany: align `models` to each other by weight matching each one to the mean of the others.

    Starts from identity permutations. Each round visits the models in a random order (seeded); model i
    is weight-matched (warm-started from its current permutation, `max_iter` sweeps at most) to the
    mean of the other models with their current permutations applied. Stops after a round in which no
    permutation changed, or after `max_iter` rounds.

    Every model is matched, model 0 included. Since applying one common permutation to all models
    changes none of their mutual distances, the result is then expressed relative to model 0: the
    returned `perms[0]` is the identity, and `perms[i]` aligns model i to model 0's unit order.
    `keys`: the tensors each weight matching's objective sums over (`weight_matching`).
    """
    t_start = time.perf_counter()
    m = len(models)
    if m < 2:
        raise LmcxError(f"merge_many needs at least two models, got {m}")
    for i in range(1, m):
        matchable_params(spec, models[0], models[i])  # same architecture and width, or a clear error
    keys = list(spec.axes_to_perm)
    float_keys = [k for k in keys if models[0][k].is_floating_point()]
    gen = torch.Generator().manual_seed(seed)
    perms = [identity_permutation(spec, models[0]) for _ in range(m)]
    permuted = [{k: models[i][k].detach() for k in float_keys} for i in range(m)]

    rounds = 0
    converged = False
    for _ in range(max_iter):
        rounds += 1
        changed = False
        for i in torch.randperm(m, generator=gen).tolist():
            others = [j for j in range(m) if j != i]
            mean: dict[str, torch.Tensor] = {k: models[i][k] for k in keys}
            for k in float_keys:
                mean[k] = torch.stack([permuted[j][k].to(permuted[i][k].device) for j in others]).mean(0)
            wm_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            result = weight_matching(spec, mean, models[i], max_iter=max_iter, seed=wm_seed, init_perm=perms[i],
                                     keys=keys)
            if not _same(result.perm, perms[i]):
                changed = True
                perms[i] = result.perm
                permuted[i] = {k: get_permuted_param(spec, perms[i], k, models[i]).detach() for k in float_keys}
        if not changed:
            converged = True
            break

    to_first = invert_permutation(perms[0])  # common permutation making model 0's the identity
    perms = [compose_permutations(p, to_first) for p in perms]
    return MergeManyResult(perms=perms, iterations=rounds, converged=converged,
                           seconds=time.perf_counter() - t_start)


def match_to_anchor(
    spec: PermutationSpec,
    anchor: StateDict,
    others: Sequence[StateDict],
    **wm_kwargs: Any,
) -> list[WeightMatchingResult]:
    """[A]'s protocol: weight-match each model of `others` to `anchor` (one result per other model, in
    order). `wm_kwargs` go to `weight_matching` (max_iter, seed, init_perm)."""
    return [weight_matching(spec, anchor, other, **wm_kwargs) for other in others]
