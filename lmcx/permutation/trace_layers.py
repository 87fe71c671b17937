"""What layers with parameters do to channel axes, for the spec tracer: Linear, convolutions, norms,
attention, embeddings (and pooling, which keeps channels). See trace_ops.py for the conventions."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .trace_ops import Dims, OpContext


def linear(ctx: OpContext, x: Dims | None, w: Dims | None, b: Dims | None) -> None:
    out = ctx.out
    if not (isinstance(out, Dims) and x and w and len(w) == 2 and len(x) == len(out)):
        return
    ctx.join(x[-1], w[1])
    ctx.join(out[-1], w[0])
    if b:
        ctx.join(b[0], w[0])
    for a, o in zip(x[:-1], out[:-1]):
        ctx.join_if_same(a, o)


def conv(ctx: OpContext, x: Dims | None, w: Dims | None, b: Dims | None, groups: int, transposed: bool) -> None:
    out = ctx.out
    if not (isinstance(out, Dims) and x and w) or len(x) != len(out) or len(x) not in (len(w) - 1, len(w)):
        return
    c = len(x) - (len(w) - 2) - 1  # channel axis: 1 when batched, 0 when not
    if c == 1:
        ctx.join(x[0], out[0])
    for e in w[2:]:
        ctx.pin(e, "convolution kernel window")
    for e in x[c + 1:] + out[c + 1:]:
        ctx.pin(e, "spatial position")
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    if groups == 1:
        ctx.join(x[c], w_in)
        ctx.join(out[c], w_out)
    elif not transposed and groups == ctx.size(x[c]) == ctx.size(out[c]):  # depthwise: one filter per channel
        ctx.join(x[c], out[c])
        ctx.join(out[c], w[0])
        ctx.free(w[1])
    else:
        reason = f"grouped convolution ({groups} groups): a permutation would cross groups"
        for e in (x[c], out[c], w[0], w[1]):
            ctx.pin(e, reason)
    if b:
        ctx.join(b[0], w_out)


def channel_norm(ctx: OpContext, x: Dims | None, c: int, params: list[Dims | None]) -> None:
    """BatchNorm / InstanceNorm: per-channel statistics and affine on axis c; equivariant on every axis
    (batch statistics are means over the other axes, which no permutation changes)."""
    given = [p for p in params if p is not None]
    if x is None or not isinstance(ctx.out, Dims) or not 0 <= c < len(x) or any(len(p) != 1 for p in given) \
            or not ctx.join_all(x, ctx.out):
        return
    for p in given:
        ctx.join(p[0], x[c])


def layer_norm(ctx: OpContext, x: Dims | None, normalized: int, params: list[Dims | None]) -> None:
    """LayerNorm / RMSNorm over the last `normalized` axes: the statistics do not depend on unit order."""
    given = [p for p in params if p is not None]
    if x is None or not isinstance(ctx.out, Dims) or not 0 < normalized <= len(x) \
            or any(len(p) != normalized for p in given) or not ctx.join_all(x, ctx.out):
        return
    for p in given:
        for e, a in zip(p, x[len(x) - normalized:]):
            ctx.join(e, a)


def group_norm(ctx: OpContext, x: Dims | None, num_groups: int, params: list[Dims | None]) -> None:
    out = ctx.out
    if x is None or not isinstance(out, Dims) or len(x) < 2 or len(x) != len(out) or \
            any(p is not None and len(p) != 1 for p in params):
        return
    for i, (a, o) in enumerate(zip(x, out)):
        if i != 1:
            ctx.join_if_same(a, o)
    if num_groups in (1, ctx.size(x[1])):  # one group over all channels, or one channel per group
        channel_norm(ctx, x, 1, params)
        return
    reason = f"GroupNorm with {num_groups} groups: a permutation would cross groups"
    for e in [x[1], out[1]] + [p[0] for p in params if p is not None]:
        ctx.pin(e, reason)


def spatial(n_spatial: int | None) -> Callable[[OpContext], None]:
    """Pooling and resampling over the last n axes (None: all but batch and channel)."""
    def handler(ctx: OpContext) -> None:
        x, out = ctx.darg(0, "input"), ctx.out
        if x is None or not isinstance(out, Dims) or len(x) != len(out):
            return
        n = len(x) - 2 if n_spatial is None else n_spatial
        for a, o in zip(x[:len(x) - n], out):
            ctx.join_if_same(a, o)
        for e in x[len(x) - n:] + out[len(x) - n:]:
            ctx.pin(e, "spatial position")
    return handler


def multihead_attention(ctx: OpContext, mod: nn.MultiheadAttention) -> None:
    """Self- or cross-attention: the embedding axis of query, key and value is the input axis of
    in_proj_weight, the output's is out_proj's row axis. Heads are not permuted (pinned)."""
    q, k, v = (ctx.darg(i, name) for i, name in enumerate(("query", "key", "value")))
    out = ctx.out[0] if isinstance(ctx.out, tuple) and ctx.out and isinstance(ctx.out[0], Dims) else None
    p = ctx.params
    if not (q and k and v and out and mod._qkv_same_embed_dim and "in_proj_weight" in p):
        return
    for x in (q, k, v):
        ctx.join(x[-1], p["in_proj_weight"][1])
    ctx.join(out[-1], p["out_proj.weight"][0])
    if "out_proj.bias" in p:
        ctx.join(p["out_proj.bias"][0], out[-1])
    heads = [p["in_proj_weight"][0], p["out_proj.weight"][1]] + [e for n in ("in_proj_bias", "bias_k", "bias_v")
                                                                 for e in p.get(n, ())]
    for e in heads:
        ctx.pin(e, "attention heads (inside nn.MultiheadAttention)")


def embedding(ctx: OpContext, idx: Dims | None, w: Dims | None) -> None:
    out = ctx.out
    if idx is None or not w or not isinstance(out, Dims) or len(out) != len(idx) + 1:
        return
    ctx.join(out[-1], w[1])
    ctx.pin(w[0], "embedding rows (token ids)")
    for a, o in zip(idx, out):
        ctx.join_if_same(a, o)


def prelu(ctx: OpContext, x: Dims | None, w: Dims | None) -> None:
    """PReLU: one slope per channel (axis 1), or one shared slope."""
    if x is None or not w or len(w) != 1 or (ctx.size(w[0]) > 1 and len(x) < 2) or \
            not isinstance(ctx.out, Dims) or not ctx.join_all(x, ctx.out):
        return
    if ctx.size(w[0]) == 1:
        ctx.free(w[0])
    else:
        ctx.join(w[0], x[1])
