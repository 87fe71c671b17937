"""The norm fixes applied to θ(λ) at every λ of a curve, and `reset`, the BatchNorm one.

Each fix is applied at every λ, endpoints included, so that the whole curve, and the endpoint losses the
barrier is measured against, come from one procedure:

- `none`: the interpolated model as is (BatchNorm running statistics interpolated like weights).
- `reset`: BatchNorm running statistics of θ(λ) recomputed on `batches` fixed training batches
  (cumulative average, `momentum=None`; BN layers in train mode, everything else in eval mode; no
  augmentation, no gradients). The default (`auto`) for BN models.
- `repair`: REPAIR (Jordan et al., ICLR 2023), in repair.py.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import progress
from ..data import Dataset
from ..errors import LmcxError
from ..models.layers import model_norm  # noqa: F401  (the interpolate modules import it from here)

NORM_FIXES = ("reset", "repair", "none")
NORM_FIX_SEED = 0  # the training batches used by reset / REPAIR: the same for every model and λ

NORM_FIX_NOTES = {
    "none": "interpolated weights and BatchNorm running statistics used as they are",
    "reset": "BatchNorm running statistics recomputed for every theta(lambda), endpoints included, on "
             "norm_fix_batches fixed training batches (cumulative average, no augmentation)",
    "repair": "REPAIR: every unit's activation mean and std in theta(lambda) matched to (1 - lambda) * stat_A + "
              "lambda * stat_B (endpoint statistics on the same fixed training batches), endpoints included",
}

BATCH_NORM = nn.modules.batchnorm._BatchNorm  # every BatchNorm{1,2,3}d


def check_norm_fix(setting: str, name: str = "norm_fix") -> None:
    """Refuse an unknown norm fix, naming the setting or flag (`name`) it came from."""
    if setting not in ("auto",) + NORM_FIXES:
        raise LmcxError(f"{name} {setting!r}: choose auto, reset, repair or none")


def resolve_norm_fix(setting: str, norm: str) -> str:
    """`auto` -> reset for BN models, none otherwise; an explicit choice is checked against `norm`."""
    check_norm_fix(setting)
    if setting == "auto":
        return "reset" if norm == "bn" else "none"
    if setting == "reset" and norm != "bn":
        raise LmcxError(f"norm_fix=reset recomputes BatchNorm statistics, but this model has norm {norm}; "
                        "use none" + (" or repair" if norm == "none" else ""))
    if setting == "repair" and norm == "ln":
        raise LmcxError("norm_fix=repair (REPAIR) is not defined for LayerNorm models (norm ln); use none")
    return setting



def norm_fix_inputs(ds: Dataset, batches: int, batch_size: int) -> list[torch.Tensor]:
    """`batches` fixed training batches (seeded order, no augmentation), normalised, on the device.
    A last batch of a single image is dropped (BatchNorm needs two to compute a variance)."""
    n = len(ds.y_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(NORM_FIX_SEED))[: batches * batch_size]
    order = order.to(ds.x_train.device)
    out = [ds.normalize(ds.x_train[order[s:s + batch_size]]) for s in range(0, len(order), batch_size)]
    out = [x for x in out if len(x) >= 2]
    if not out:
        raise LmcxError(f"the training split holds {n} image(s); the norm fix needs at least 2")
    return out


@torch.no_grad()
def reset_bn_stats(model: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Recompute every BatchNorm's running statistics on `inputs` (cumulative average, momentum=None);
    BN layers alone in train mode; the model is left in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORM)]
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in inputs:
            progress.tick()
            model(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()
