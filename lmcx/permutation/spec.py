"""Permutation specs: which permutation acts on which axis of which parameter (Git Re-Basin form).

A permutation of a hidden layer's units reorders the rows of that layer's weight (and bias, norm
parameters and running statistics) and the columns of the next layer's weight; it never changes the
function. Each architecture describes itself once as a `PermutationSpec`; everything else
(applying permutations, weight matching, activation matching, SVD analysis) reads only the spec.

A permutation is a 1-D int64 tensor `p` of length n: new unit i is old unit p[i], i.e. permuting an
axis means `w.index_select(axis, p)`.

Block axes: an axis of size n·k can be permuted in blocks of k (`spec.block_sizes[(param, axis)] = k`):
index c·k + j becomes p[c]·k + j. This is the input axis of a Linear after `flatten` of a [C, H, W]
feature map (k = H·W): the channel permutation moves whole H·W blocks of columns.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import LmcxError

Permutation = torch.Tensor
StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """`axes_to_perm[param] = (perm name or None per axis)`; `perm_to_axes` is its inverse.

    `activation_points[perm]` lists module names whose forward output carries that permutation's
    units on dimension 1 (used by activation matching and feature analyses). Parameters absent from
    `axes_to_perm` (e.g. `num_batches_tracked`) are left as they are. `block_sizes[(param, axis)] = k`
    marks an axis permuted in blocks of k (see the module docstring; absent: k = 1). `pinned[(param,
    axis)]` says why an axis is not permuted, where the spec's author knows (traced specs do).
    """

    axes_to_perm: dict[str, tuple[str | None, ...]]
    perm_to_axes: dict[str, list[tuple[str, int]]]
    activation_points: dict[str, list[str]] = field(default_factory=dict)
    block_sizes: dict[tuple[str, int], int] = field(default_factory=dict)
    pinned: dict[tuple[str, int], str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.perm_to_axes)


def permutation_spec_from_axes(
    axes_to_perm: dict[str, tuple[str | None, ...]],
    activation_points: dict[str, list[str]] | None = None,
    block_sizes: dict[tuple[str, int], int] | None = None,
    pinned: dict[tuple[str, int], str] | None = None,
) -> PermutationSpec:
    perm_to_axes: dict[str, list[tuple[str, int]]] = {}
    for param, axes in axes_to_perm.items():
        for axis, perm in enumerate(axes):
            if perm is not None:
                perm_to_axes.setdefault(perm, []).append((param, axis))
    blocks = {key: k for key, k in (block_sizes or {}).items() if k != 1}
    return PermutationSpec(dict(axes_to_perm), perm_to_axes, dict(activation_points or {}), blocks, dict(pinned or {}))


def block_size(spec: PermutationSpec, key: str, axis: int) -> int:
    return spec.block_sizes.get((key, axis), 1)


def axis_index(spec: PermutationSpec, key: str, axis: int, p: Permutation) -> torch.Tensor:
    """The index along `key`'s `axis` that permutation `p` of the spec's units selects (blocks expanded)."""
    return expand_blocks(p, block_size(spec, key, axis))


def expand_blocks(p: torch.Tensor, k: int) -> torch.Tensor:
    """Unit indices -> axis indices for blocks of k: [p[0]·k .. p[0]·k+k-1, p[1]·k, ...]."""
    if k == 1:
        return p
    return (p[:, None] * k + torch.arange(k, device=p.device)).reshape(-1)


def perm_sizes(spec: PermutationSpec, params: StateDict) -> dict[str, int]:
    """Number of units of each permutation, read off the first parameter it acts on."""
    return {p: params[k].shape[axis] // block_size(spec, k, axis) for p, ((k, axis), *_) in spec.perm_to_axes.items()}


def identity_permutation(spec: PermutationSpec, params: StateDict) -> dict[str, Permutation]:
    return {p: torch.arange(n) for p, n in perm_sizes(spec, params).items()}


def random_permutation(spec: PermutationSpec, params: StateDict, seed: int) -> dict[str, Permutation]:
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=gen) for p, n in perm_sizes(spec, params).items()}


def get_permuted_param(
    spec: PermutationSpec,
    perm: Mapping[str, Permutation],
    key: str,
    params: StateDict,
    except_axis: int | None = None,
) -> torch.Tensor:
    """`params[key]` with every permutation of the spec applied, except on axis `except_axis`."""
    w = params[key]
    for axis, p in enumerate(spec.axes_to_perm.get(key, ())):
        if axis == except_axis or p is None:
            continue
        k = block_size(spec, key, axis)  # a block axis moves whole blocks: (n·k) -> (n, k), permute n, back
        w = torch.index_select(w.unflatten(axis, (-1, k)), axis, perm[p].to(w.device)).flatten(axis, axis + 1)
    return w


def apply_permutation(
    spec: PermutationSpec, perm: Mapping[str, Permutation], params: StateDict
) -> dict[str, torch.Tensor]:
    """Return a new state dict with `perm` applied to every parameter and buffer the spec names (and the
    version metadata of a `module.state_dict()`, which some modules' loaders require)."""
    check_permutation(spec, perm, params)
    out = OrderedDict((k, get_permuted_param(spec, perm, k, params)) for k in params)
    if hasattr(params, "_metadata"):
        out._metadata = params._metadata
    return out


def check_permutation(spec: PermutationSpec, perm: Mapping[str, Permutation], params: StateDict) -> None:
    """Raise LmcxError unless `perm` has exactly the spec's names, sizes, and valid index arrays."""
    missing = [k for k in spec.axes_to_perm if k not in params]
    if missing:
        raise LmcxError(f"the model has no parameter {missing[0]!r} that its permutation spec names; "
                        "the checkpoint does not match this architecture")
    sizes = perm_sizes(spec, params)
    if set(perm) != set(sizes):
        extra, absent = sorted(set(perm) - set(sizes)), sorted(set(sizes) - set(perm))
        raise LmcxError(f"permutation names do not fit the model (unknown: {extra[:3]}, missing: {absent[:3]}); "
                        "use a permutation file written for this architecture")
    for name, n in sizes.items():
        p = perm[name]
        if p.ndim != 1 or p.numel() != n or not torch.equal(torch.sort(p.cpu()).values, torch.arange(n)):
            raise LmcxError(f"permutation {name!r} is not a permutation of {n} units; "
                            "use a permutation file written for a model of this width")


def invert_permutation(perm: Mapping[str, Permutation]) -> dict[str, Permutation]:
    return {k: torch.argsort(p) for k, p in perm.items()}


def compose_permutations(first: Mapping[str, Permutation], then: Mapping[str, Permutation]) -> dict[str, Permutation]:
    """The permutation equal to applying `first`, then `then`."""
    return {k: first[k][then[k]] for k in first}


# ---------------------------------------------------------------------------------------------
# Permutation files: JSON {"format": "lmcx-permutation", "permutations": {name: [indices]}}, readable
# and diffable. `load_permutation_file` checks the file against a model before anything uses it.


def save_permutation_file(path, perm: Mapping[str, Permutation], info: dict | None = None) -> None:
    from ..io import write_json

    write_json(path, {"format": "lmcx-permutation", "info": info or {},
                      "permutations": {k: [int(i) for i in v.tolist()] for k, v in perm.items()}})


def load_permutation_file(path, spec: PermutationSpec, params: StateDict) -> dict[str, Permutation]:
    from ..io import read_json

    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != "lmcx-permutation" or \
            not isinstance(data.get("permutations"), dict):
        raise LmcxError(f"{path} is not an lmcx permutation file; use one written by `lmcx match`")
    for k, v in data["permutations"].items():  # torch.tensor(..., dtype=long) would truncate 1.7 or True to 1
        if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise LmcxError(f"{path}: permutation {k!r} must be a list of integers")
    try:
        perm = {k: torch.tensor(v, dtype=torch.long) for k, v in data["permutations"].items()}
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise LmcxError(f"{path}: permutations must be lists of integers") from None
    try:
        check_permutation(spec, perm, params)
    except LmcxError as e:
        raise LmcxError(f"{path}: {e}") from None
    return perm
