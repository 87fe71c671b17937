"""Curves: the logits of every θ(λ) on every split, evaluated once and kept in `logits.safetensors`.

Curves evaluate every θ(λ) exactly once per split (test, a fixed training subset, and the calibration
split when calibrating), and keep every logits tensor, so calibration and any re-analysis need no new
forward pass. θ(0) is the same model for every B (it depends only on A and the norm fix), so its logits
are computed once and shared between the curves.

logits.safetensors: `lambdas` [P]; `targets/<split>` [N]; `logits/<i>/<split>` [P, N, classes] float32
for the i-th label (names in the `lmcx` metadata: labels, splits, convention).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import progress
from ..data import Dataset
from ..errors import LmcxError
from ..io import shorten
from ..train import predict
from .norm_fix import model_norm, norm_fix_inputs, resolve_norm_fix
from .path import LAMBDA_CONVENTION, Interpolator
from .repair import endpoint_stats

LOGITS_FILE = "logits.safetensors"
CURVE_SPLITS = ("test", "train")  # barriers are reported on these; `calib` only feeds calibration


@dataclass
class Curves:
    """Logits of θ(λ) for every label, split and λ, with the split's labels: all any analysis needs."""

    lambdas: list[float]
    labels: list[str]
    targets: dict[str, torch.Tensor]  # split -> [N] int64
    logits: dict[str, dict[str, torch.Tensor]]  # label -> split -> [P, N, classes] float32, CPU
    timing: dict[str, float] = field(default_factory=dict)

    def splits(self, label: str) -> list[str]:
        return list(self.logits[label])


def evaluate_curves(model_a: nn.Module, models_b: dict[str, nn.Module], ds: Dataset, lambdas: Sequence[float],
                    norm_fix: str, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                    norm_fix_batches: int = 10, norm_fix_batch_size: int = 500, eval_batch_size: int = 2000,
                    precision: str = "fp32") -> Curves:
    """Evaluate θ(λ) of A with each B (label -> model) on `splits` (name -> uint8 images, labels): one
    forward pass per (label, λ, split), plus the norm fix's passes; θ(0) is evaluated once for all B."""
    lambdas = [float(x) for x in lambdas]
    norm_fix = resolve_norm_fix(norm_fix, model_norm(model_a))
    inputs = norm_fix_inputs(ds, norm_fix_batches, norm_fix_batch_size) if norm_fix != "none" else []
    started = time.perf_counter()
    logits: dict[str, dict[str, torch.Tensor]] = {}
    forward_seconds = 0.0
    shared_a: dict[str, torch.Tensor] | None = None  # θ(0) logits, identical for every B
    with progress.task("interpolate", total=len(models_b) * len(lambdas), unit="λ") as bar:
        stats_a = None
        if norm_fix == "repair":  # A's statistics once, shared by every pair
            bar.update(stage="REPAIR statistics")
            stats_a = endpoint_stats(model_a, inputs)
        norm_fix_seconds = time.perf_counter() - started
        for label, model_b in models_b.items():
            bar.update(curve=label)
            t0 = time.perf_counter()
            interp = Interpolator(model_a, model_b, inputs, norm_fix, stats_a)  # B's REPAIR statistics, once
            norm_fix_seconds += time.perf_counter() - t0
            per_split: dict[str, list[torch.Tensor]] = {s: [] for s in splits}
            for lam in lambdas:
                if lam == 0.0 and shared_a is not None:
                    for s in splits:
                        per_split[s].append(shared_a[s])
                    bar.advance(1)
                    continue
                bar.update(λ=f"{lam:.3f}", stage=f"norm fix ({norm_fix})" if norm_fix != "none" else "evaluate")
                model = interp.at(lam)
                bar.update(stage="evaluate")
                t0 = time.perf_counter()
                out = {s: predict(model, ds, x, eval_batch_size, precision).cpu() for s, (x, _) in splits.items()}
                forward_seconds += time.perf_counter() - t0
                if lam == 0.0:
                    shared_a = out
                for s in splits:
                    per_split[s].append(out[s])
                bar.advance(1)
            norm_fix_seconds += interp.norm_fix_seconds
            logits[label] = {s: torch.stack(v) for s, v in per_split.items()}
    timing = {"seconds": time.perf_counter() - started, "forward_seconds": forward_seconds,
              "norm_fix_seconds": norm_fix_seconds}
    return Curves(lambdas, list(models_b), {s: y.cpu() for s, (_, y) in splits.items()}, logits, timing)


def save_curves(path: str | Path, curves: Curves, info: dict[str, Any] | None = None) -> None:
    from ..checkpoint import write_tensors

    tensors = {"lambdas": torch.tensor(curves.lambdas, dtype=torch.float64)}
    for split, y in curves.targets.items():
        tensors[f"targets/{split}"] = y.contiguous()
    for i, label in enumerate(curves.labels):
        for split, z in curves.logits[label].items():
            tensors[f"logits/{i}/{split}"] = z.contiguous()
    write_tensors(path, tensors, {"labels": curves.labels, "splits": sorted(curves.targets),
                                  "lambda_convention": LAMBDA_CONVENTION, **(info or {})})


def load_curves(path: str | Path) -> Curves:
    """The cache `save_curves` wrote, checked to fit together (a cache is data: labels, λ grid, targets and
    logits that do not fit would give a wrong barrier or a traceback)."""
    from safetensors import SafetensorError

    from ..checkpoint import read_tensors

    path = Path(path)
    if not path.is_file():
        raise LmcxError(f"{path} does not exist; run `lmcx interpolate` into {path.parent} first")
    try:
        tensors, meta = read_tensors(path)
        return _checked_curves(tensors, meta)
    except (SafetensorError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise LmcxError(f"{path} is not a readable logits cache ({shorten(str(e))}); re-run "
                        "`lmcx interpolate --force`") from None


def _checked_curves(tensors: dict[str, torch.Tensor], meta: Any) -> Curves:
    """Curves from a cache's tensors and metadata, or ValueError naming what does not fit."""
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)
            and len(set(labels)) == len(labels)):
        raise ValueError("its metadata has no list of distinct labels")
    lambdas = tensors.pop("lambdas", None)
    if lambdas is None or not lambdas.is_floating_point() or lambdas.ndim != 1 or len(lambdas) < 2:
        raise ValueError("no λ grid of two or more floating-point values")
    grid = lambdas.double()
    if not (torch.isfinite(grid).all() and grid[0] == 0 and grid[-1] == 1 and (grid[1:] > grid[:-1]).all()):
        raise ValueError(f"its λ grid {shorten(grid.tolist())} is not increasing from 0 to 1")
    targets: dict[str, torch.Tensor] = {}
    logits: dict[str, dict[str, torch.Tensor]] = {label: {} for label in labels}
    for name, t in tensors.items():
        kind, _, rest = name.partition("/")
        index, _, split = rest.partition("/")
        if kind == "targets" and rest and "/" not in rest:
            targets[rest] = t
        elif kind == "logits" and index.isdigit() and int(index) < len(labels) and split and "/" not in split:
            logits[labels[int(index)]][split] = t
        else:
            raise ValueError(f"unexpected tensor {shorten(name)}")
    classes = {z.shape[-1] for per_split in logits.values() for z in per_split.values()}
    for split, y in targets.items():
        if y.dtype not in (torch.int64, torch.int32) or y.ndim != 1 or len(y) == 0:
            raise ValueError(f"targets/{split} is not a non-empty list of integer class ids")
    for label, per_split in logits.items():
        if set(per_split) != set(targets) - ({"calib"} - set(per_split)) or not set(CURVE_SPLITS) <= set(per_split):
            raise ValueError(f"label {shorten(label)} has the splits {sorted(per_split)}, not {sorted(targets)}")
        for split, z in per_split.items():
            shape = (len(grid), len(targets[split]), *classes)
            if not z.is_floating_point() or len(classes) != 1 or tuple(z.shape) != shape or shape[-1] < 2:
                raise ValueError(f"logits of {shorten(label)} on {split} have shape {list(z.shape)}, not "
                                 f"[{len(grid)} λ, {len(targets[split])} examples, classes]")
    (n_classes,) = classes
    for split, y in targets.items():
        if int(y.min()) < 0 or int(y.max()) >= n_classes:
            raise ValueError(f"targets/{split} holds class ids outside [0, {n_classes})")
    return Curves(lambdas.tolist(), labels, {s: y.long() for s, y in targets.items()}, logits)
