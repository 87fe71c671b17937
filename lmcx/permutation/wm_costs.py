"""The arithmetic of weight matching: cost matrices, how far their rounding can move a gain, and the
exact float64 value of the objective and of a candidate's gain.

`Costs` holds, for every permutation p and every (param, axis) it acts on (a "term"), A and B laid out
so that the term's product is one GEMM and the other axes' permutations are cheap to apply. A cost
matrix is the sum over p's terms of `A_t @ B'_tᵀ`, A_t being `A(axis→0).reshape(n, -1)` and B'_t the same
of B with the other axes' current permutations applied (one index_select per other permuted axis):
  - a term on axis 0 (a layer's outputs) uses A and B as they lie (views): `A_t @ B'_tᵀ`;
  - a term on another axis (a layer's inputs) keeps that axis last, `X = W(axis→-1).reshape(-1, n)`, and
    computes `X_Aᵀ @ X_B'`: a Linear weight is then used as it lies, a conv weight's A costs one copy
    per product (channels last), and B's other permutation (its output axis, now first) gathers whole
    contiguous slices straight from a view of B, with no copy of B made beforehand.
Both operands land in two buffers that every product reuses: fresh tensors of a weight's size would
cost a page fault per 4 KB. The terms without other permuted axes (biases, norm parameters, a first
layer's weight, a classifier's) never change: their sum is computed once per p.

Each other term's product `A_t @ B'_tᵀ` is kept (where it is no larger than the term itself, n ≤ fan)
with the permutations it was made at. Asked again, it is reused if they are the same; if one of them
moved only a few units (at most a quarter), only those units' slices are added and subtracted,
`A_t[:, moved] @ (B_t[:, new] − B_t[:, old])ᵀ`, at a fraction of the FLOPs; otherwise, or after
MAX_UPDATES such updates, it is made anew. The forward start's one-sided costs are so reused by the
sweeps that follow, and a re-solve after a small change costs little.

Rounding: a float32 product C_ij = Σ_x a_ix b_jx over K terms is within γ_K Σ|a_ix||b_jx| ≤
γ_K ‖a_i‖‖b_j‖ of the exact value (γ_K = K·u / (1 − K·u), u the unit roundoff; Higham, Accuracy and
Stability of Numerical Algorithms, §3.1), where the norms are those of p's rows over all its terms
together; the other permutations only reorder the entries of a row, so the norms are computed once. An
update adds at most 2γ_K‖a_i‖‖b_j‖ (its products read distinct entries of row j twice: the new and the
old slices; the subtraction's rounding is one more term of K) and u‖a_i‖‖b_j‖ for adding it in, so a
term updated m times is within (1 + 3m)·γ_K of exact (γ_K ≥ u). A candidate's gain read off the cost
matrix is therefore known up to `rounding` (summed over the rows that moved), and only a gain within
that bound of the acceptance threshold needs the exact check.

Exact values (`inners`, `exact_gain`): products of float32 numbers are exact in float64, so these are
exact up to float64 summation error; they read a few slices at a time (small temporaries).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .spec import Permutation, PermutationSpec, axis_index, block_size, expand_blocks

MAX_UPDATES = 4  # a kept product is made anew after this many updates (each widens its rounding bound)
CHUNK_ELEMS = 1 << 16  # float64 work is done a few slices at a time: small temporaries, no page-fault storms
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


@dataclass
class Term:
    key: str
    axis: int
    n: int  # units
    unit_dim: int  # where the units lie in `a` and `b`: 0, or the last axis (see the module docstring)
    a: torch.Tensor  # A[key] with `axis` moved to `unit_dim`: a view, like
    b: torch.Tensor  # B[key] (see the module docstring)
    others: list[tuple[int, str, int]]  # (axis in `b`, permutation, block size) of the other permuted axes
    kept: torch.Tensor | None = None  # A_t @ B'_tᵀ at the permutations `kept_at` (see the module docstring)
    kept_at: tuple[torch.Tensor, ...] = ()
    updates: int = 0  # updates since `kept` was made anew

    @property
    def fan(self) -> int:
        return self.a.numel() // self.n

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x (laid out like `b`) as the (n, fan) matrix of the module docstring: a view where x is contiguous."""
        return x.reshape(self.n, -1) if self.unit_dim == 0 else x.reshape(-1, self.n).T

    def unit_norms(self, x: torch.Tensor) -> torch.Tensor:
        """‖row i‖ of `rows(x)`, read from the parameter as it lies (x laid out like `b`): no copy."""
        y = x.movedim(self.unit_dim, self.axis)
        before, after = math.prod(y.shape[:self.axis]), y.shape[self.axis] // self.n * math.prod(y.shape[self.axis + 1:])
        per_unit = y.reshape(before, self.n, after)  # a unit's block and what follows it: its last dim
        return torch.linalg.vector_norm(per_unit, dim=(0, 2))

    @property
    def keeps(self) -> bool:
        """Whether its product is kept: only where that is no larger than the term (n ≤ fan)."""
        return bool(self.others) and self.n <= self.fan


class Costs:
    """Cost matrices of one weight-matching problem (see the module docstring)."""

    def __init__(self, spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 sizes: Mapping[str, int]):
        self.spec, self.sizes = spec, sizes
        self.flops = 0  # multiply-adds x 2 of the products computed so far
        self.fixed: dict[str, torch.Tensor | None] = {}  # per p: the sum of its terms without other permuted axes
        self.terms: dict[str, list[Term]] = {}
        self.gamma: dict[str, float] = {}
        self._row_norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # made when first needed
        self.updates: dict[str, int] = {}  # per p: the most updates among the kept products of its last cost
        self._buffers: list[torch.Tensor | None] = [None, None]  # see _buffer
        for p, axes in spec.perm_to_axes.items():
            n, terms = sizes[p], []
            for key, axis in axes:
                if key not in a:
                    continue
                # units last (module docstring), but not for blocks: a block must be a row's contiguous part
                to = 0 if axis == 0 or block_size(spec, key, axis) > 1 else a[key].ndim - 1
                others = [(_moved(ax, axis, to), q, block_size(spec, key, ax))
                          for ax, q in enumerate(spec.axes_to_perm[key]) if q is not None and ax != axis]
                terms.append(Term(key, axis, n, to, torch.movedim(a[key], axis, to), torch.movedim(b[key], axis, to),
                                  others))
            self.terms[p] = terms
            if terms:
                unit = UNIT_ROUNDOFF.get(terms[0].a.dtype, 2.0 ** -24)
                k = sum(t.fan for t in terms) + len(terms)  # the terms' products, then their sum
                # 1.05: room for the rounding of the bound itself (norms taken in the parameters' precision)
                self.gamma[p] = 1.05 * k * unit / (1 - k * unit)

    def matrix(self, p: str, perm: Mapping[str, Permutation],
               use: Callable[[Term], bool] | None = None) -> torch.Tensor | None:
        """C_p at the permutations `perm` (p's own is not used), over the terms `use` keeps (default all;
        terms without other permuted axes are always kept); None when no term is left. The sum of the
        terms without other permuted axes does not depend on `perm`: it is computed once and kept."""
        if p not in self.fixed:
            self.fixed[p] = self._product([t for t in self.terms[p] if not t.others], perm)
        cost = None if self.fixed[p] is None else self.fixed[p].clone()
        moving = [t for t in self.terms[p] if t.others and (use is None or use(t))]
        for t in moving:
            if t.keeps:
                kept = self._kept(t, perm)
                cost = kept.clone() if cost is None else cost.add_(kept)
        self.updates[p] = max((t.updates for t in moving if t.keeps), default=0)
        return self._product([t for t in moving if not t.keeps], perm, cost)

    def rounding_gamma(self, p: str) -> float:
        """γ of p's last cost matrix: γ_K widened by the updates of its kept products."""
        return self.gamma[p] * (1 + 3 * self.updates.get(p, 0))

    def _kept(self, t: Term, perm: Mapping[str, Permutation]) -> torch.Tensor:
        """t's product at `perm`: the kept one, updated, or made anew (module docstring)."""
        now = tuple(perm[q] for _, q, _ in t.others)
        if t.kept is not None:
            changed = [i for i, (was, is_) in enumerate(zip(t.kept_at, now)) if was is not is_]
            moved = [torch.nonzero(t.kept_at[i] != now[i]).flatten() for i in changed]
            if all(m.numel() == 0 for m in moved):
                t.kept_at = now
                return t.kept
            if (len(changed) == 1 and len(t.others) == 1 and t.updates < MAX_UPDATES
                    and 4 * moved[0].numel() <= len(now[0])):
                self._update(t, moved[0], t.kept_at[0], now[0])
                t.kept_at = now
                return t.kept
        t.kept, t.kept_at, t.updates = self._product([t], perm), now, 0
        return t.kept

    def _update(self, t: Term, units: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """kept += A_t[:, units] @ (B_t[:, new[units]] − B_t[:, old[units]])ᵀ on t's one other axis."""
        ax, _, k = t.others[0]
        a_moved = t.rows(t.a.index_select(ax, expand_blocks(units, k)))
        b_diff = t.b.index_select(ax, expand_blocks(new[units], k)) - t.b.index_select(ax, expand_blocks(old[units], k))
        t.kept.addmm_(a_moved, t.rows(b_diff).T)
        t.updates += 1
        self.flops += 2 * t.n * a_moved.numel()

    def _product(self, terms: list[Term], perm: Mapping[str, Permutation],
                 cost: torch.Tensor | None = None) -> torch.Tensor | None:
        for t in terms:
            wa, wb = t.rows(self._laid_out(t.a, 0)), t.rows(self._permuted_b(t, perm))
            if cost is None:
                cost = wa @ wb.T
            else:
                cost.addmm_(wa, wb.T)
            self.flops += 2 * t.n ** 2 * t.fan
        return cost

    def _permuted_b(self, t: Term, perm: Mapping[str, Permutation]) -> torch.Tensor:
        """B'_t: t's B with the other axes' permutations applied, contiguous (the last gather writes into
        buffer 1)."""
        wb = t.b
        for i, (ax, q, k) in enumerate(t.others):
            out = self._buffer(1, wb) if i == len(t.others) - 1 else None
            wb = torch.index_select(wb, ax, expand_blocks(perm[q], k), out=out)
        return self._laid_out(wb, 1)

    def _laid_out(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x, or a contiguous copy of it in buffer `which` (a conv weight's units moved last)."""
        return x if x.is_contiguous() else self._buffer(which, x).copy_(x)

    def _buffer(self, which: int, like: torch.Tensor) -> torch.Tensor:
        """Buffer `which` (0: A's operand, 1: B's) as an empty contiguous tensor shaped like `like`. Every
        product reuses these: a fresh tensor of a weight's size costs a page fault per 4 KB touched."""
        buf = self._buffers[which]
        if buf is None or buf.numel() < like.numel() or buf.dtype != like.dtype:  # made once, at the largest size
            size = max([like.numel()] + [t.a.numel() for terms in self.terms.values() for t in terms])
            buf = self._buffers[which] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buf[:like.numel()].view(like.shape)

    def row_norms(self, p: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖A row i‖, ‖B row j‖) of p over all its terms, float64 on the CPU; computed on first use
        (only candidates that differ from the current assignment need them)."""
        if p not in self._row_norms:
            terms = self.terms[p]
            self._row_norms[p] = (_side_by_side([t.unit_norms(t.a) for t in terms]),
                                  _side_by_side([t.unit_norms(t.b) for t in terms]))
        return self._row_norms[p]

    def rounding(self, p: str, rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> float:
        """Bound on |gain read off float C_p − exact gain| when `rows` (CPU) move from `old` to `new` columns."""
        na, nb = self.row_norms(p)
        return self.rounding_gamma(p) * float((na[rows] * (nb[new[rows]] + nb[old[rows]])).sum())


def _moved(ax: int, axis: int, to: int) -> int:
    """Where axis `ax` lies after `torch.movedim(x, axis, to)`."""
    if axis < ax <= to:
        return ax - 1
    if to <= ax < axis:
        return ax + 1
    return ax


def _side_by_side(norms: list[torch.Tensor]) -> torch.Tensor:
    """‖row i‖ of matrices side by side, from each one's row norms; float64 on the CPU."""
    return torch.stack([v.double() for v in norms]).square().sum(0).sqrt().cpu()


def _sliced_dot64(wa: torch.Tensor, wb: torch.Tensor, axis: int, rows: torch.Tensor, rows_b: torch.Tensor,
                  rows_b_old: torch.Tensor | None, others: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """float64 `Σ_r ⟨wa[rows[r]], wb'[rows_b[r]] − wb'[rows_b_old[r]]⟩`, slices taken along `axis`,
    `wb'` being `wb` with `others` (axis, index) applied on its other axes; no `rows_b_old`: no subtraction."""
    per_slice = max(1, wa.numel() // max(1, wa.shape[axis]))
    step = max(1, CHUNK_ELEMS // per_slice)
    total = torch.zeros((), dtype=torch.float64, device=wa.device)
    for s in range(0, rows.numel(), step):
        xa = wa.index_select(axis, rows[s:s + step]).double()
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


def inners(spec: PermutationSpec, perms: list[Mapping[str, Permutation] | None], key: str,
           a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> tuple[list[float], float]:
    """float64 ⟨A[key], π(B)[key]⟩ for each π of `perms` (None: the identity), and ‖A[key]‖² + ‖B[key]‖²,
    in one pass that converts each slice of A once (a permutation keeps B's norm: it is read off the
    first π(B))."""
    wa, wb = a[key], b[key]
    if wa.ndim == 0:
        x, y = wa.double(), wb.double()
        return [(x * y).item()] * len(perms), (x * x + y * y).item()
    q0 = spec.axes_to_perm[key][0]
    picks = []  # per π: B's row index (None: as it lies) and the other axes' indices
    for perm in perms:
        rows_b = None if q0 is None or perm is None else axis_index(spec, key, 0, perm[q0])
        picks.append((rows_b, [] if perm is None else _others(spec, perm, key, 0)))
    step = max(1, CHUNK_ELEMS // max(1, wa[0].numel()))
    dots: list[list[torch.Tensor]] = [[] for _ in range(len(perms) + 1)]  # per π, and the last: squared norms
    for s in range(0, wa.shape[0], step):  # A's slices as they lie; B's as each π picks them
        xa = wa[s:s + step].double().reshape(-1)
        for i, (rows_b, others) in enumerate(picks):
            xb = wb[s:s + step] if rows_b is None else wb.index_select(0, rows_b[s:s + step])
            for ax, idx in others:
                xb = xb.index_select(ax, idx)
            xb = xb.double().reshape(-1)
            dots[i].append(torch.dot(xa, xb))
            if i == 0:
                dots[-1] += [torch.dot(xa, xa), torch.dot(xb, xb)]
    values = torch.stack([torch.stack(d).sum() for d in dots]).tolist()  # a few ops, not one per slice
    return values[:-1], values[-1]


def exact_gain(spec: PermutationSpec, perm: Mapping[str, Permutation], new_perm: Mapping[str, Permutation], p: str,
               key: str, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Change of ⟨A[key], π(B)[key]⟩ (float64) when permutation p alone goes from perm[p] to new_perm[p].

    When p acts on one axis of `key`, only the units whose assignment changed contribute, so only
    those slices are read; otherwise both values are computed in full.
    """
    axes = [axis for axis, q in enumerate(spec.axes_to_perm[key]) if q == p]
    if len(axes) != 1:
        (after, before), _ = inners(spec, [new_perm, perm], key, a, b)
        return after - before
    axis = axes[0]
    old, new = perm[p], new_perm[p]
    rows = torch.nonzero(old != new).flatten()
    if rows.numel() == 0:
        return 0.0
    k = block_size(spec, key, axis)
    return _sliced_dot64(a[key], b[key], axis, expand_blocks(rows, k), expand_blocks(new[rows], k),
                         expand_blocks(old[rows], k), _others(spec, perm, key, axis)).item()
