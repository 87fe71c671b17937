"""Activation matching (Git Re-Basin): match hidden units by how their activations correlate on data.

For every permutation `p` of a `PermutationSpec`, the activations of both models are read at each of
`spec.activation_points[p]` (module names whose forward output carries p's units on dimension 1) with
forward hooks, on the first `samples` training images (normalised, no augmentation, models in eval
mode). Convolutional activations [N, C, H, W] count every spatial position as a sample. Per point,
the Pearson correlation between unit i of A and unit j of B is

    corr_ij = (E[a_i b_j] − E[a_i] E[b_j]) / (σ(a_i) σ(b_j))

(a unit that is constant on the data, e.g. a dead ReLU, has correlation 0 with everything). The
correlations are summed over p's points (a residual stream has several), and one linear assignment
per permutation (`scipy.optimize.linear_sum_assignment`, maximise) gives p: new unit i of B is old
unit p[i], so `apply_permutation(spec, perm, params_b)` brings B into A's unit order, as for weight
matching.

Ties: units that are dead (or constant) on the data correlate with nothing, so any pairing of them is
equally good for the activation correlation, and the assignment among them would be arbitrary. They
are told apart by the correlation of the activation modules' *inputs* (the pre-activations, e.g. what
enters the ReLU), accumulated in the same pass and added with weight `TIEBREAK` = 1e-9: a tie-break
only (it shifts the summed objective by at most 2·n·points·1e-9). Hence a model matched against a
permuted copy of itself gets exactly the inverse permutation back even when some units are dead.

The data pass is a single one: per point, sums of a, b, a², b² and the cross products aᵀb are
accumulated in float64 (each batch's products computed in float64), so no activation is stored
beyond one batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import LmcxError
from .spec import Permutation, PermutationSpec

TIEBREAK = 1e-9  # weight of the pre-activation correlations: they only decide between otherwise equal pairings

__all__ = ["ActivationStats", "activation_correlations", "activation_matching", "assign_from_correlation"]


@dataclass
class ActivationStats:
    """Details of one activation matching: `corr[p]` is the n×n correlation matrix summed over the
    permutation's points (rows: units of A, columns: units of B), `points[p]` how many points were
    summed, `samples` the images used and `rows` the activation rows (images × spatial positions) per
    point of each permutation."""

    corr: dict[str, torch.Tensor]
    points: dict[str, int]
    samples: int
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    pre_corr: dict[str, torch.Tensor] = field(default_factory=dict)  # pre-activation correlations (tie-break)


class _Moments:
    """Running float64 sums for the correlation of two activation tensors with n units each."""

    def __init__(self, n: int, device: torch.device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.count = 0
        self.sa, self.sb, self.saa, self.sbb, self.sab = z(n), z(n), z(n), z(n), z(n, n)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab.addmm_(a.T, b)

    def correlation(self) -> torch.Tensor:
        m = float(self.count)
        mean_a, mean_b = self.sa / m, self.sb / m
        cov = self.sab / m - torch.outer(mean_a, mean_b)
        std_a = (self.saa / m - mean_a * mean_a).clamp_min(0).sqrt()
        std_b = (self.sbb / m - mean_b * mean_b).clamp_min(0).sqrt()
        denom = torch.outer(std_a, std_b)
        # relative threshold: a unit whose spread is only float rounding counts as constant
        tiny_a = std_a <= 1e-7 * (mean_a.abs() + 1e-30) + 1e-30
        tiny_b = std_b <= 1e-7 * (mean_b.abs() + 1e-30) + 1e-30
        corr = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
        corr[tiny_a, :] = 0
        corr[:, tiny_b] = 0
        return corr.clamp_(-1, 1)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [N·∏spatial, C]: channels on dim 1, every other position a sample."""
    if x.ndim < 2:
        raise LmcxError(f"an activation point gave a tensor of shape {tuple(x.shape)}; expected units on dimension 1")
    if x.ndim == 2:
        return x
    return torch.movedim(x, 1, -1).reshape(-1, x.shape[1])


def _store_outputs(names: list[str], store: dict[str, torch.Tensor]) -> dict:
    """Hooks keeping each activation point's output, and its input when it is the pre-activation of the
    same units (a ReLU's input), which breaks ties between units whose outputs are all zero."""
    def hook(name):
        def fn(_m, inputs, out):
            store[name] = out
            pre = inputs[0] if inputs and torch.is_tensor(inputs[0]) else None
            if pre is not None and pre.shape == out.shape and pre is not out:
                store["pre:" + name] = pre
        return fn
    return {name: hook(name) for name in names}


@torch.inference_mode()
def activation_correlations(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    ds,
    *,
    samples: int,
    batch_size: int = 500,
) -> ActivationStats:
    """Correlation matrices of A's and B's units per permutation, summed over its activation points,
    from one pass over the first `samples` training images (see the module docstring)."""
    from .. import progress
    from ..models import forward_hooks  # here: lmcx.models itself imports lmcx.permutation

    t0 = time.perf_counter()
    if samples <= 0 or batch_size <= 0:
        raise LmcxError(f"activation matching needs samples > 0 and batch_size > 0, got {samples} and {batch_size}")
    missing = [p for p in spec.names if not spec.activation_points.get(p)]
    if missing:
        raise LmcxError(f"the permutation spec lists no activation points for {missing[0]!r}; "
                        "activation matching cannot be used with this architecture")
    x_train = ds.x_train[:samples]
    used = int(x_train.shape[0])
    if used == 0:
        raise LmcxError("the training set is empty; activation matching needs training images")
    points = sorted({name for p in spec.names for name in spec.activation_points[p]})
    device = next(model_a.parameters()).device
    acts_a: dict[str, torch.Tensor] = {}
    acts_b: dict[str, torch.Tensor] = {}
    moments: dict[str, _Moments] = {}
    pre_moments: dict[str, _Moments | None] = {}
    was = model_a.training, model_b.training
    model_a.eval()
    model_b.eval()
    try:
        with forward_hooks(model_a, _store_outputs(points, acts_a)), \
                forward_hooks(model_b, _store_outputs(points, acts_b)), \
                progress.task("activation matching", total=-(-used // batch_size), unit="batch") as bar:
            for start in range(0, used, batch_size):
                x = ds.normalize(x_train[start:start + batch_size].to(device))
                acts_a.clear()
                acts_b.clear()
                model_a(x)
                model_b(x)
                for name in points:
                    if name not in acts_a or name not in acts_b:
                        raise LmcxError(f"activation point {name!r} was not reached in the forward pass; "
                                        "the spec does not match this architecture")
                    ra, rb = _rows(acts_a[name]), _rows(acts_b[name])
                    if name not in moments:
                        moments[name] = _Moments(ra.shape[1], ra.device)
                        has_pre = "pre:" + name in acts_a and "pre:" + name in acts_b
                        pre_moments[name] = _Moments(ra.shape[1], ra.device) if has_pre else None
                    moments[name].add(ra, rb)
                    if pre_moments[name] is not None:
                        pre_moments[name].add(_rows(acts_a["pre:" + name]), _rows(acts_b["pre:" + name]))
                bar.advance(1, images=min(start + batch_size, used))
    finally:
        model_a.train(was[0])
        model_b.train(was[1])
    point_corr = {name: m.correlation() for name, m in moments.items()}
    point_pre = {name: m.correlation() for name, m in pre_moments.items() if m is not None}
    corr: dict[str, torch.Tensor] = {}
    pre_corr: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for p in spec.names:
        names = spec.activation_points[p]
        sizes = {point_corr[n].shape[0] for n in names}
        if len(sizes) != 1:
            raise LmcxError(f"the activation points of {p!r} have different numbers of units {sorted(sizes)}; "
                            "the spec does not match this architecture")
        corr[p] = torch.stack([point_corr[n] for n in names]).sum(0).cpu()
        pres = [point_pre[n] for n in names if n in point_pre]
        if pres:
            pre_corr[p] = torch.stack(pres).sum(0).cpu()
        rows[p] = moments[names[0]].count
    return ActivationStats(corr=corr, points={p: len(spec.activation_points[p]) for p in spec.names},
                           samples=used, rows=rows, seconds=time.perf_counter() - t0, pre_corr=pre_corr)


def assign_from_correlation(corr: Mapping[str, torch.Tensor], tiebreak: Mapping[str, torch.Tensor] | None = None
                            ) -> tuple[dict[str, Permutation], float]:
    """One maximising linear assignment per permutation of `corr[p] + TIEBREAK·tiebreak[p]` (tiebreak:
    e.g. `ActivationStats.pre_corr`); returns (perm, seconds spent in the LAP)."""
    from scipy.optimize import linear_sum_assignment

    perm: dict[str, Permutation] = {}
    lap = 0.0
    for p, c in corr.items():
        cost = c.double()
        if tiebreak is not None and p in tiebreak:
            cost = cost + TIEBREAK * tiebreak[p].double()
        t = time.perf_counter()
        rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        lap += time.perf_counter() - t
        assert np.array_equal(rows, np.arange(len(rows)))
        perm[p] = torch.from_numpy(np.asarray(cols, dtype=np.int64))
    return perm, lap


def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    ds,
    *,
    samples: int = 5000,
    batch_size: int = 500,
) -> dict[str, Permutation]:
    """Permutation of model B (CPU int64 tensors, one per spec name) maximising, per permutation, the
    summed correlation of A's and B's activations at the spec's activation points on the first
    `samples` training images of `ds`. Deterministic (no randomness is involved)."""
    stats = activation_correlations(spec, model_a, model_b, ds, samples=samples, batch_size=batch_size)
    return assign_from_correlation(stats.corr, stats.pre_corr)[0]
