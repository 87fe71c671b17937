"""The hand-written permutation specs of the built-in architectures, kept as the reference the traced
specs are tested against (test_trace.py). lmcx itself traces every spec (lmcx/models/specs.py); these
are what the specs looked like when each architecture was described by hand, with the permutation
names that permutation files store.
"""
from __future__ import annotations

from lmcx.config import ModelConfig
from lmcx.models import mlp, resnet, vgg
from lmcx.permutation.spec import PermutationSpec, permutation_spec_from_axes


def norm_axes(prefix: str, norm: str, perm: str) -> dict[str, tuple[str | None, ...]]:
    """Every parameter and buffer of a norm layer is per-unit (channel); num_batches_tracked is not."""
    names = {"bn": ["weight", "bias", "running_mean", "running_var"], "ln": ["weight", "bias"]}.get(norm, [])
    return {f"{prefix}.{n}": (perm,) for n in names}


def mlp_spec(cfg: ModelConfig) -> PermutationSpec:
    axes: dict[str, tuple[str | None, ...]] = {}
    activations: dict[str, list[str]] = {}
    prev = None  # the input pixels are never permuted
    for i in range(mlp.DEPTH):
        p = f"layers.{i}"
        # Linear weight is [out, in]: rows are this layer's units, columns the previous layer's.
        axes[f"layers.{i}.linear.weight"] = (p, prev)
        if cfg.bias:
            axes[f"layers.{i}.linear.bias"] = (p,)
        axes.update(norm_axes(f"layers.{i}.norm", cfg.norm, p))
        activations[p] = [f"layers.{i}.relu"]
        prev = p
    axes["classifier.weight"] = (None, prev)  # output units (classes) are never permuted
    if cfg.bias:
        axes["classifier.bias"] = (None,)
    return permutation_spec_from_axes(axes, activations)


def vgg_spec(cfg: ModelConfig) -> PermutationSpec:
    axes: dict[str, tuple[str | None, ...]] = {}
    activations: dict[str, list[str]] = {}
    prev = None  # input channels are never permuted
    for i in range(len(vgg._convs(cfg))):
        p = f"features.{i}"
        # Conv weight is [out, in, kh, kw]; pooling keeps channels, so the next conv reads p.
        axes[f"features.{i}.conv.weight"] = (p, prev, None, None)
        if cfg.bias:
            axes[f"features.{i}.conv.bias"] = (p,)
        axes.update(norm_axes(f"features.{i}.norm", cfg.norm, p))
        activations[p] = [f"features.{i}.relu"]
        prev = p
    axes["classifier.weight"] = (None, prev)  # after the 1x1 average pool, features = channels
    if cfg.bias:
        axes["classifier.bias"] = (None,)
    return permutation_spec_from_axes(axes, activations)


def resnet20_spec(cfg: ModelConfig) -> PermutationSpec:
    """`stream.0` = stem output and every block output of stage 0; `stream.{s}` (s = 1, 2) starts at stage
    s's shortcut conv and is shared by that stage's blocks; `stages.{s}.{b}.conv1` = block (s, b)'s hidden
    channels."""
    axes: dict[str, tuple[str | None, ...]] = {}
    activations: dict[str, list[str]] = {}

    def conv(name: str, p_out: str | None, p_in: str | None) -> None:
        """Conv `name`: weight [out, in, kh, kw] and bias [out]."""
        axes[f"{name}.weight"] = (p_out, p_in, None, None)
        if cfg.bias:
            axes[f"{name}.bias"] = (p_out,)

    def norm(name: str, p: str) -> None:
        axes.update(norm_axes(name, cfg.norm, p))

    stream = "stream.0"
    conv("stem.conv", stream, None)
    norm("stem.norm", stream)
    activations[stream] = ["stem.relu"]
    for s in range(len(resnet.STAGE_CHANNELS)):
        for b in range(resnet.BLOCKS_PER_STAGE):
            block = f"stages.{s}.{b}"
            stream_in = stream
            if resnet._has_shortcut_conv(s, b):
                # The shortcut conv maps the old stream into a new one, which this stage then shares.
                stream = f"stream.{s}"
                conv(f"{block}.shortcut.conv", stream, stream_in)
                norm(f"{block}.shortcut.norm", stream)
            inner = f"{block}.conv1"
            conv(f"{block}.conv1", inner, stream_in)
            norm(f"{block}.norm1", inner)
            conv(f"{block}.conv2", stream, inner)  # conv2's output is added into the stream
            norm(f"{block}.norm2", stream)
            activations[inner] = [f"{block}.relu1"]
            activations.setdefault(stream, []).append(f"{block}.relu2")
    axes["classifier.weight"] = (None, stream)  # output units (classes) are never permuted
    if cfg.bias:
        axes["classifier.bias"] = (None,)
    return permutation_spec_from_axes(axes, activations)


def reference_spec(cfg: ModelConfig) -> PermutationSpec:
    return {"mlp": mlp_spec, "vgg11": vgg_spec, "vgg16": vgg_spec, "resnet20": resnet20_spec}[cfg.arch](cfg)
