"""Building blocks shared by the models: He-initialised convs, the norm choice, and which norm a model
uses."""
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


def model_norm(model: nn.Module) -> str:
    """'bn', 'ln' (LayerNorm or GroupNorm) or 'none', from the model's modules."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "bn"
    if any(isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for m in model.modules()):
        return "ln"
    return "none"
