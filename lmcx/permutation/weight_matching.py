"""Weight matching (Git Re-Basin): find the permutation of model B whose weights best align with A.

Weight matching minimises `||θ_A − π(θ_B)||²`, which (since a permutation preserves norms) is the same
as maximising the alignment `Σ_params ⟨θ_A, π(θ_B)⟩`. It does coordinate descent over the
permutations of a `PermutationSpec`: each sweep visits the permutations in a random (seeded) order
and, holding every other permutation fixed, solves permutation `p` exactly as a linear assignment
problem with cost

    C_p = Σ over (param, axis) in p of  A(axis→0).reshape(n, -1) @ [π_{¬p}(B)](axis→0).reshape(n, -1)ᵀ

where `π_{¬p}(B)` is B with every permutation applied except `p` on that axis. An axis permuted in
blocks of k (`spec.block_sizes`) reshapes to (n, k·rest), so row c of the cost holds the whole block c.

What counts: only parameters named in `spec.axes_to_perm` (anything else in the state dicts is
ignored) and only floating tensors among them (integer buffers are skipped); with `keys`, only those
names. BatchNorm running statistics are in the spec (a permutation must move them), so without `keys`
they count too; callers pass the trainable parameters' names for the parameters-only objective of Git
Re-Basin, PLeaS and rebasin (`objective_keys`, `match.wm_objective`).

Numerics: cost matrices are built with torch on the parameters' device in float32 (float64 when the
parameters are float64); only the n×n cost goes to numpy for `scipy.optimize.linear_sum_assignment`.
Every candidate assignment is then checked exactly: its gain in the objective is recomputed in float64
from the units whose assignment changed, and it is accepted only if it strictly improves the objective
(by more than `1e-12·|objective|`). So the recorded objective never decreases, ties never ping-pong, and a sweep in
which nothing was accepted ends the search. A permutation is not re-solved when none of the
permutations its cost depends on (those sharing a parameter with it) changed since its last solve:
its cost matrix, and so its answer, would be the same.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Collection, Mapping

import numpy as np
import torch

from ..errors import LmcxError
from .spec import (Permutation, PermutationSpec, StateDict, axis_index, block_size, check_permutation, expand_blocks,
                   get_permuted_param, perm_sizes)

__all__ = ["WeightMatchingResult", "weight_matching", "l2_distance", "matchable_params", "objective_keys",
           "OBJECTIVES", "L2_DEFINITION"]

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


REL_TOL = 1e-12  # an assignment is accepted only if it raises the objective by more than this × |objective|


@dataclass
class WeightMatchingResult:
    """Outcome of `weight_matching`.

    `perm` is the permutation to apply to model B (`apply_permutation(spec, perm, params_b)`), as CPU
    int64 tensors. `objective[0]` is `Σ ⟨θ_A, π(θ_B)⟩` at the initial permutation and `objective[i]` its
    value after sweep i (float64 arithmetic); it never decreases. `iterations` counts sweeps, including
    the final one that found no improvement. `lap_seconds` is the time spent inside
    `linear_sum_assignment`, `seconds` the whole call. `converged` is False only when `max_iter` sweeps
    ran out while the last one still improved.
    """

    perm: dict[str, torch.Tensor]
    objective: list[float]
    iterations: int
    lap_seconds: float
    seconds: float
    converged: bool = True
    solves: int = 0  # linear assignments solved (permutations skipped because nothing they depend on changed are not counted)


def _is_float(t: torch.Tensor) -> bool:
    return torch.is_tensor(t) and t.is_floating_point()


def matchable_params(spec: PermutationSpec, params_a: StateDict, params_b: StateDict) -> list[str]:
    """Keys that weight matching uses: named by the spec, floating in both models, same shape.

    Raises LmcxError if a spec'd parameter is missing from either model, the shapes differ, or a
    permutation's size is not the same on every axis it acts on.
    """
    keys = []
    for k in spec.axes_to_perm:
        for which, params in (("A", params_a), ("B", params_b)):
            if k not in params:
                raise LmcxError(f"model {which} has no parameter {k!r} that the permutation spec names; "
                                "the checkpoint does not match this architecture")
        a, b = params_a[k], params_b[k]
        if tuple(a.shape) != tuple(b.shape):
            raise LmcxError(f"parameter {k!r} has shape {tuple(a.shape)} in model A but {tuple(b.shape)} in model B; "
                            "both models must have the same architecture and width")
        if len(spec.axes_to_perm[k]) != a.ndim:
            raise LmcxError(f"the permutation spec gives {len(spec.axes_to_perm[k])} axes for {k!r}, "
                            f"which has {a.ndim}; the spec does not match this model")
        if _is_float(a) and _is_float(b):
            keys.append(k)
    sizes: dict[str, int] = {}
    for p, axes in spec.perm_to_axes.items():
        for k, axis in axes:
            n, rest = divmod(params_a[k].shape[axis], block_size(spec, k, axis))
            if rest or sizes.setdefault(p, n) != n:
                raise LmcxError(f"permutation {p!r} acts on axes of different sizes ({sizes[p]} and {n} at "
                                f"{k!r} axis {axis}); the spec does not match this model")
    return keys


def _dependencies(spec: PermutationSpec) -> dict[str, set[str]]:
    """deps[p]: permutations that appear on another axis of a parameter p acts on (p's cost depends on them)."""
    deps: dict[str, set[str]] = {p: set() for p in spec.perm_to_axes}
    for p, axes in spec.perm_to_axes.items():
        for k, axis in axes:
            for other_axis, q in enumerate(spec.axes_to_perm[k]):
                if q is not None and other_axis != axis:
                    deps[p].add(q)  # may be p itself if p acts on two axes of one parameter
    return deps


CHUNK_ELEMS = 1 << 16  # float64 work is done a few slices at a time: small temporaries, no page-fault storms


def _sliced_dot64(wa: torch.Tensor, wb: torch.Tensor, axis: int, rows: torch.Tensor, rows_b: torch.Tensor,
                  rows_b_old: torch.Tensor | None, others: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """float64 `Σ_r ⟨wa[rows[r]], wb'[rows_b[r]] − wb'[rows_b_old[r]]⟩`, slices taken along `axis`,
    `wb'` being `wb` with `others` (axis, index) applied on its other axes; no `rows_b_old`: no subtraction.

    Products of float32 numbers are exact in float64, so this is exact up to float64 summation error.
    """
    per_slice = max(1, wa.numel() // max(1, wa.shape[axis]))
    step = max(1, CHUNK_ELEMS // per_slice)
    total = torch.zeros((), dtype=torch.float64, device=wa.device)
    for s in range(0, rows.numel(), step):
        r = rows[s:s + step]
        xa = wa.index_select(axis, r).double()
        xb = wb.index_select(axis, rows_b[s:s + step])
        xo = None if rows_b_old is None else wb.index_select(axis, rows_b_old[s:s + step])
        for ax, idx in others:
            xb = xb.index_select(ax, idx)
            xo = None if xo is None else xo.index_select(ax, idx)
        xb = xb.double() if xo is None else xb.double() - xo.double()
        total += torch.dot(xa.reshape(-1), xb.reshape(-1))
    return total


def _others(spec: PermutationSpec, perm: Mapping[str, Permutation], key: str, axis: int) -> list[tuple[int, torch.Tensor]]:
    return [(ax, axis_index(spec, key, ax, perm[q])) for ax, q in enumerate(spec.axes_to_perm[key])
            if q is not None and ax != axis]


def _inner(spec: PermutationSpec, perm: Mapping[str, Permutation], key: str,
           a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """⟨A[key], π(B)[key]⟩ in float64."""
    wa, wb = a[key], b[key]
    if wa.ndim == 0:
        return (wa.double() * wb.double()).item()
    q0 = spec.axes_to_perm[key][0]
    rows = torch.arange(wa.shape[0], device=wa.device)
    rows_b = rows if q0 is None else axis_index(spec, key, 0, perm[q0])
    return _sliced_dot64(wa, wb, 0, rows, rows_b, None, _others(spec, perm, key, 0)).item()


def _gain(spec: PermutationSpec, perm: Mapping[str, Permutation], new_perm: Mapping[str, Permutation], p: str,
          key: str, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Change of ⟨A[key], π(B)[key]⟩ (float64) when permutation p alone goes from perm[p] to new_perm[p].

    When p acts on one axis of `key`, only the units whose assignment changed contribute, so only
    those slices are read; otherwise both values are computed in full.
    """
    axes = [axis for axis, q in enumerate(spec.axes_to_perm[key]) if q == p]
    if len(axes) != 1:
        return _inner(spec, new_perm, key, a, b) - _inner(spec, perm, key, a, b)
    axis = axes[0]
    old, new = perm[p], new_perm[p]
    rows = torch.nonzero(old != new).flatten()
    if rows.numel() == 0:
        return 0.0
    k = block_size(spec, key, axis)
    return _sliced_dot64(a[key], b[key], axis, expand_blocks(rows, k), expand_blocks(new[rows], k),
                         expand_blocks(old[rows], k), _others(spec, perm, key, axis)).item()


def _cost_matrix(spec: PermutationSpec, perm: Mapping[str, Permutation], p: str, n: int,
                 a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    cost = None
    for key, axis in spec.perm_to_axes[p]:
        if key not in a:
            continue
        wa = torch.movedim(a[key], axis, 0).reshape(n, -1)
        wb = torch.movedim(get_permuted_param(spec, perm, key, b, except_axis=axis), axis, 0).reshape(n, -1)
        if cost is None:
            cost = wa @ wb.T
        else:
            cost.addmm_(wa, wb.T)
    return cost


def weight_matching(
    spec: PermutationSpec,
    params_a: StateDict,
    params_b: StateDict,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init_perm: Mapping[str, Permutation] | None = None,
    keys: Collection[str] | None = None,
) -> WeightMatchingResult:
    """Permutation π of model B maximising `Σ ⟨θ_A, π(θ_B)⟩` (minimising `||θ_A − π(θ_B)||²`) over
    the floating tensors the spec names, or only over `keys` when given (see `objective_keys`).

    Coordinate descent from `init_perm` (default: identity), the order of permutations in each sweep
    drawn from `torch.Generator().manual_seed(seed)`; stops after a sweep that improves nothing or
    after `max_iter` sweeps. Deterministic for a given seed. See the module docstring for details.
    """
    from scipy.optimize import linear_sum_assignment  # here, not at import: keeps `import lmcx.permutation` light

    from ..checkpoint import check_weights  # NaN or integer weights would silently give NaN costs or the identity

    check_weights(params_a, "model A", spec.axes_to_perm), check_weights(params_b, "model B", spec.axes_to_perm)
    t_start = time.perf_counter()
    if max_iter < 0:
        raise LmcxError(f"max_iter must be >= 0, got {max_iter}")
    only = keys
    keys = [k for k in matchable_params(spec, params_a, params_b) if only is None or k in only]
    device = params_a[keys[0]].device if keys else torch.device("cpu")
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for k in keys:
        dtype = torch.float64 if params_a[k].dtype == torch.float64 or params_b[k].dtype == torch.float64 else torch.float32
        a[k] = params_a[k].detach().to(device=device, dtype=dtype)
        b[k] = params_b[k].detach().to(device=device, dtype=dtype)

    sizes = perm_sizes(spec, params_a)
    if init_perm is None:
        perm = {p: torch.arange(n, device=device) for p, n in sizes.items()}
    else:
        check_permutation(spec, init_perm, params_b)
        perm = {p: init_perm[p].to(device=device, dtype=torch.long) for p in spec.names}

    # TF32 matmuls (if a caller enabled them) would make the cost matrices ~1e-3 inexact: use full fp32 here.
    prev_precision = torch.get_float32_matmul_precision()
    if device.type == "cuda" and prev_precision != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        perm, objective, iterations, lap_seconds, solves, converged = _coordinate_descent(
            spec, a, b, keys, perm, sizes, device, max_iter, seed, linear_sum_assignment)
    finally:
        if torch.get_float32_matmul_precision() != prev_precision:
            torch.set_float32_matmul_precision(prev_precision)

    return WeightMatchingResult(
        perm={p: v.to("cpu") for p, v in perm.items()},
        objective=objective,
        iterations=iterations,
        lap_seconds=lap_seconds,
        seconds=time.perf_counter() - t_start,
        converged=converged,
        solves=solves,
    )


def _coordinate_descent(spec: PermutationSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                        keys: list[str], perm: dict[str, torch.Tensor], sizes: dict[str, int],
                        device: torch.device, max_iter: int, seed: int, linear_sum_assignment):
    """The sweeps of `weight_matching`; returns (perm, objective, iterations, lap_seconds, solves, converged)."""
    names = spec.names
    deps = _dependencies(spec)
    touched = {p: sorted({k for k, _ in axes if k in a}) for p, axes in spec.perm_to_axes.items()}
    current = math.fsum(_inner(spec, perm, k, a, b) for k in keys)
    objective = [current]
    gen = torch.Generator().manual_seed(seed)
    clock = 0  # bumped on every accepted change
    changed_at = {p: 0 for p in names}
    solved_at = {p: -1 for p in names}
    lap_seconds = 0.0
    solves = 0
    iterations = 0
    converged = True
    for _ in range(max_iter):
        iterations += 1
        improved = False
        for idx in torch.randperm(len(names), generator=gen).tolist():
            p = names[idx]
            if solved_at[p] >= 0 and all(changed_at[q] <= solved_at[p] for q in deps[p]):
                continue  # same cost matrix as at its last solve: same answer
            solved_at[p] = clock
            cost = _cost_matrix(spec, perm, p, sizes[p], a, b)
            if cost is None:
                continue
            cost_np = cost.detach().to("cpu", torch.float64).numpy()
            t_lap = time.perf_counter()
            _, cols = linear_sum_assignment(cost_np, maximize=True)
            lap_seconds += time.perf_counter() - t_lap
            solves += 1
            new = torch.from_numpy(np.asarray(cols, dtype=np.int64)).to(device)
            if torch.equal(new, perm[p]):
                continue
            candidate = {**perm, p: new}
            gain = math.fsum(_gain(spec, perm, candidate, p, k, a, b) for k in touched[p])
            if gain > REL_TOL * abs(current):
                perm = candidate
                current += gain
                clock += 1
                changed_at[p] = clock
                improved = True
        objective.append(current)
        if not improved:
            break
    else:
        converged = max_iter == 0  # every sweep improved: not known to be converged
    return perm, objective, iterations, lap_seconds, solves, converged


def l2_distance(
    params_a: StateDict, params_b: StateDict, keys: list[str] | None = None
) -> tuple[float, dict[str, float]]:
    """Euclidean distance `||θ_A − θ_B||` over floating tensors, in total and per parameter name.

    `keys` defaults to every floating tensor of `params_a` (buffers such as BN running statistics
    included; pass `keys` to restrict, e.g. to weights). Computed in float64.
    """
    if keys is None:
        keys = [k for k, v in params_a.items() if _is_float(v)]
    per_param: dict[str, float] = {}
    for k in keys:
        if k not in params_a or k not in params_b:
            raise LmcxError(f"parameter {k!r} is missing from one of the two models; they must have the same architecture")
        va, vb = params_a[k], params_b[k]
        if not (_is_float(va) and _is_float(vb)):
            continue
        if tuple(va.shape) != tuple(vb.shape):
            raise LmcxError(f"parameter {k!r} has shape {tuple(va.shape)} in one model but {tuple(vb.shape)} in the other; "
                            "they must have the same architecture and width")
        diff = va.detach().double() - vb.detach().to(va.device).double()
        per_param[k] = torch.linalg.vector_norm(diff).item()
    total = math.sqrt(math.fsum(v * v for v in per_param.values()))
    return total, per_param
