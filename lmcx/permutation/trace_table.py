"""Which handler (trace_ops.py, trace_layers.py) follows which module, function or tensor method.

Module types listed here are leaves of the trace (their forward is not traced into), as long as a
subclass does not override what their forward does; any other torch.nn module is a leaf too (fx's
default) and, having no handler, pins every axis it touches. User modules are traced through.
"""
from __future__ import annotations

import builtins
import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import trace_layers as layers
from . import trace_ops as ops
from .trace_ops import OpContext

Handler = Callable[[OpContext], None]


def _named(owner, names: str) -> list:
    """The attributes of `owner` that exist, from a space-separated list (some are newer than others)."""
    return [getattr(owner, n) for n in names.split() if hasattr(owner, n)]


ACTIVATIONS = tuple(_named(nn, "ReLU ReLU6 GELU SiLU Hardswish Hardsigmoid Sigmoid Tanh LeakyReLU ELU SELU CELU "
                               "Mish Softplus Softsign Hardtanh LogSigmoid Tanhshrink Softshrink Hardshrink PReLU"))
_POINTWISE_MODULES = ACTIVATIONS + tuple(_named(nn, "Identity Dropout Dropout1d Dropout2d Dropout3d AlphaDropout "
                                                    "FeatureAlphaDropout Softmax LogSoftmax Softmin Softmax2d"))


def _params(c: OpContext, *names: str) -> list:
    return [c.params.get(n) for n in names]


def _x(c: OpContext):
    return c.darg(0, "input")


def _instance_norm(c: OpContext, m: nn.Module) -> None:
    x = _x(c)
    spatial = next(n for t, n in ((nn.InstanceNorm1d, 1), (nn.InstanceNorm2d, 2), (nn.InstanceNorm3d, 3))
                   if isinstance(m, t))
    if x is not None:
        layers.channel_norm(c, x, len(x) - spatial - 1, _params(c, "weight", "bias", "running_mean", "running_var"))


_MODULES: list[tuple[tuple[type, ...], Callable[[OpContext, nn.Module], None]]] = [
    ((nn.Linear,), lambda c, m: layers.linear(c, _x(c), *_params(c, "weight", "bias"))),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), lambda c, m: layers.conv(c, _x(c), *_params(c, "weight", "bias"), m.groups, False)),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
     lambda c, m: layers.conv(c, _x(c), *_params(c, "weight", "bias"), m.groups, True)),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
     lambda c, m: layers.channel_norm(c, _x(c), 1, _params(c, "weight", "bias", "running_mean", "running_var"))),
    ((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _instance_norm),
    ((nn.LayerNorm, *_named(nn, "RMSNorm")),
     lambda c, m: layers.layer_norm(c, _x(c), len(m.normalized_shape), _params(c, "weight", "bias"))),
    ((nn.GroupNorm,), lambda c, m: layers.group_norm(c, _x(c), m.num_groups, _params(c, "weight", "bias"))),
    ((nn.MultiheadAttention,), lambda c, m: layers.multihead_attention(c, m)),
    ((nn.Embedding,), lambda c, m: layers.embedding(c, _x(c), c.params.get("weight"))),
    ((nn.PReLU,), lambda c, m: layers.prelu(c, _x(c), c.params.get("weight"))),
    (_POINTWISE_MODULES, lambda c, m: ops.elementwise(c)),
    ((nn.Flatten, nn.Unflatten), lambda c, m: ops.reshape(c)),
    ((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d),
     lambda c, m: layers.spatial(1)(c)),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d),
     lambda c, m: layers.spatial(2)(c)),
    ((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), lambda c, m: layers.spatial(3)(c)),
    ((nn.Upsample,), lambda c, m: layers.spatial(None)(c)),
]


def _module_entry(m: nn.Module):
    """(handled base type, handler) for `m`, unless a subclass changes what the base's forward does."""
    for types, handler in _MODULES:
        for base in types:
            if isinstance(m, base) and all(getattr(type(m), a, None) is getattr(base, a, None)
                                           for a in ("forward", "_conv_forward")):
                return base, handler
    return None


def is_handled_leaf(m: nn.Module) -> bool:
    return _module_entry(m) is not None


def module_handler(m: nn.Module) -> Handler | None:
    entry = _module_entry(m)
    return None if entry is None else (lambda c: entry[1](c, m))


def _conv_fn(transposed: bool) -> Handler:
    return lambda c: layers.conv(c, _x(c), c.darg(1, "weight"), c.darg(2, "bias"), c.arg(6, "groups", 1), transposed)


def _shape_arg(shape) -> int:
    return 1 if isinstance(shape, int) else len(shape)


_FUNCTIONS: dict[object, Handler] = {}
for _group, _handler in [
    (_named(F, "relu relu_ relu6 gelu silu hardswish hardsigmoid sigmoid tanh leaky_relu leaky_relu_ elu elu_ "
               "selu celu mish softplus softsign hardtanh hardtanh_ logsigmoid tanhshrink dropout dropout1d "
               "dropout2d dropout3d alpha_dropout feature_alpha_dropout softmax log_softmax softmin normalize")
     + _named(torch, "relu relu_ sigmoid tanh exp neg abs sqrt rsqrt square erf clamp clip softmax log_softmax "
                     "dropout") + [operator.neg], ops.elementwise),
    ([operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.eq, operator.ne,
      operator.lt, operator.le, operator.gt, operator.ge]
     + _named(torch, "add sub mul div true_divide maximum minimum where pow rsub eq ne lt le gt ge"), ops.broadcast),
    (_named(torch, "mean sum amax amin var std logsumexp nansum nanmean"), ops.reduce),
    ([torch.norm, torch.linalg.vector_norm], lambda c: ops.reduce(c, dim_at=2)),
    (_named(torch, "flatten reshape squeeze unsqueeze unflatten"), ops.reshape),
    (_named(torch, "permute transpose swapaxes swapdims movedim moveaxis t"), ops.reorder),
    (_named(torch, "broadcast_to"), ops.expand),
    (_named(torch, "cat concat concatenate"), ops.concatenate),
    (_named(torch, "stack"), ops.stack),
    (_named(torch, "chunk split unbind"), ops.split),
    (_named(torch, "matmul bmm mm") + [operator.matmul], ops.matmul),
    (_named(F, "max_pool1d avg_pool1d adaptive_avg_pool1d adaptive_max_pool1d lp_pool1d")
     + _named(torch, "max_pool1d avg_pool1d adaptive_avg_pool1d adaptive_max_pool1d"), layers.spatial(1)),
    (_named(F, "max_pool2d avg_pool2d adaptive_avg_pool2d adaptive_max_pool2d lp_pool2d")
     + _named(torch, "max_pool2d"), layers.spatial(2)),
    (_named(F, "max_pool3d avg_pool3d adaptive_avg_pool3d adaptive_max_pool3d") + _named(torch, "max_pool3d"),
     layers.spatial(3)),
    (_named(F, "interpolate upsample"), layers.spatial(None)),
    (_named(F, "scaled_dot_product_attention"), ops.attention),
    ([operator.getitem], ops.index),
    ([builtins.getattr], ops.attribute),
    (_named(F, "conv1d conv2d conv3d") + _named(torch, "conv1d conv2d conv3d"), _conv_fn(False)),
    (_named(F, "conv_transpose1d conv_transpose2d conv_transpose3d"), _conv_fn(True)),
    ([F.linear], lambda c: layers.linear(c, _x(c), c.darg(1, "weight"), c.darg(2, "bias"))),
    ([F.batch_norm, F.instance_norm], lambda c: layers.channel_norm(c, _x(c), 1, [
        c.darg(1, "running_mean"), c.darg(2, "running_var"), c.darg(3, "weight"), c.darg(4, "bias")])),
    ([F.layer_norm], lambda c: layers.layer_norm(c, _x(c), _shape_arg(c.arg(1, "normalized_shape")),
                                                 [c.darg(2, "weight"), c.darg(3, "bias")])),
    (_named(F, "rms_norm"), lambda c: layers.layer_norm(c, _x(c), _shape_arg(c.arg(1, "normalized_shape")),
                                                        [c.darg(2, "weight")])),
    ([F.group_norm], lambda c: layers.group_norm(c, _x(c), c.arg(1, "num_groups"),
                                                 [c.darg(2, "weight"), c.darg(3, "bias")])),
    ([F.embedding], lambda c: layers.embedding(c, _x(c), c.darg(1, "weight"))),
    ([F.prelu], lambda c: layers.prelu(c, _x(c), c.darg(1, "weight"))),
]:
    _FUNCTIONS.update(dict.fromkeys(_group, _handler))

_METHODS: dict[str, Handler] = {}
for _names, _handler in [
    ("relu relu_ sigmoid sigmoid_ tanh tanh_ exp neg abs sqrt rsqrt square clamp clamp_ clip softmax log_softmax",
     ops.elementwise),
    ("to type_as float double half bfloat16 contiguous clone detach cpu cuda", ops.cast),
    ("add add_ sub sub_ mul mul_ div div_ pow maximum minimum masked_fill masked_fill_ where", ops.broadcast),
    ("mean sum amax amin var std logsumexp", ops.reduce),
    ("norm", lambda c: ops.reduce(c, dim_at=2)),
    ("view reshape flatten unflatten squeeze unsqueeze squeeze_ unsqueeze_ view_as reshape_as", ops.reshape),
    ("permute transpose swapaxes swapdims movedim moveaxis t", ops.reorder),
    ("expand expand_as broadcast_to", ops.expand),
    ("chunk split unbind", ops.split),
    ("matmul bmm mm __matmul__", ops.matmul),
    ("size dim numel nelement ndimension get_device", ops.shape_only),
]:
    _METHODS.update(dict.fromkeys(_names.split(), _handler))


def function_handler(fn: object) -> Handler | None:
    if (getattr(fn, "__module__", None), getattr(fn, "__name__", None)) == (
            "torchvision.ops.stochastic_depth", "stochastic_depth"):
        return ops.elementwise  # one random keep/drop per sample (or batch): the same for every channel
    try:
        return _FUNCTIONS.get(fn)
    except TypeError:  # an unhashable callable
        return None


def method_handler(name: str) -> Handler | None:
    return _METHODS.get(name)


def describe(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(module).__name__})"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    return f"function {getattr(node.target, '__module__', '') or ''}.{getattr(node.target, '__name__', node.target)}"
