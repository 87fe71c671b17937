"""Weight matching (Git Re-Basin): find the permutation of model B whose weights best align with A.

Weight matching minimises `||θ_A − π(θ_B)||²`, which (since a permutation preserves norms) is the same
as maximising the alignment `Σ_params ⟨θ_A, π(θ_B)⟩`. It does coordinate descent over the
permutations of a `PermutationSpec`: holding every other permutation fixed, permutation `p` is solved
exactly as a linear assignment problem with cost

    C_p = Σ over (param, axis) in p of  A(axis→0).reshape(n, -1) @ [π_{¬p}(B)](axis→0).reshape(n, -1)ᵀ

where `π_{¬p}(B)` is B with every permutation applied except `p` on that axis. An axis permuted in
blocks of k (`spec.block_sizes`) reshapes to (n, k·rest), so row c of the cost holds the whole block c.

The search:
  1. Start (unless `init_perm` is given or `start="identity"`): one forward pass that decides the permutations one at a
     time, the next being the one whose cost is best determined by what is decided already (the first
     layer's, whose input is not permuted), each solved from the parameters whose other permuted axes
     are all decided (one-sided, like matching a network layer by layer from its input). It is kept if
     it beats the identity and counts as the first sweep. On randomly initialised models coordinate
     descent from it ends 0.5-1 % closer than from the identity, in 2-5x fewer solves; on trained ones
     within 0.1 % of it (docs/PERFORMANCE.md), in 2-3x fewer.
  2. Sweeps: the permutations in a random (seeded) order, each re-solved with its full cost. A
     permutation is not re-solved when none of those its cost depends on (sharing a parameter with it)
     changed since its last full solve: its cost matrix, and so its answer, would be the same.
  3. Stop after a sweep that improves nothing, or that lowers `||θ_A − π(θ_B)||²` by less than `tol`
     of itself (TOL by default; 0: only the first), or after `max_iter` sweeps.

What counts: only parameters named in `spec.axes_to_perm` (anything else in the state dicts is
ignored) and only floating tensors among them (integer buffers are skipped); with `keys`, only those
names. BatchNorm running statistics are in the spec (a permutation must move them), so without `keys`
they count too; callers pass the trainable parameters' names for the parameters-only objective of Git
Re-Basin, PLeaS and rebasin (`distance.objective_keys`, `match.wm_objective`).

Numerics (wm_costs.py): cost matrices are built with torch on the parameters' device in float32
(float64 for all when any parameter is float64); only the n×n cost goes to numpy for
`scipy.optimize.linear_sum_assignment`. Every choice of permutation is rigorous: a candidate assignment
is accepted only if it strictly improves the objective (by more than `REL_TOL·|objective|`), which its gain read
off the cost matrix decides when it clears that threshold by more than the matrix's rounding bound
either way; otherwise the gain is computed exactly in float64 from the units that moved. Likewise the
forward start is kept only if its value, read off its own solves' cost matrices (each parameter is
read in the solve that decided the last of its permutations), beats the start by more than that
reading's rounding bound, else it is computed exactly. So the objective never decreases, ties never
ping-pong, and a sweep in which nothing was accepted ends the search. (The stopping tolerance, a
heuristic, reads the record as it stands, within `objective_error`.) The record: `objective[0]` is
exact (float64); later values add up gains as decided, each within its rounding bound, and
`objective_error` bounds their distance from the exact values (a worst case: float32 products err far
less in practice). An exact float64 pass after the forward start took 10-20 % of a whole search.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Collection, Mapping

import numpy as np
import torch

from .. import progress
from ..errors import LmcxError
from .distance import is_float
from .spec import Permutation, PermutationSpec, StateDict, block_size, check_permutation, perm_sizes
from .wm_costs import Costs, exact_gain, inners

__all__ = ["WeightMatchingResult", "weight_matching", "matchable_params"]

REL_TOL = 1e-12  # an assignment is accepted only if it raises the objective by more than this × |objective|
TOL = 1e-5  # stop after a sweep that lowers ||θ_A − π(θ_B)||² by less than this fraction of itself
STARTS = ("forward", "identity")


@dataclass
class WeightMatchingResult:
    """Outcome of `weight_matching`.

    `perm` is the permutation to apply to model B (`apply_permutation(spec, perm, params_b)`), as CPU
    int64 tensors. `objective[0]` is `Σ ⟨θ_A, π(θ_B)⟩` at the initial permutation (float64, exact) and
    `objective[i]` its value after sweep i, within `objective_error` of exact (module docstring); it
    never decreases. `iterations` counts sweeps (the forward
    start is the first), including the final one that found no (or too little) improvement.
    `lap_seconds` is the time spent inside `linear_sum_assignment`, `seconds` the whole call. `stop`
    says why the search ended: "no improvement", "tolerance" (a sweep gained less than `tol`) or
    "max_iter"; `converged` is False only for "max_iter".
    """

    perm: dict[str, torch.Tensor]
    objective: list[float]
    iterations: int
    lap_seconds: float
    seconds: float
    converged: bool = True
    solves: int = 0  # linear assignments solved (permutations skipped because nothing they depend on changed are not counted)
    stop: str = "no improvement"
    exact_checks: int = 0  # candidates whose gain was too close to the threshold to decide without float64
    objective_error: float = 0.0  # bound on |objective[i] − its exact value| for every i (0: all exact)


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
        if is_float(a) and is_float(b):
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


def weight_matching(
    spec: PermutationSpec,
    params_a: StateDict,
    params_b: StateDict,
    *,
    max_iter: int = 100,
    seed: int = 0,
    init_perm: Mapping[str, Permutation] | None = None,
    start: str = "forward",
    tol: float = TOL,
    show_progress: bool = False,
    keys: Collection[str] | None = None,
) -> WeightMatchingResult:
    """Permutation π of model B maximising `Σ ⟨θ_A, π(θ_B)⟩` (minimising `||θ_A − π(θ_B)||²`) over
    the floating tensors the spec names, or only over `keys` when given (see `distance.objective_keys`).

    Coordinate descent from `init_perm`, else from `start`: "forward" (the forward start of the module
    docstring) or "identity" (Git Re-Basin's), the
    order of permutations in each sweep drawn from `torch.Generator().manual_seed(seed)`; stops after a
    sweep that improves nothing or lowers the squared distance by less than `tol` of itself, or after
    `max_iter` sweeps. Deterministic for a given seed. `show_progress`: a progress line / bar per sweep
    (lmcx.progress); off by default, since callers such as STE run it once per step.
    """
    from ..checkpoint import check_weights  # NaN or integer weights would silently give NaN costs or the identity

    check_weights(params_a, "model A", spec.axes_to_perm), check_weights(params_b, "model B", spec.axes_to_perm)
    t_start = time.perf_counter()
    if max_iter < 0:
        raise LmcxError(f"max_iter must be >= 0, got {max_iter}")
    if not tol >= 0:
        raise LmcxError(f"tol must be >= 0, got {tol}")
    if start not in STARTS:
        raise LmcxError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    only = keys
    keys = [k for k in matchable_params(spec, params_a, params_b) if only is None or k in only]
    device = params_a[keys[0]].device if keys else torch.device("cpu")
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    # one dtype for all: a cost matrix sums terms of several parameters (float64 if any is)
    dtype = torch.float64 if any(x[k].dtype == torch.float64 for x in (params_a, params_b) for k in keys) else torch.float32
    for k in keys:
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
        search = _Search(spec, a, b, keys, perm, sizes, init_is_identity=init_perm is None)
        with progress.task("weight matching", unit="sweep", show=show_progress) as bar:
            search.run(max_iter, seed, tol, forward_start=init_perm is None and start == "forward", bar=bar)
    finally:
        if torch.get_float32_matmul_precision() != prev_precision:
            torch.set_float32_matmul_precision(prev_precision)

    return WeightMatchingResult(
        perm={p: v.to("cpu") for p, v in search.perm.items()},
        objective=search.objective,
        iterations=search.iterations,
        lap_seconds=search.lap_seconds,
        seconds=time.perf_counter() - t_start,
        converged=search.stop != "max_iter",
        solves=search.solves,
        stop=search.stop,
        exact_checks=search.exact_checks,
        objective_error=search.error,
    )


class _Search:
    """The state of one coordinate descent (see the module docstring)."""

    def __init__(self, spec: PermutationSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 keys: list[str], perm: dict[str, torch.Tensor], sizes: dict[str, int], init_is_identity: bool):
        from scipy.optimize import linear_sum_assignment  # here, not at import: keeps `import lmcx.permutation` light

        self.spec, self.a, self.b, self.keys, self.perm, self.sizes = spec, a, b, keys, perm, sizes
        self.lsa = linear_sum_assignment
        self.costs = Costs(spec, a, b, sizes)
        self.deps = _dependencies(spec)
        self.touched = {p: sorted({k for k, _ in axes if k in a}) for p, axes in spec.perm_to_axes.items()}
        self.start = None if init_is_identity else perm  # None: the identity
        self.key_norms: dict[str, float] = {}  # ||A[k]||² + ||B[k]||², set by the exact pass of the start
        self.norms = math.nan  # their sum, for the stopping rule and the progress display
        self.current = math.nan  # the objective (exact at the start, see the module docstring) and
        self.error = 0.0  # the bound on its distance from the exact value
        self.objective: list[float] = []
        self.clock = 0  # bumped on every accepted change
        self.changed_at = {p: 0 for p in spec.names}
        self.solved_at = {p: -1 for p in spec.names}  # clock of p's last solve with its full cost
        self.lap_seconds, self.solves, self.iterations, self.exact_checks = 0.0, 0, 0, 0
        self.cost64 = np.empty(0)  # see `solve`
        self.stop = "no improvement"

    def exact_objective(self, perm: Mapping[str, torch.Tensor] | None) -> float:
        """Σ ⟨θ_A, π(θ_B)⟩ in float64 (`perm` None: the identity), in one pass over the parameters, which
        also sets `key_norms` and `norms`."""
        values = []
        for k in self.keys:
            (v,), self.key_norms[k] = inners(self.spec, [perm], k, self.a, self.b)
            values.append(v)
        self.norms = math.fsum(self.key_norms.values())
        return math.fsum(values)

    def distance2(self) -> float:
        """||θ_A − π(θ_B)||² over the matched parameters."""
        return max(self.norms - 2 * self.current, 0.0)

    def solve(self, p: str, cost: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """The assignment maximising `cost` (as float64 numpy for the gain, valid until the next solve, and as
        a tensor on the device). The float64 copy lives in one reused array, negated in place for scipy
        (which would otherwise negate into a fresh one): fresh arrays of this size cost page faults."""
        progress.tick()
        n = cost.shape[0]
        if self.cost64.size < n * n:
            self.cost64 = np.empty(n * n)
        cost_np = self.cost64[:n * n].reshape(n, n)
        torch.from_numpy(cost_np).copy_(cost.detach())
        np.negative(cost_np, out=cost_np)
        t = time.perf_counter()
        _, cols = self.lsa(cost_np)
        self.lap_seconds += time.perf_counter() - t
        np.negative(cost_np, out=cost_np)
        self.solves += 1
        return cost_np, torch.from_numpy(np.asarray(cols, dtype=np.int64)).to(self.perm[p].device)

    def run(self, max_iter: int, seed: int, tol: float, forward_start: bool, bar) -> None:
        gen = torch.Generator().manual_seed(seed)
        names = self.spec.names
        self.current = self.exact_objective(self.start)
        self.objective = [self.current]
        for sweep in range(max_iter):
            self.iterations += 1
            before, moved = self.current, 0
            if sweep == 0 and forward_start:
                moved = self.forward()
            else:
                for idx in torch.randperm(len(names), generator=gen).tolist():
                    moved += self.improve(names[idx])
            self.objective.append(self.current)
            bar.advance(1, l2=lambda: math.sqrt(self.distance2()), moved=moved, solves=self.solves)
            if sweep == 0 and forward_start:
                continue
            if self.current <= before:
                return
            if 2 * (self.current - before) < tol * self.distance2():
                self.stop = "tolerance"
                return
        self.stop = "max_iter" if max_iter > 0 else "no improvement"

    def improve(self, p: str) -> int:
        """Re-solve p with its full cost; accept the answer if it raises the objective. Returns the units moved."""
        if self.solved_at[p] >= 0 and all(self.changed_at[q] <= self.solved_at[p] for q in self.deps[p]):
            return 0  # same cost matrix as at its last solve: same answer
        self.solved_at[p] = self.clock
        cost = self.costs.matrix(p, self.perm)
        if cost is None:
            return 0
        cost_np, new = self.solve(p, cost)
        old = self.perm[p]
        if torch.equal(new, old):
            return 0
        new_cpu, old_cpu = new.cpu(), old.cpu()
        rows = torch.nonzero(new_cpu != old_cpu).flatten()
        threshold = REL_TOL * abs(self.current)
        gain, bound = self.estimate(p, cost_np, rows, new_cpu, old_cpu)
        if gain + bound <= threshold:  # not an improvement, whatever the rounding
            return 0
        if gain - bound <= threshold:  # too close to call from the cost matrix: the exact gain decides
            self.exact_checks += 1
            candidate = {**self.perm, p: new}
            gain, bound = math.fsum(exact_gain(self.spec, self.perm, candidate, p, k, self.a, self.b)
                                    for k in self.touched[p]), 0.0
            if gain <= threshold:
                return 0
        self.perm = {**self.perm, p: new}
        self.current += gain
        self.error += bound
        self.clock += 1
        self.changed_at[p] = self.clock
        return len(rows)

    def estimate(self, p: str, cost_np: np.ndarray, rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor
                 ) -> tuple[float, float]:
        """The gain of moving `rows` of p from `old` to `new`, read off its cost matrix, and a bound on
        its error (infinite where the objective is not linear in p: p on two axes of one parameter)."""
        if p in self.deps[p]:
            return 0.0, math.inf
        r = rows.numpy()
        gained, lost = cost_np[r, new.numpy()[r]], cost_np[r, old.numpy()[r]]
        summing = 2.0 ** -52 * len(r) * float(np.abs(gained).sum() + np.abs(lost).sum())  # float64 sums
        return float(gained.sum() - lost.sum()), self.costs.rounding(p, rows, new, old) + summing

    def forward(self) -> int:
        """The forward start (module docstring, 1.): kept if it beats the current permutation. Returns
        the units it moved (0 if it is not kept)."""
        decided: set[str] = set()
        start = dict(self.perm)
        complete_at: dict[str, int] = {}
        clock = self.clock
        value, bound = 0.0, 0.0  # the objective read off the solves' cost matrices, and its rounding bound
        read: dict[str, int] = {}  # how often each parameter was read (once, unless the reading fails)
        while len(decided) < len(self.spec.names):
            def known(t) -> bool:
                return all(q in decided for _, q, _ in t.others)

            def mass(p: str) -> int:  # what the known weight matrices say about each unit (vectors: little)
                return sum(t.fan for t in self.costs.terms[p] if known(t) and t.fan > 1)

            p = max((q for q in self.spec.names if q not in decided), key=mass)  # first best, in spec order
            decided.add(p)
            if mass(p) == 0:
                continue
            cost = self.costs.matrix(p, self.perm, use=known)
            cost_np, new = self.solve(p, cost)
            # The cost's terms are those with every other permutation decided, now for good: at p's answer
            # they read their parameters' whole alignment (p on two axes of one parameter: not readable).
            used = [t for t in self.costs.terms[p] if known(t)]
            picked = cost_np[np.arange(len(cost_np)), new.cpu().numpy()]
            value += float(picked.sum())
            bound += (self.costs.rounding_gamma(p) * math.fsum(self.key_norms[t.key] for t in used) / 2  # Cauchy-Schwarz
                      + 2.0 ** -52 * len(picked) * float(np.abs(picked).sum()))
            for t in used:
                read[t.key] = read.get(t.key, 0) + (1 if all(q != p for _, q, _ in t.others) else 2)
            if all(known(t) for t in self.costs.terms[p]):
                complete_at[p] = clock  # this solve saw p's whole cost
            if not torch.equal(new, self.perm[p]):
                self.perm = {**self.perm, p: new}
                clock += 1
                self.changed_at[p] = clock
        moved = sum(int((self.perm[p] != start[p]).sum()) for p in self.spec.names)
        unread = [k for k in self.keys if k not in read]
        if unread:  # parameters of permutations that had nothing to solve: read exactly
            value += math.fsum(inners(self.spec, [self.perm], k, self.a, self.b)[0][0] for k in unread)
        if moved and (any(n > 1 for n in read.values()) or abs(value - self.current) <= bound):
            value, bound = self.exact_objective(self.perm), 0.0  # the reading cannot decide: the exact value does
        if not moved or value <= self.current:  # not better than where it began: forget it
            self.perm = start
            self.changed_at = {p: 0 for p in self.spec.names}
            return 0
        self.current, self.error, self.clock = value, bound, clock
        self.solved_at.update(complete_at)
        return moved
