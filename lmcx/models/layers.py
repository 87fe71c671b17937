"""Building blocks shared by the models: He-initialised convs, the norm choice, and the permutation
axes of a norm layer."""
from __future__ import annotations

from torch import nn


class HeConv2d(nn.Conv2d):
    """Conv2d initialised with He (kaiming normal, fan-in) weights and zero bias. He init keeps the
    activation scale constant through 13 ReLU convs, so deep models without normalisation still
    train (PyTorch's default init shrinks it at every layer). Overriding reset_parameters, rather
    than re-initialising afterwards, also saves running the default init at large widths."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def norm2d(norm: str, channels: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "ln":
        # One group = normalise over (C, H, W) like LayerNorm, but with a per-channel affine, so
        # permuting channels permutes the affine parameters and nothing else (LayerNorm([C, H, W])
        # would tie the affine to pixel positions and to the image size).
        return nn.GroupNorm(1, channels)
    return nn.Identity()  # keeps module names the same for every norm choice; holds no state


def norm_axes(prefix: str, norm: str, perm: str) -> dict[str, tuple[str | None, ...]]:
    """Every parameter and buffer of a norm layer is per-unit (channel); num_batches_tracked is not."""
    names = {"bn": ["weight", "bias", "running_mean", "running_var"], "ln": ["weight", "bias"]}.get(norm, [])
    return {f"{prefix}.{n}": (perm,) for n in names}
