"""What each operation does to channel axes, for the spec tracer (trace.py).

A handler sees one graph node through an `OpContext`: the node's concrete arguments, the `Dims` (one
axis-group element per axis) of its tensor inputs, its output and, for a module, its parameters. It
states the node's symmetry: `join` for axes that must carry the same permutation, `block` for a
flatten, `free` for axes whose order the result does not depend on (a reduced axis, a shape query),
`pin` with a reason. Every axis a handler leaves untouched is pinned afterwards (`OpContext.finish`),
so an operation that is not understood, or is used in a way a handler does not recognise, is never
permuted across: safe, and reported. A handler that joins some axes must account for every tensor
input (join, free or pin it); where it cannot, it returns before joining anything.
"""
from __future__ import annotations

import builtins
import math
from typing import Any

import torch
from torch import fx, nn

from .axis_groups import AxisGroups


class Dims(tuple):
    """The axis-group elements of one tensor, one per axis."""


def leaves(value: Any, kind: type) -> list:
    """Every `kind` inside a structure of lists, tuples and dicts (a forward's arguments or outputs)."""
    if isinstance(value, kind):
        return [value]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in leaves(v, kind)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in leaves(v, kind)]
    return []


def dims_in(value: Any) -> list[Dims]:
    return leaves(value, Dims)


class OpContext:
    def __init__(self, groups: AxisGroups, node: fx.Node, args: tuple, kwargs: dict, dargs: tuple, dkwargs: dict,
                 out: Any, module: nn.Module | None = None, params: dict[str, Dims] | None = None):
        self.groups, self.node, self.args, self.kwargs = groups, node, args, kwargs
        self.dargs, self.dkwargs, self.out, self.module = dargs, dkwargs, out, module
        self.params = params or {}
        self._touched: set[int] = set()

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        return self.args[i] if len(self.args) > i else self.kwargs.get(name, default)

    def darg(self, i: int, name: str) -> Dims | None:
        d = self.dargs[i] if len(self.dargs) > i else self.dkwargs.get(name)
        return d if isinstance(d, Dims) else None

    def size(self, e: int) -> int:
        return self.groups.size[e]

    def join(self, a: int, b: int) -> None:
        self._touched.update((a, b))
        self.groups.join(a, b)

    def join_if_same(self, a: int, b: int) -> None:
        if self.size(a) == self.size(b):
            self.join(a, b)

    def join_all(self, a: Dims, b: Dims) -> bool:
        """Join a[i] with b[i] for every axis, if the shapes agree."""
        if len(a) != len(b) or any(self.size(x) != self.size(y) for x, y in zip(a, b)):
            return False
        for x, y in zip(a, b):
            self.join(x, y)
        return True

    def block(self, x: int, y: int, k: int) -> None:
        self._touched.update((x, y))
        self.groups.set_block(x, y, k)

    def free(self, *elements: int) -> None:
        self._touched.update(elements)

    def pin(self, e: int, reason: str) -> None:
        self._touched.add(e)
        self.groups.pin(e, reason)

    def rerun(self, x: torch.Tensor) -> Any:
        """This node's operation applied to `x` in place of its first argument (same other arguments)."""
        if self.node.op == "call_method":
            return getattr(x, self.node.target)(*self.args[1:], **self.kwargs)
        return self.node.target(x, *self.args[1:], **self.kwargs)

    def finish(self, what: str) -> None:
        for d in dims_in((self.dargs, self.dkwargs, self.out)) + list(self.params.values()):
            for e in d:
                if e not in self._touched:
                    self.groups.pin(e, f"{what} is not followed by the tracer")


# --------------------------------------------------------------------------------------------
# Pointwise and broadcasting operations


def elementwise(ctx: OpContext) -> None:
    """Output = f(x) position by position, or equivariant along every axis (softmax, normalize); a
    tensor among the other arguments (`clamp(x, min=t)`) is broadcast against x, as in `broadcast`."""
    x = ctx.darg(0, "input")
    if x is not None and isinstance(ctx.out, Dims) and len(x) == len(ctx.out):
        broadcast(ctx)


def cast(ctx: OpContext) -> None:
    """Dtype/device/layout changes; a tensor argument (`x.to(y)`, `x.type_as(y)`) gives only its dtype."""
    x = ctx.darg(0, "input")
    if x is not None and isinstance(ctx.out, Dims) and ctx.join_all(x, ctx.out):
        for d in dims_in((ctx.dargs[1:], ctx.dkwargs)):
            ctx.free(*d)


def broadcast(ctx: OpContext) -> None:
    """Elementwise on several tensors with broadcasting (add, mul, where, ...): aligned axes share a
    permutation; an axis of size 1 is broadcast and carries none (squeeze-and-excitation's [N,C,1,1])."""
    out = ctx.out
    if not isinstance(out, Dims):
        return
    operands = dims_in((ctx.dargs, ctx.dkwargs))
    if any(len(x) > len(out) for x in operands):
        return
    for x in operands:
        for e, o in zip(x, out[len(out) - len(x):]):
            if ctx.size(e) == ctx.size(o):
                ctx.join(e, o)
            elif ctx.size(e) == 1:
                ctx.free(e)


def shape_only(ctx: OpContext) -> None:
    """x.size(), x.dim(), x.shape: the result depends on no unit order."""
    for d in dims_in((ctx.dargs, ctx.dkwargs)):
        ctx.free(*d)


def attribute(ctx: OpContext) -> None:
    name = ctx.arg(1, "name")
    if not isinstance(ctx.out, Dims):
        shape_only(ctx)
    elif name in ("T", "mT"):
        reorder(ctx)
    elif name == "data":
        elementwise(ctx)


# --------------------------------------------------------------------------------------------
# Axis bookkeeping: reductions, reshapes, reorders, indexing, concatenation


def reduce(ctx: OpContext, dim_at: int = 1) -> None:
    """mean/sum/amax/... over some axes: a reduced axis's order does not matter; the rest carry over.
    `dim_at`: the position of the `dim` argument (2 for norm(x, p, dim))."""
    x, out, dim = ctx.darg(0, "input"), ctx.out, ctx.arg(dim_at, "dim")
    if x is None or not isinstance(out, Dims) or isinstance(dim, bool):
        return
    dims = list(range(len(x))) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    if not all(isinstance(d, int) for d in dims) or not x:
        return
    reduced = {d % len(x) for d in dims}
    kept = [i for i in range(len(x)) if i not in reduced]
    if len(out) == len(x):  # keepdim
        pairs = [(x[i], out[i]) for i in kept]
        ctx.free(*[out[i] for i in reduced])
    elif len(out) == len(kept):
        pairs = [(x[i], o) for i, o in zip(kept, out)]
    else:
        return
    for a, o in pairs:
        ctx.join_if_same(a, o)
    ctx.free(*[x[i] for i in reduced])


def reshape(ctx: OpContext) -> None:
    """view/reshape/flatten/unflatten/squeeze: axes are matched in row-major runs of equal size. One
    axis flattened with inner ones becomes a block axis (c·k + j); the inner axes are pinned."""
    x, out = ctx.darg(0, "input"), ctx.out
    if x is None or not isinstance(out, Dims):
        return
    for d in dims_in((ctx.dargs[1:], ctx.dkwargs)):  # view_as(y): y gives only a shape
        ctx.free(*d)
    a = [e for e in x if ctx.size(e) != 1]
    b = [e for e in out if ctx.size(e) != 1]
    if 0 in map(ctx.size, a) or math.prod(map(ctx.size, a)) != math.prod(map(ctx.size, b)):
        return
    ctx.free(*[e for e in x + out if ctx.size(e) == 1])
    i = j = 0
    while i < len(a) and j < len(b):
        run_a, run_b = [a[i]], [b[j]]
        while math.prod(map(ctx.size, run_a)) != math.prod(map(ctx.size, run_b)):
            if math.prod(map(ctx.size, run_a)) < math.prod(map(ctx.size, run_b)):
                i += 1
                run_a.append(a[i])
            else:
                j += 1
                run_b.append(b[j])
        i, j = i + 1, j + 1
        if len(run_a) == 1 and len(run_b) == 1:
            ctx.join(run_a[0], run_b[0])
        elif len(run_b) == 1:
            ctx.block(run_b[0], run_a[0], math.prod(map(ctx.size, run_a[1:])))
            for e in run_a[1:]:
                ctx.pin(e, "inner axis of a flatten")
        elif len(run_a) == 1:
            ctx.block(run_a[0], run_b[0], math.prod(map(ctx.size, run_b[1:])))
            for e in run_b[1:]:
                ctx.pin(e, "inner axis of a split")
        else:
            for e in run_a + run_b:
                ctx.pin(e, "reshaped across axes")


def reorder(ctx: OpContext) -> None:
    """permute/transpose/movedim/.T: found by running the op on a meta tensor whose strides name its axes."""
    x, out = ctx.darg(0, "input"), ctx.out
    if x is None or not isinstance(out, Dims) or len(x) != len(out):
        return
    probe = torch.empty((2,) * len(x), device="meta")
    moved = ctx.rerun(probe) if ctx.node.target is not builtins.getattr else getattr(probe, ctx.args[1])
    source = {s: i for i, s in enumerate(probe.stride())}
    for o, s in zip(out, moved.stride()):
        ctx.join_if_same(x[source[s]], o)


def expand(ctx: OpContext) -> None:
    x, out = ctx.darg(0, "input"), ctx.out
    if x is None or not isinstance(out, Dims) or len(x) > len(out):
        return
    for d in dims_in((ctx.dargs[1:], ctx.dkwargs)):  # expand_as(y): y gives only a shape
        ctx.free(*d)
    for e, o in zip(x, out[len(out) - len(x):]):
        ctx.join_if_same(e, o)  # a size-1 axis expanded to n stays pinned on the output


def index(ctx: OpContext) -> None:
    """x[...] with ints, full or partial slices, None and Ellipsis; tensor indices pin everything."""
    x, out, idx = ctx.darg(0, "a"), ctx.out, ctx.args[1]
    if x is None or not isinstance(out, Dims):
        return
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool) for i in idx):
        return
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:at] + (slice(None),) * (len(x) - used) + idx[at + 1:]
    idx = idx + (slice(None),) * (len(x) - sum(1 for i in idx if i is not None))
    a = o = 0
    for i in idx:
        if i is None:
            o += 1
        elif isinstance(i, int):
            ctx.pin(x[a], "indexed at one position")
            a += 1
        else:
            if i.indices(ctx.size(x[a])) == (0, ctx.size(x[a]), 1):
                ctx.join(x[a], out[o])
            else:
                ctx.pin(x[a], "sliced")
                ctx.pin(out[o], "sliced")
            a, o = a + 1, o + 1


def concatenate(ctx: OpContext) -> None:
    """torch.cat: other axes are shared; the concatenated axis is pinned (offsets are not supported)."""
    xs = ctx.dargs[0] if ctx.dargs else ctx.dkwargs.get("tensors")
    out, dim = ctx.out, ctx.arg(1, "dim", 0)
    if not isinstance(out, Dims) or not isinstance(xs, (list, tuple)) or not all(
            isinstance(x, Dims) and len(x) == len(out) for x in xs) or not isinstance(dim, int):
        return
    dim %= len(out)
    for x in xs:
        for i, (e, o) in enumerate(zip(x, out)):
            if i != dim:
                ctx.join_if_same(e, o)
            elif len(xs) == 1:
                ctx.join(e, o)
            else:
                ctx.pin(e, "concatenated along this axis (torch.cat)")
                ctx.pin(o, "concatenated along this axis (torch.cat)")


def stack(ctx: OpContext) -> None:
    """torch.stack: the new axis (one slot per input) is pinned; the others are shared."""
    xs = ctx.dargs[0] if ctx.dargs else ctx.dkwargs.get("tensors")
    out, dim = ctx.out, ctx.arg(1, "dim", 0)
    if not isinstance(out, Dims) or not isinstance(xs, (list, tuple)) or not all(
            isinstance(x, Dims) and len(x) + 1 == len(out) for x in xs) or not isinstance(dim, int):
        return
    dim %= len(out)
    for x in xs:
        for e, o in zip(x, out[:dim] + out[dim + 1:]):
            ctx.join_if_same(e, o)


def split(ctx: OpContext) -> None:
    """chunk/split (pieces keep the axis) and unbind (pieces lose it): the split axis is pinned."""
    x, pieces = ctx.darg(0, "input"), ctx.out
    unbind = ctx.node.target in ("unbind", torch.unbind)
    dim = ctx.arg(1 if unbind else 2, "dim", 0)
    if x is None or not isinstance(pieces, (tuple, list)) or not isinstance(dim, int) or not x:
        return
    dim %= len(x)
    ctx.pin(x[dim], "split along this axis")
    rest = x[:dim] + x[dim + 1:]
    for piece in pieces:
        if not isinstance(piece, Dims) or len(piece) != len(x) - unbind:
            continue
        if not unbind:
            ctx.pin(piece[dim], "split along this axis")
        for e, p in zip(rest, piece[:dim] + piece[dim + (not unbind):]):
            ctx.join_if_same(e, p)


def matmul(ctx: OpContext) -> None:
    """a @ b: the contracted axes share a permutation (the sum does not depend on its order)."""
    a, b, out = ctx.darg(0, "input"), ctx.darg(1, "other") or ctx.darg(1, "mat2"), ctx.out
    if a is None or b is None or not isinstance(out, Dims) or min(len(a), len(b)) < 2 or len(out) < 2:
        return
    ctx.join(a[-1], b[-2])
    ctx.join_if_same(a[-2], out[-2])
    ctx.join_if_same(b[-1], out[-1])
    batch_axes(ctx, (a, b), out)


def attention(ctx: OpContext) -> None:
    """F.scaled_dot_product_attention: q·k contract over the feature axis; keys and values share their
    position axis; queries' positions carry over unless a mask ties them to an order."""
    q, k, v, out = ctx.darg(0, "query"), ctx.darg(1, "key"), ctx.darg(2, "value"), ctx.out
    mask = ctx.darg(3, "attn_mask")  # broadcast against the scores [..., L, S]
    if q is None or k is None or v is None or not isinstance(out, Dims) or min(len(q), len(k), len(v)) < 2 \
            or (ctx.arg(3, "attn_mask") is not None and (mask is None or len(mask) < 2)):
        return
    ctx.join(q[-1], k[-1])
    ctx.join_if_same(v[-1], out[-1])
    if not ctx.arg(5, "is_causal", False):  # a causal mask ties positions to their order
        ctx.join_if_same(q[-2], out[-2])
        ctx.join_if_same(k[-2], v[-2])
    if mask is not None:
        ctx.join_if_same(mask[-2], q[-2])
        ctx.join_if_same(mask[-1], k[-2])
    batch_axes(ctx, (q, k, v) + ((mask,) if mask is not None else ()), out)


def batch_axes(ctx: OpContext, operands: tuple[Dims, ...], out: Dims) -> None:
    """The leading (batch) axes of matrix operands broadcast against the output's."""
    for x in operands:
        for e, o in zip(x[:-2], out[max(0, len(out) - len(x)):-2]):
            ctx.join_if_same(e, o)
