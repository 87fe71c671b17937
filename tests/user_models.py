"""Model factories of the kind a user names as `model.arch: module:callable` (tests/test_external.py).
Importable as `user_models` because pytest puts tests/ on the path."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """A custom module: squeeze-and-excitation gating with a learnt per-channel scale (layer scale)."""

    def __init__(self, channels: int):
        super().__init__()
        self.squeeze = nn.Linear(channels, max(2, channels // 2))
        self.excite = nn.Linear(max(2, channels // 2), channels)
        self.scale = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x):
        g = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3))))))
        return x * (self.scale * g)[:, :, None, None]


class SmallNet(nn.Module):
    """conv -> BN -> ReLU, a residual block with the gate, pool, hidden Linear, logits."""

    def __init__(self, in_shape, num_classes, width=1.0):
        super().__init__()
        c = max(2, round(8 * width))
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.gate = Gate(c)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(4 * c, 16)
        self.hidden_act = nn.ReLU()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.act(x + self.gate(self.bn(self.conv(x))))
        return self.head(self.hidden_act(self.hidden(torch.flatten(self.pool(x), 1))))


def small_net(in_shape, num_classes, width=1.0):
    return SmallNet(in_shape, num_classes, width)


def fixed_net(in_shape, num_classes):
    """No width parameter: model.width must stay 1."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], 12), nn.ReLU(),
                         nn.Linear(12, num_classes))


def wrong_output(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes + 1))


def not_a_model(in_shape, num_classes):
    return "a string"
