"""Straight-through estimator (STE) matching (Git Re-Basin, Ainsworth et al. 2023).

Learns parameters θ, initialised at θ_A. Every optimisation step:

1. projects θ onto the nearest permutation of model B by weight matching, `π = WM(θ, θ_B)`
   (warm-started from the previous step's permutation, which usually makes it one or two sweeps);
2. forms the straight-through parameters `π(θ_B) + (θ − stopgrad(θ))`: their value is π(θ_B), their
   gradient goes to θ;
3. takes an Adam step (lr `cfg.lr`) on the training cross-entropy of the midpoint
   `½(θ_A + straight-through)`, evaluated with `torch.func.functional_call` on one training batch
   (`cfg.batch_size` images, shuffled per epoch from `seed`, no augmentation).

BatchNorm: the midpoint network runs in train mode, so BN normalises with the batch statistics (as in
Git Re-Basin); running statistics are neither used nor kept. θ covers the trainable parameters only;
buffers (BN running statistics) are ½(A + π(B)) for the midpoint, and enter the projection (as A's)
only with `wm_objective="all"`.

Model selection: at the start (the WM projection of θ_A) and then every `cfg.eval_every` steps
(default 1: every step, as Git Re-Basin does; 0: once per epoch) and at the end of every epoch, the
candidate is θ's projection, the permutation the next step uses anyway (no extra weight matching).
Its merge `½(θ_A + π(θ_B))` is scored on a fixed training subset (the first `cfg.eval_samples`
training images, batches of `cfg.batch_size`, BN with batch statistics). Scores are cached by the
permutation: the projection changes only now and then, so most checks cost nothing. The permutation
with the lowest such midpoint loss is returned (the earliest on ties); since the first candidate is
the WM projection of θ_A, the result is never worse on that subset than weight matching started from
the identity.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import LmcxError
from .spec import PermutationSpec, get_permuted_param, identity_permutation
from .distance import objective_keys
from .weight_matching import weight_matching

__all__ = ["SteResult", "straight_through_estimator", "midpoint_loss"]


@dataclass
class SteResult:
    """`perm`: the best permutation of B found (CPU int64). `best_loss`: its midpoint training loss on
    the evaluation subset; `best_step`: the optimisation step after which it was found (0 = the WM
    projection of θ_A, before any step). `initial_loss` is that step-0 loss and `naive_loss` the
    midpoint loss with no permutation, on the same subset. `checks` counts candidate checks (every
    `eval_every` steps and at each epoch's end), `evaluations` the distinct permutations among them,
    each scored once. `history` has one row per evaluation: step, epoch, train_loss (mean
    straight-through midpoint loss over the steps since the previous row; None at step 0), eval_loss,
    best (so far), changed_units (units whose assignment differs from the previous row's permutation),
    seconds."""

    perm: dict[str, torch.Tensor]
    best_loss: float
    best_step: int
    initial_loss: float
    naive_loss: float
    history: list[dict[str, Any]]
    steps: int
    eval_samples: int
    eval_every: int = 1
    checks: int = 0
    evaluations: int = 0
    wm_calls: int = 0
    wm_sweeps: int = 0
    wm_seconds: float = 0.0
    lap_seconds: float = 0.0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _merge(params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """½(A + B) for floating tensors; integer buffers (num_batches_tracked) copied from A, fresh, since BN
    in train mode updates buffers in place."""
    return {k: (0.5 * (v + params_b[k]) if v.is_floating_point() else v.clone()) for k, v in params_a.items()}


@torch.no_grad()
def midpoint_loss(net: nn.Module, state: Mapping[str, torch.Tensor], ds, x: torch.Tensor, y: torch.Tensor,
                  batch_size: int) -> float:
    """Mean cross-entropy of `net` with parameters and buffers `state` (train mode: BN uses batch
    statistics) on uint8 images `x`, in batches of `batch_size`."""
    net.train()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, len(y), batch_size):
        xb = ds.normalize(x[start:start + batch_size])
        fresh = {k: v.clone() for k, v in state.items()}  # BN updates running stats in place: keep `state` intact
        out = functional_call(net, fresh, (xb,))
        total += F.cross_entropy(out.float(), y[start:start + batch_size], reduction="sum").double()
    return total.item() / len(y)


def straight_through_estimator(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    ds,
    cfg,
    *,
    seed: int = 0,
    max_iter: int = 100,
    progress: bool = True,
    wm_objective: str = "params",
) -> SteResult:
    """STE matching of model B to model A (see the module docstring). `cfg` is a `SteConfig` (epochs,
    lr, batch_size, eval_samples, eval_every); `seed` fixes the batch order and the weight-matching
    sweep orders; `max_iter` bounds the sweeps of each projection, whose objective is `wm_objective`
    (distance.objective_keys). Both models must be on one device."""
    from .. import progress as progress_display  # the `progress` argument says whether to show it
    from ..data import epoch_generator, train_batches

    t_start = time.perf_counter()
    eval_samples = int(getattr(cfg, "eval_samples", 5000))
    eval_every = int(getattr(cfg, "eval_every", 1))
    if cfg.epochs <= 0 or cfg.lr <= 0 or cfg.batch_size <= 0 or eval_samples <= 0 or eval_every < 0:
        raise LmcxError("ste: epochs, lr, batch_size and eval_samples must be > 0 and eval_every >= 0")
    n_train = len(ds.y_train)
    if n_train == 0:
        raise LmcxError("ste: the training set is empty")
    device = next(model_a.parameters()).device
    net = copy.deepcopy(model_a)  # the structure functional_call runs; its own tensors are never used
    params_a = {k: v.detach() for k, v in model_a.named_parameters()}
    buffers_a = {k: v.detach() for k, v in model_a.named_buffers()}
    state_a = {**params_a, **buffers_a}
    state_b = {k: v.detach().to(device) for k, v in model_b.state_dict().items()}
    if set(state_b) != set(state_a):
        raise LmcxError("ste: models A and B do not have the same parameters; they must have the same architecture")

    theta = {k: v.clone().requires_grad_(True) for k, v in params_a.items()}
    optimizer = torch.optim.Adam(list(theta.values()), lr=cfg.lr)
    x_eval, y_eval = ds.x_train[:eval_samples], ds.y_train[:eval_samples]
    eval_batch = min(cfg.batch_size, len(y_eval))

    wm_keys = objective_keys(params_a, wm_objective)
    wm = {"calls": 0, "sweeps": 0, "seconds": 0.0, "lap": 0.0}
    perm: dict[str, torch.Tensor] = {k: v.to(device) for k, v in identity_permutation(spec, state_b).items()}
    projected_at = -1  # optimisation step whose θ `perm` is the projection of

    def project(step: int) -> None:
        nonlocal perm, projected_at
        if projected_at == step:
            return
        current = {**{k: v.detach() for k, v in theta.items()}, **buffers_a}
        warm = perm if projected_at >= 0 else None  # the first projection: weight matching's own start
        r = weight_matching(spec, current, state_b, max_iter=max_iter, seed=seed, init_perm=warm, keys=wm_keys)
        wm["calls"] += 1
        wm["sweeps"] += r.iterations
        wm["seconds"] += r.seconds
        wm["lap"] += r.lap_seconds
        perm = {k: v.to(device) for k, v in r.perm.items()}
        projected_at = step

    def permuted_b(p: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: get_permuted_param(spec, p, k, state_b) for k in state_b}

    def eval_merge(p: Mapping[str, torch.Tensor]) -> float:
        return midpoint_loss(net, _merge(state_a, permuted_b(p)), ds, x_eval, y_eval, eval_batch)

    naive_loss = eval_merge(perm)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    last_eval: dict[str, torch.Tensor] | None = None
    running = {"sum": 0.0, "n": 0}
    scored: set[bytes] = set()  # permutations already scored: a repeat cannot beat the best, skip it
    checks = 0

    def evaluate(step: int, epoch: int) -> None:
        nonlocal last_eval, checks
        project(step)
        checks += 1
        key = b"".join(perm[p].cpu().numpy().tobytes() for p in spec.names)
        if key in scored:
            return
        scored.add(key)
        loss = eval_merge(perm)
        if not math.isfinite(loss):
            raise LmcxError(f"ste: the midpoint loss became {loss} at step {step}; lower match.ste.lr")
        if not best or loss < best["loss"]:
            best.update(loss=loss, step=step, perm={k: v.clone() for k, v in perm.items()})
        changed = None if last_eval is None else sum(int((perm[k] != last_eval[k]).sum()) for k in perm)
        last_eval = {k: v.clone() for k, v in perm.items()}
        history.append({"step": step, "epoch": epoch,
                        "train_loss": running["sum"] / running["n"] if running["n"] else None,
                        "eval_loss": loss, "best": best["loss"], "changed_units": changed,
                        "seconds": time.perf_counter() - t_start})
        running.update(sum=0.0, n=0)

    evaluate(0, 0)
    initial_loss = best["loss"]
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    step = 0
    with progress_display.task("ste", total=cfg.epochs * steps_per_epoch, unit="step", show=progress) as bar:
        for epoch in range(cfg.epochs):
            for x, y in train_batches(ds, cfg.batch_size, epoch_generator(seed, epoch)):
                project(step)
                pb = permuted_b(perm)
                mid: dict[str, torch.Tensor] = {}
                for k, a in params_a.items():
                    straight = pb[k] + (theta[k] - theta[k].detach())
                    mid[k] = 0.5 * (a + straight)
                for k, a in buffers_a.items():
                    mid[k] = 0.5 * (a + pb[k]) if a.is_floating_point() else a.clone()
                net.train()
                loss = F.cross_entropy(functional_call(net, mid, (x,)).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                last = loss.item()
                running["sum"] += last
                running["n"] += 1
                bar.advance(1, epoch=f"{epoch + 1}/{cfg.epochs}", loss=last, best=best["loss"])
                if eval_every and step % eval_every == 0:
                    evaluate(step, epoch + 1)
            if not eval_every or step % eval_every != 0:
                evaluate(step, epoch + 1)

    return SteResult(
        perm={k: v.cpu() for k, v in best["perm"].items()}, best_loss=best["loss"], best_step=best["step"],
        initial_loss=initial_loss, naive_loss=naive_loss, history=history, steps=step,
        eval_samples=len(y_eval), eval_every=eval_every, checks=checks, evaluations=len(history), wm_calls=wm["calls"], wm_sweeps=wm["sweeps"], wm_seconds=wm["seconds"],
        lap_seconds=wm["lap"], seconds=time.perf_counter() - t_start)
