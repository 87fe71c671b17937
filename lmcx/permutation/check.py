"""Checking a permutation spec on the model it describes, and how much of the model it covers.

`check_spec(model, spec, example_input)` works on a copy of the model, in float64 where the model runs
in it, with BatchNorm running variances drawn from [0.5, 1.5] and noise added to every other tensor
that is constant (a BN weight of ones, running means or a class token of zeros): a constant tensor
would hide a missing permutation. Norm layers' `eps` is raised to at least 0.1 in the copy: BatchNorm
in train mode on a tiny batch (2 samples of a 1x1 feature map) amplifies rounding by up to
1/sqrt(eps) per layer, which would make a right spec look wrong; eps is not permuted, so any value
checks the same symmetry. It applies a random permutation of every group that moves every
unit (a random n-cycle) and compares the outputs with the unpermuted copy's in eval mode and in
train mode (BatchNorm on batch statistics; dropout modules off, the same random seed for both runs),
and that each activation point's output is the permuted one. Any difference beyond float rounding
is an LmcxError naming the permutation(s) that break the function.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..errors import LmcxError
from .spec import Permutation, PermutationSpec, StateDict, apply_permutation, perm_sizes
from .trace_ops import leaves
from .weight_matching import matchable_params

__all__ = ["Coverage", "check_spec", "spec_coverage"]

FIT_PINS = ("model input", "model output", "convolution kernel window")  # what no permutation can move


@dataclass(frozen=True)
class Coverage:
    """How much of a model a spec permutes. Axes of size 1 are not counted (nothing to permute);
    `pinned[reason]` lists the other unpermuted axes as 'param[axis]'."""

    permutations: int
    tensors: int
    tensors_permuted: int
    axes: int
    axes_permuted: int
    block_axes: int
    pinned: dict[str, list[str]]

    @property
    def full(self) -> bool:
        """True when every pinned axis is an input, output or kernel axis: every hidden axis is permuted."""
        return set(self.pinned) <= set(FIT_PINS)

    def summary(self) -> str:
        lines = [f"{self.permutations} permutations; {self.tensors_permuted} of {self.tensors} parameters and "
                 f"buffers permuted; {self.axes_permuted} of {self.axes} axes permuted"
                 f"{f' ({self.block_axes} in blocks)' if self.block_axes else ''}"]
        for reason, axes in sorted(self.pinned.items(), key=lambda r: (-len(r[1]), r[0])):
            lines.append(f"  pinned ({reason}): {len(axes)} axes, e.g. {', '.join(axes[:3])}")
        return "\n".join(lines)


def spec_coverage(spec: PermutationSpec, state: StateDict) -> Coverage:
    tensors = permuted_tensors = axes = permuted_axes = blocks = 0
    pinned: dict[str, list[str]] = defaultdict(list)
    for key, t in state.items():
        if not t.is_floating_point():
            continue
        tensors += 1
        entry = spec.axes_to_perm.get(key, (None,) * t.ndim)
        permuted_tensors += any(p is not None for p in entry)
        for axis, p in enumerate(entry):
            if t.shape[axis] <= 1:
                continue
            axes += 1
            if p is not None:
                permuted_axes += 1
                blocks += (key, axis) in spec.block_sizes
            else:
                reason = spec.pinned.get((key, axis), "not permuted by the spec" if key in spec.axes_to_perm
                                         else "not in the spec")
                pinned[reason].append(f"{key}[{axis}]")
    return Coverage(len(spec.perm_to_axes), tensors, permuted_tensors, axes, permuted_axes, blocks, dict(pinned))


def check_spec(model: nn.Module, spec: PermutationSpec, example_input: torch.Tensor | tuple, *,
               seed: int = 0) -> Coverage:
    """Raise LmcxError unless permuting `model` by `spec` leaves its function unchanged (module
    docstring); returns the spec's coverage of the model. The model is not modified."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    state = model.state_dict()
    matchable_params(spec, state, state)  # names and sizes fit the model, or a clear error
    reference, inputs, tol = _perturbed_copy(model, inputs, seed)
    perm = _moving_permutation(spec, reference.state_dict(), seed)
    failure = _compare(reference, spec, perm, inputs, tol, seed)
    if failure is not None:
        identity = {p: torch.arange(n) for p, n in perm_sizes(spec, state).items()}
        culprits = [p for p in spec.names
                    if _compare(reference, spec, {**identity, p: perm[p]}, inputs, tol, seed) is not None]
        named = "; ".join(f"permutation {p!r} (on {_axes(spec, p)})" for p in culprits[:3]) or \
            "all permutations together (no single one)"
        raise LmcxError(f"the permutation spec does not fit the model: {failure} under {named}; "
                        "the spec would not preserve the model's function")
    return spec_coverage(spec, state)


def _axes(spec: PermutationSpec, p: str) -> str:
    axes = spec.perm_to_axes[p]
    return ", ".join(f"{k}[{a}]" for k, a in axes[:4]) + (f" and {len(axes) - 4} more" if len(axes) > 4 else "")


def _perturbed_copy(model: nn.Module, inputs: tuple, seed: int) -> tuple[nn.Module, tuple, float]:
    """A perturbed copy in float64 (tolerance 1e-6), or float32 (1e-3) if the model cannot run in float64."""
    copy_ = copy.deepcopy(model)
    for m in copy_.modules():
        if isinstance(getattr(m, "eps", None), float):
            m.eps = max(m.eps, 0.1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in copy_.state_dict(keep_vars=True).items():
            if not t.is_floating_point() or not t.numel():
                continue
            if key.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen).to(t.device))
            elif t.numel() == 1 or bool(t.min() == t.max()):
                scale = t.flatten()[0].abs().item()
                noise = torch.randn(t.shape, generator=gen).to(t.device)
                t.add_(0.1 * noise * (scale if 0 < scale < math.inf else 1.0))
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-3)):
        cast = tuple(x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)
        try:
            with torch.no_grad():
                copy_.to(dtype).eval()(*cast)
            return copy_, cast, tol
        except Exception as e:
            error = e
    raise LmcxError(f"the model fails on the example input: {str(error).strip().splitlines()[0]}; "
                    "pass an input the model accepts (one batch, as for forward())") from None


def _moving_permutation(spec: PermutationSpec, state: StateDict, seed: int) -> dict[str, Permutation]:
    """A random n-cycle per permutation: every unit moves, so no unit's mistake can hide."""
    gen = torch.Generator().manual_seed(seed)
    perm = {}
    for p, n in perm_sizes(spec, state).items():
        order = torch.randperm(n, generator=gen)
        cycle = torch.empty(n, dtype=torch.long)
        cycle[order] = order.roll(-1)
        perm[p] = cycle
    return perm


def _compare(reference: nn.Module, spec: PermutationSpec, perm: Mapping[str, Permutation],
             inputs: tuple, tol: float, seed: int) -> str | None:
    """What differs between `reference` and `reference` permuted by `perm`, or None. The permuted model
    is `reference` run on the permuted state (torch.func.functional_call: no second copy of the model);
    every entry is its own tensor, so what one run updates in place (BN statistics) the other never sees."""
    from ..models import forward_hooks  # here: lmcx.models itself imports lmcx.permutation

    state = reference.state_dict()
    permuted = {k: v.clone() if v.data_ptr() == state[k].data_ptr() else v  # unpermuted entries alias the state
                for k, v in apply_permutation(spec, perm, state).items()}
    points = sorted({name for names in spec.activation_points.values() for name in names})
    for training in (False, True):
        outputs, acts = [], []
        reference.train(training)
        for sub in reference.modules():
            if isinstance(sub, nn.modules.dropout._DropoutNd):
                sub.eval()
        for state in (None, permuted):
            store: dict[str, torch.Tensor] = {}
            hooks = {} if training else {n: _recorder(store, n) for n in points}
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]), forward_hooks(reference, hooks):
                    torch.manual_seed(seed)
                    out = reference(*inputs) if state is None else \
                        torch.func.functional_call(reference, state, inputs, tie_weights=False)
                    outputs.append(leaves(out, torch.Tensor))
            except Exception as e:
                raise LmcxError(f"the model fails on the example input in {'train' if training else 'eval'} mode: "
                                f"{str(e).strip().splitlines()[0]}; pass an input the model accepts in both modes "
                                "(BatchNorm in train mode needs more than one value per channel)") from None
            acts.append(store)
        mode = "train" if training else "eval"
        diff = max((_max_diff(a, b) for a, b in zip(*outputs)), default=0.0)
        scale = max((a.double().abs().max().item() for a in outputs[0] if a.numel()), default=0.0)
        if len(outputs[0]) != len(outputs[1]) or not diff <= tol * (1 + scale):
            return f"the outputs differ by {diff:.3g} in {mode} mode"
        for p, names in spec.activation_points.items() if not training else ():
            for name in names:
                if name not in acts[0]:
                    return f"activation point {name!r} is not reached in the forward pass"
                a = acts[0][name].index_select(1, perm[p].to(acts[0][name].device))
                if not _max_diff(a, acts[1][name]) <= tol * (1 + a.double().abs().max().item()):
                    return f"activation point {name!r} does not carry permutation {p!r}"
    return None


def _recorder(store: dict[str, torch.Tensor], name: str):
    def hook(_module, _inputs, out):
        store[name] = out
    return hook


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|, with equal infinities and NaNs in the same places counting as equal."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    return (a - b).abs().masked_fill(same, 0.0).nan_to_num(math.inf).max().item() if a.numel() else 0.0
