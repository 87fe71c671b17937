"""Linear interpolation between two models, loss and accuracy barriers, and the norm fixes.

Convention (one for all of lmcx): θ(λ) = (1 − λ) θ_A + λ θ_B, so λ = 0 is A and λ = 1 is B.

Norm fixes (`norm_fix`), applied to θ(λ) at every λ of a curve, endpoints included, so that the
whole curve, and the endpoint losses the barrier is measured against, come from one procedure:

- `none`: the interpolated model as is (BatchNorm running statistics interpolated like weights).
- `reset`: BatchNorm running statistics of θ(λ) recomputed on `batches` fixed training batches
  (cumulative average, `momentum=None`; BN layers in train mode, everything else in eval mode; no
  augmentation, no gradients). The default (`auto`) for BN models.
- `repair`: REPAIR (Jordan et al., ICLR 2023). Each unit's activation mean and std in θ(λ) are made to
  match `(1 − λ)·stat_A + λ·stat_B`, the interpolation of the endpoints' statistics, measured (once per
  model, not per λ) on the same training batches (in BN networks on the endpoints with their running
  statistics reset on those batches, as every θ(λ) is; see `endpoint_stats`). The repaired activations are the BN outputs in BN
  networks and the outputs of every Linear/Conv except the output layer in norm-free networks. As in
  Jordan et al.'s implementation, one pass over the batches corrects every layer at once: during it each
  repaired activation is standardised with its batch statistics and mapped to the target, so later
  layers see corrected inputs; the correction is then folded into the model:
    * BN networks: the BN affine parameters are set to the target (weight = sign(weight)·target std,
      bias = target mean), then the running statistics are reset under them (that pass *is* the
      measurement: a BN output in train mode has exactly mean = bias and std = |weight| per batch);
    * norm-free networks: the preceding Linear/Conv is rescaled per output unit and its bias shifted
      (W' = r·W, b' = r·b + (target mean − r·mean), r = target std / std); without biases only the
      scale can be corrected.
  Not defined for LayerNorm networks (their normalisation is per sample, not per unit): an error.

Curves evaluate every θ(λ) exactly once per split (test, a fixed training subset, and the calibration
split when calibrating), and keep every logits tensor in `logits.safetensors`, so calibration and any
re-analysis need no new forward pass. θ(0) is the same model for every B (it depends only on A and the
norm fix), so its logits are computed once and shared between the curves.

Outputs of `interpolate_checkpoints` (and `lmcx interpolate`) in the output directory:
  logits.safetensors  `lambdas` [P]; `targets/<split>` [N]; `logits/<i>/<split>` [P, N, classes] float32
                      for the i-th label (names in the `lmcx` metadata: labels, splits, convention)
  curve.csv           label, lambda, split, loss, accuracy (+ temperature, calibrated_loss once calibrated;
                      calibrated runs add the `calib` split's rows)
  curve.png           loss and accuracy against λ, test and train, one colour per label
  config.yaml         the resolved settings (written by the caller's run directory logic when present)
  barrier.json        written last (the completeness marker): settings actually used and, per label
                      and split, `raw` and `calibrated` barriers (see `barrier_metrics`)

barrier.json:
  lambda_convention, grid, norm_fix (applied), norm_fix_setting, norm_fix_batches, norm_fix_batch_size,
  norm_fix_note, splits {test, train, calib: sizes}, train_eval_size, calibration {calibrated, split, size,
  method, seconds}, checkpoints {a, b: [{label, path, permutation}]}, dataset, data_root, model, precision,
  eval_batch_size, settings (InterpolateConfig), device, timing, and
  results[label][split in test, train] = {"raw": {...}, "calibrated": {...} or null} with keys
    loss_barrier, loss_barrier_lambda, accuracy_barrier, accuracy_barrier_lambda, loss_a, loss_b,
    accuracy_a, accuracy_b, midpoint_loss, midpoint_accuracy, midpoint_loss_barrier,
    midpoint_accuracy_barrier (accuracies as fractions; calibration leaves accuracies unchanged), and in
    `calibrated` also loss_barrier_at_most_raw_everywhere (calibrated gap <= raw gap at every λ);
  results[label]["temperatures"] = T per λ once calibrated.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import InterpolateConfig, to_dict, validate
from .console import progress_bar
from .data import Dataset
from .errors import LmcxError
from .io import read_json, write_csv, write_json, write_yaml
from .models import forward_hooks
from .train import loss_and_accuracy, predict

LAMBDA_CONVENTION = "theta(lambda) = (1 - lambda) * theta_A + lambda * theta_B; lambda = 0 is A"
NORM_FIXES = ("reset", "repair", "none")
NORM_FIX_SEED = 0  # the training batches used by reset / REPAIR: the same for every model and λ
BN_EPS = 1e-5
LOGITS_FILE = "logits.safetensors"
BARRIER_FILE = "barrier.json"
OUTPUTS = [BARRIER_FILE, "curve.csv", "curve.png", LOGITS_FILE]
CURVE_SPLITS = ("test", "train")  # barriers are reported on these; `calib` only feeds calibration

NORM_FIX_NOTES = {
    "none": "interpolated weights and BatchNorm running statistics used as they are",
    "reset": "BatchNorm running statistics recomputed for every theta(lambda), endpoints included, on "
             "norm_fix_batches fixed training batches (cumulative average, no augmentation)",
    "repair": "REPAIR: every unit's activation mean and std in theta(lambda) matched to (1 - lambda) * stat_A + "
              "lambda * stat_B (endpoint statistics on the same fixed training batches), endpoints included",
}

_BN = nn.modules.batchnorm._BatchNorm
_LN = (nn.LayerNorm, nn.GroupNorm)


# ---------------------------------------------------------------------------------------------
# Grid, state interpolation, norm detection


def lambda_grid(cfg: InterpolateConfig) -> list[float]:
    """cfg.lambdas (sorted, unique) or cfg.points evenly spaced values; 0, ½ and 1 always included."""
    validate(cfg)
    if cfg.lambdas is not None:
        values = [float(x) for x in cfg.lambdas]
    else:
        values = [i / (cfg.points - 1) for i in range(cfg.points)]
    return sorted(set(values) | {0.0, 0.5, 1.0})


def lerp_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """θ(λ) = (1 − λ) θ_A + λ θ_B for floating tensors; integer buffers (num_batches_tracked) from A.

    Computed as `a·(1 − λ) + b·λ`, so λ = 0 gives A and λ = 1 gives B bit for bit."""
    check_same_layout(a, b)
    out = {}
    for k, ta in a.items():
        tb = b[k]
        out[k] = ta * (1.0 - lam) + tb.to(ta.device) * lam if ta.is_floating_point() else ta.clone()
    return out


def check_same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same parameter names and shapes, or LmcxError."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise LmcxError(f"the two models have different parameters (e.g. {missing[0]!r}); "
                        "only models of one architecture can be interpolated")
    for k, ta in a.items():
        if ta.shape != b[k].shape:
            raise LmcxError(f"parameter {k!r} has shape {list(ta.shape)} in A but {list(b[k].shape)} in B; "
                            "only models of one architecture and width can be interpolated")


def model_norm(model: nn.Module) -> str:
    """'bn', 'ln' (LayerNorm or GroupNorm) or 'none', from the model's modules."""
    if any(isinstance(m, _BN) for m in model.modules()):
        return "bn"
    if any(isinstance(m, _LN) for m in model.modules()):
        return "ln"
    return "none"


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


# ---------------------------------------------------------------------------------------------
# Norm fixes


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
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in inputs:
            model(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()


def repair_points(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs REPAIR corrects: every BatchNorm (BN nets), or every Linear/Conv but
    the last one, the output layer (norm-free nets)."""
    norm = model_norm(model)
    if norm == "ln":
        raise LmcxError("norm_fix=repair (REPAIR) is not defined for LayerNorm models (norm ln); use none")
    if norm == "bn":
        points = [(n, m) for n, m in model.named_modules() if isinstance(m, _BN)]
        if any(m.weight is None for _, m in points):
            raise LmcxError("norm_fix=repair needs BatchNorm layers with affine parameters; use reset")
        return points
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    return layers[:-1]


@torch.no_grad()
def activation_stats(model: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor]
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and (population) std of the outputs of modules `names` of `model` in eval mode,
    over `inputs` (float64)."""
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n in names}

    def hook(name):
        def fn(_module, _inp, out):
            dims = [0] + list(range(2, out.ndim))
            y = out.detach().double()
            acc = sums[name]
            acc[0] = acc[0] + y.sum(dims)
            acc[1] = acc[1] + (y * y).sum(dims)
            acc[2] += out.numel() // out.shape[1]
        return fn

    was_training = model.training
    model.eval()
    with forward_hooks(model, {n: hook(n) for n in names}):
        for x in inputs:
            model(x)
    model.train(was_training)
    stats = {}
    for n, (s, s2, count) in sums.items():
        mean = s / count
        stats[n] = (mean, (s2 / count - mean * mean).clamp_min(0).sqrt())
    return stats


def endpoint_stats(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """REPAIR's statistics of an endpoint: per-unit mean and std at every repair point, measured in eval
    mode on `inputs`. For BN networks they are measured on a copy of the endpoint whose running statistics
    were reset on the same inputs, as every θ(λ) is: stale running averages left by training must not
    become REPAIR's target (and so, at λ = 0 and 1, REPAIR agrees with reset up to sampling noise)."""
    names = [n for n, _ in repair_points(model)]
    if model_norm(model) == "bn":
        model = copy.deepcopy(model)
        reset_bn_stats(model, inputs)
    return activation_stats(model, names, inputs)


@torch.no_grad()
def repair(model: nn.Module, inputs: Sequence[torch.Tensor], stats_a: dict, stats_b: dict, lam: float) -> None:
    """REPAIR θ(λ) in place (see the module docstring): targets (1 − λ)·stat_A + λ·stat_B."""
    points = repair_points(model)
    targets = {}
    for name, module in points:
        (ma, sa), (mb, sb) = stats_a[name], stats_b[name]
        dev, dt = module.weight.device, module.weight.dtype
        targets[name] = ((ma * (1.0 - lam) + mb * lam).to(dev, dt), (sa * (1.0 - lam) + sb * lam).to(dev, dt))
    if model_norm(model) == "bn":
        for name, bn in points:
            t_mean, t_std = targets[name]
            bn.weight.copy_(torch.where(bn.weight < 0, -t_std, t_std))
            bn.bias.copy_(t_mean)
        reset_bn_stats(model, inputs)
        return

    # Norm-free: one pass with every repaired output standardised by its batch statistics and mapped to
    # the target (exactly a BatchNorm in train mode with weight = target std and bias = target mean),
    # keeping the cumulative average of batch means and unbiased variances, like BN with momentum=None.
    running = {name: [torch.zeros_like(targets[name][0]), torch.ones_like(targets[name][0]), 0]
               for name, _ in points}

    def hook(name, has_bias):
        t_mean, t_std = targets[name]

        def fn(_module, _inp, out):
            r = running[name]
            r[2] += 1
            if has_bias:
                return F.batch_norm(out, r[0], r[1], t_std, t_mean, training=True, momentum=1.0 / r[2], eps=BN_EPS)
            # no bias to shift with: only the scale is corrected, so only the std is matched
            dims = [0] + list(range(2, out.ndim))
            var, mean = torch.var_mean(out, dim=dims, correction=1)
            r[0].mul_(1 - 1.0 / r[2]).add_(mean / r[2])
            r[1].mul_(1 - 1.0 / r[2]).add_(var / r[2])
            return out * (t_std / (var + BN_EPS).sqrt()).view((1, -1) + (1,) * (out.ndim - 2))
        return fn

    model.eval()
    with forward_hooks(model, {n: hook(n, m.bias is not None) for n, m in points}):
        for x in inputs:
            model(x)
    for name, module in points:  # fold: W' = r·W, b' = r·b + (target mean − r·mean), r = target std / std
        mean, var, _ = running[name]
        t_mean, t_std = targets[name]
        r = t_std / (var + BN_EPS).sqrt()
        module.weight.mul_(r.view((-1,) + (1,) * (module.weight.ndim - 1)))
        if module.bias is not None:
            module.bias.copy_(r * module.bias + (t_mean - r * mean))


class Interpolator:
    """θ(λ) of one pair (A, B) with a norm fix, reusing one model object for every λ.

    REPAIR's endpoint statistics are measured once here (pass `stats_a` to share A's between pairs)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, inputs: Sequence[torch.Tensor], norm_fix: str,
                 stats_a: dict | None = None):
        self.norm = model_norm(model_a)
        self.norm_fix = resolve_norm_fix(norm_fix, self.norm)
        if model_norm(model_b) != self.norm or type(model_a) is not type(model_b):
            raise LmcxError("models A and B are of different architectures; only models of one architecture "
                            "can be interpolated")
        self.state_a = {k: v.detach().clone() for k, v in model_a.state_dict().items()}
        state_b = model_b.state_dict()
        check_same_layout(self.state_a, state_b)
        self.state_b = {k: v.detach().to(self.state_a[k].device).clone() for k, v in state_b.items()}
        self.model = copy.deepcopy(model_a).eval()
        self._tensors = self.model.state_dict()  # views of the model's own storage, written in place per λ
        self.inputs = inputs
        self.stats_a = self.stats_b = None
        if self.norm_fix == "repair":
            self.stats_a = stats_a if stats_a is not None else endpoint_stats(model_a, inputs)
            self.stats_b = endpoint_stats(model_b, inputs)
        self.norm_fix_seconds = 0.0

    @torch.no_grad()
    def at(self, lam: float) -> nn.Module:
        """The (shared) model set to θ(λ), norm fix applied, in eval mode."""
        for k, t in self._tensors.items():  # lerp_state's arithmetic (a·(1 − λ) + b·λ), written in place
            a = self.state_a[k]
            if a.is_floating_point():
                torch.mul(a, 1.0 - lam, out=t)
                t.add_(self.state_b[k] * lam)
            else:
                t.copy_(a)
        started = time.perf_counter()
        if self.norm_fix == "reset":
            reset_bn_stats(self.model, self.inputs)
        elif self.norm_fix == "repair":
            repair(self.model, self.inputs, self.stats_a, self.stats_b, lam)
        if self.norm_fix != "none":
            _sync(self.model)
            self.norm_fix_seconds += time.perf_counter() - started
        return self.model.eval()


def _sync(model: nn.Module) -> None:
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


def interpolated_model(model_a: nn.Module, model_b: nn.Module, lam: float, ds: Dataset, norm_fix: str, *,
                       batches: int = 10, batch_size: int = 500) -> nn.Module:
    """A new model (same architecture and device as A, eval mode) at θ(λ) = (1 − λ)θ_A + λθ_B with the
    norm fix (reset | repair | none; `auto` is resolved from the model) applied, its statistics taken on
    `batches` fixed training batches of `batch_size` images."""
    if not 0 <= lam <= 1:
        raise LmcxError(f"λ must be in [0, 1] (λ = 0 is A, 1 is B), got {lam}")
    inputs = norm_fix_inputs(ds, batches, batch_size) if norm_fix != "none" else []
    return Interpolator(model_a, model_b, inputs, norm_fix).at(lam)


# ---------------------------------------------------------------------------------------------
# Barriers


def barrier_metrics(lambdas: Sequence[float], loss: Sequence[float], accuracy: Sequence[float]) -> dict[str, float]:
    """Barriers of one curve, exactly as in SCIENCE.md (the grid must hold 0 and 1; ½ for midpoints):

    loss barrier      max_λ [ L(θ(λ)) − ((1 − λ) L(θ_A) + λ L(θ_B)) ]
    accuracy barrier  max_λ [ ((1 − λ) Acc(θ_A) + λ Acc(θ_B)) − Acc(θ(λ)) ]
    with the λ where each maximum is reached, and at λ = ½ the loss, accuracy and both gaps.
    Accuracies are fractions in [0, 1]."""
    lam = np.asarray(lambdas, dtype=np.float64)
    loss_ = np.asarray(loss, dtype=np.float64)
    acc = np.asarray(accuracy, dtype=np.float64)
    if not (len(lam) == len(loss_) == len(acc)) or len(lam) < 2:
        raise ValueError("lambdas, loss and accuracy must have one value per λ (at least two)")

    def at(value: float) -> int:
        hits = np.flatnonzero(np.isclose(lam, value, rtol=0, atol=1e-12))
        if not len(hits):
            raise ValueError(f"the λ grid must contain {value}")
        return int(hits[0])

    i0, i1 = at(0.0), at(1.0)
    loss_gap = loss_ - ((1 - lam) * loss_[i0] + lam * loss_[i1])
    acc_gap = ((1 - lam) * acc[i0] + lam * acc[i1]) - acc
    il, ia = int(np.nanargmax(loss_gap)) if np.isfinite(loss_gap).any() else 0, int(np.argmax(acc_gap))
    out = {"loss_barrier": float(loss_gap[il]) if np.isfinite(loss_gap).any() else math.nan,
           "loss_barrier_lambda": float(lam[il]),
           "accuracy_barrier": float(acc_gap[ia]), "accuracy_barrier_lambda": float(lam[ia]),
           "loss_a": float(loss_[i0]), "loss_b": float(loss_[i1]),
           "accuracy_a": float(acc[i0]), "accuracy_b": float(acc[i1])}
    if np.isclose(lam, 0.5, rtol=0, atol=1e-12).any():
        im = at(0.5)
        out.update(midpoint_loss=float(loss_[im]), midpoint_accuracy=float(acc[im]),
                   midpoint_loss_barrier=float(loss_gap[im]), midpoint_accuracy_barrier=float(acc_gap[im]))
    return out


def loss_gaps(lambdas: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """L(θ(λ)) − ((1 − λ) L(θ_A) + λ L(θ_B)) at every λ of the grid (0 and 1 must be on it)."""
    lam, loss_ = np.asarray(lambdas, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    i0, i1 = int(np.flatnonzero(lam == 0.0)[0]), int(np.flatnonzero(lam == 1.0)[0])
    return loss_ - ((1 - lam) * loss_[i0] + lam * loss_[i1])


# ---------------------------------------------------------------------------------------------
# Curves: every logits tensor, kept


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
    stats_a = None
    if norm_fix == "repair":  # A's statistics once, shared by every pair
        stats_a = endpoint_stats(model_a, inputs)
    logits: dict[str, dict[str, torch.Tensor]] = {}
    forward_seconds = 0.0
    norm_fix_seconds = time.perf_counter() - started
    shared_a: dict[str, torch.Tensor] | None = None  # θ(0) logits, identical for every B
    with progress_bar() as bar:
        task = bar.add_task("interpolate", total=len(models_b) * len(lambdas), status="")
        for label, model_b in models_b.items():
            t0 = time.perf_counter()
            interp = Interpolator(model_a, model_b, inputs, norm_fix, stats_a)  # B's REPAIR statistics, once
            norm_fix_seconds += time.perf_counter() - t0
            per_split: dict[str, list[torch.Tensor]] = {s: [] for s in splits}
            for lam in lambdas:
                if lam == 0.0 and shared_a is not None:
                    for s in splits:
                        per_split[s].append(shared_a[s])
                    bar.advance(task)
                    continue
                model = interp.at(lam)
                t0 = time.perf_counter()
                out = {s: predict(model, ds, x, eval_batch_size, precision).cpu() for s, (x, _) in splits.items()}
                forward_seconds += time.perf_counter() - t0
                if lam == 0.0:
                    shared_a = out
                for s in splits:
                    per_split[s].append(out[s])
                bar.advance(task)
                bar.update(task, status=f"{label} λ={lam:.3f}")
            norm_fix_seconds += interp.norm_fix_seconds
            logits[label] = {s: torch.stack(v) for s, v in per_split.items()}
    timing = {"seconds": time.perf_counter() - started, "forward_seconds": forward_seconds,
              "norm_fix_seconds": norm_fix_seconds}
    return Curves(lambdas, list(models_b), {s: y.cpu() for s, (_, y) in splits.items()}, logits, timing)


def save_curves(path: str | Path, curves: Curves, info: dict[str, Any] | None = None) -> None:
    from .checkpoint import write_tensors

    tensors = {"lambdas": torch.tensor(curves.lambdas, dtype=torch.float64)}
    for split, y in curves.targets.items():
        tensors[f"targets/{split}"] = y.contiguous()
    for i, label in enumerate(curves.labels):
        for split, z in curves.logits[label].items():
            tensors[f"logits/{i}/{split}"] = z.contiguous()
    write_tensors(path, tensors, {"labels": curves.labels, "splits": sorted(curves.targets),
                                  "lambda_convention": LAMBDA_CONVENTION, **(info or {})})


def load_curves(path: str | Path) -> Curves:
    from safetensors import SafetensorError

    from .checkpoint import read_tensors

    path = Path(path)
    if not path.is_file():
        raise LmcxError(f"{path} does not exist; run `lmcx interpolate` into {path.parent} first")
    try:
        tensors, meta = read_tensors(path)
        labels = list(meta["labels"])
        targets = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("targets/")}
        logits: dict[str, dict[str, torch.Tensor]] = {label: {} for label in labels}
        for k, v in tensors.items():
            if k.startswith("logits/"):
                _, i, split = k.split("/")
                logits[labels[int(i)]][split] = v
        return Curves(tensors["lambdas"].tolist(), labels, targets, logits)
    except (SafetensorError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise LmcxError(f"{path} is not a readable logits cache ({e}); re-run `lmcx interpolate --force`") from None


# ---------------------------------------------------------------------------------------------
# Summaries: rows of curve.csv, barriers, plot


def fit_temperatures(curves: Curves, split: str = "calib") -> dict[str, list[float]]:
    """T per label and λ, fitted on `split`'s cached logits."""
    from .calibrate import fit_temperature

    y = curves.targets[split]
    return {label: [fit_temperature(z, y) for z in curves.logits[label][split]] for label in curves.labels}


def summarize(curves: Curves, temperatures: dict[str, list[float]] | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, dict]]:
    """(rows of curve.csv, per-label-and-split barriers, per-label series for the plot)."""
    from .calibrate import calibrated_nll

    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    series: dict[str, dict] = {}
    for label in curves.labels:
        results[label], series[label] = {}, {}
        splits = [s for s in CURVE_SPLITS if s in curves.logits[label]]
        if temperatures is not None and "calib" in curves.logits[label]:
            splits.append("calib")
        for split in splits:
            y = curves.targets[split]
            loss, acc, cal = [], [], []
            for i, lam in enumerate(curves.lambdas):
                z = curves.logits[label][split][i]
                l_, a_ = loss_and_accuracy(z, y)
                row = {"label": label, "lambda": lam, "split": split, "loss": l_, "accuracy": a_}
                if temperatures is not None:
                    t = temperatures[label][i]
                    cal.append(calibrated_nll(z, y, t))
                    row.update(temperature=t, calibrated_loss=cal[-1])
                loss.append(l_)
                acc.append(a_)
                rows.append(row)
            series[label][split] = {"loss": loss, "accuracy": acc, "calibrated_loss": cal or None}
            if split == "calib":
                continue
            entry = {"raw": barrier_metrics(curves.lambdas, loss, acc), "calibrated": None}
            if temperatures is not None:
                entry["calibrated"] = barrier_metrics(curves.lambdas, cal, acc)
                entry["calibrated"]["loss_barrier_at_most_raw_everywhere"] = bool(
                    np.all(loss_gaps(curves.lambdas, cal) <= loss_gaps(curves.lambdas, loss) + 1e-12))
            results[label][split] = entry
        if temperatures is not None:
            results[label]["temperatures"] = list(temperatures[label])
    return rows, results, series


def _title(settings: dict[str, Any]) -> str:
    ck = settings.get("checkpoints", {})
    a = Path(ck.get("a", "A")).parent.name or "A"
    bs = {Path(b.get("path", "B")).parent.name for b in ck.get("b", [])}
    return (f"A = {a}, B = {', '.join(sorted(bs)) or 'B'}   (norm fix: {settings.get('norm_fix')}, "
            f"λ = 0 is A)")


def write_outputs(out_dir: Path, curves: Curves, settings: dict[str, Any],
                  temperatures: dict[str, list[float]] | None) -> dict[str, Any]:
    """curve.csv, curve.png, then barrier.json (last). Returns the barrier dict."""
    from .plots import plot_interpolation

    rows, results, series = summarize(curves, temperatures)
    write_csv(out_dir / "curve.csv", rows)
    plot_interpolation(curves.lambdas, series, out_dir / "curve.png", title=_title(settings),
                       splits=[s for s in CURVE_SPLITS if s in curves.targets])
    barrier = {**settings, "results": results}
    write_json(out_dir / BARRIER_FILE, barrier)
    return barrier


# ---------------------------------------------------------------------------------------------
# Checkpoints in, outputs out


def _load_models(a_path, b_paths: Sequence, labels: Sequence[str], perms: Sequence | None, device: torch.device):
    from .checkpoint import build_from_checkpoint, check_compatible, load_checkpoint, resolve_model_path
    from .models import permutation_spec
    from .permutation.spec import apply_permutation, load_permutation_file

    ckpt_a = load_checkpoint(a_path)
    model_a = build_from_checkpoint(ckpt_a, device).eval()
    models_b: dict[str, nn.Module] = {}
    used = []
    for label, b_path, perm_path in zip(labels, b_paths, perms or [None] * len(b_paths)):
        ckpt_b = load_checkpoint(b_path)
        check_compatible(ckpt_a, ckpt_b)
        if perm_path is not None:
            spec = permutation_spec(ckpt_b.model)
            perm = load_permutation_file(perm_path, spec, ckpt_b.state)
            ckpt_b.state = apply_permutation(spec, perm, ckpt_b.state)
        models_b[label] = build_from_checkpoint(ckpt_b, device).eval()
        used.append({"label": label, "path": str(resolve_model_path(b_path).resolve()),
                     "permutation": str(Path(perm_path).resolve()) if perm_path is not None else None})
    return ckpt_a, model_a, models_b, {"a": str(resolve_model_path(a_path).resolve()), "b": used}


def _check_lists(b_paths: Sequence, labels: Sequence[str], perms: Sequence | None) -> None:
    if not b_paths:
        raise LmcxError("no model B given; pass at least one --b")
    if len(labels) != len(b_paths):
        raise LmcxError(f"{len(b_paths)} B model(s) but {len(labels)} label(s); give one --label per --b")
    if len(set(labels)) != len(labels):
        raise LmcxError(f"labels must be different from each other, got {list(labels)}")
    if perms is not None and len(perms) != len(b_paths):
        raise LmcxError(f"{len(b_paths)} B model(s) but {len(perms)} permutation(s); give one --perm per --b "
                        "(`none` for a B used as it is)")


def interpolate_checkpoints(a_path, b_paths: list, labels: list[str], cfg: InterpolateConfig, out_dir,
                            device: str = "auto", perms: list | None = None, data_root=None) -> dict[str, Any]:
    """Interpolate checkpoint A with each B (optionally permuted by its permutation file), evaluate every
    θ(λ), optionally calibrate, and write the outputs (module docstring) into `out_dir`. Returns the
    barrier dict (the content of barrier.json). Does not skip or lock: callers use `rundir.run_once`."""
    from .data import load_dataset
    from .train import resolve_device

    started = time.perf_counter()
    out_dir = Path(out_dir)
    labels = [str(x) for x in labels]
    perms = None if perms is None or all(p is None for p in perms) else list(perms)
    _check_lists(b_paths, labels, perms)
    grid = lambda_grid(cfg)
    dev = resolve_device(device)
    ckpt_a, model_a, models_b, used = _load_models(a_path, b_paths, labels, perms, dev)
    norm_fix = resolve_norm_fix(cfg.norm_fix, ckpt_a.model.norm)
    data_cfg = replace(ckpt_a.data, root=str(data_root) if data_root is not None else ckpt_a.data.root)
    ds = load_dataset(data_cfg, dev)
    n_train = min(cfg.train_eval_size, len(ds.y_train))
    splits = {"test": (ds.x_test, ds.y_test), "train": (ds.x_train[:n_train], ds.y_train[:n_train])}
    if cfg.calibrate:
        if len(ds.y_calib) == 0:
            raise LmcxError("calibration needs the held-out calibration split, but data.calib_size is 0 for "
                            "these models; train with data.calib_size > 0 or interpolate without --calibrate")
        splits["calib"] = (ds.x_calib, ds.y_calib)
    curves = evaluate_curves(model_a, models_b, ds, grid, norm_fix, splits, norm_fix_batches=cfg.norm_fix_batches,
                             norm_fix_batch_size=cfg.norm_fix_batch_size, eval_batch_size=cfg.eval_batch_size,
                             precision=cfg.precision)
    settings = {
        "lambda_convention": LAMBDA_CONVENTION,
        "grid": grid,
        "norm_fix": norm_fix,
        "norm_fix_setting": cfg.norm_fix,
        "norm_fix_batches": cfg.norm_fix_batches,
        "norm_fix_batch_size": cfg.norm_fix_batch_size,
        "norm_fix_note": NORM_FIX_NOTES[norm_fix],
        "splits": {"test": len(ds.y_test), "train": n_train, "calib": len(ds.y_calib)},
        "train_eval_size": n_train,
        "calibration": {"calibrated": False, "split": "calib", "size": len(ds.y_calib)},
        "checkpoints": used,
        "dataset": ckpt_a.data.name,
        "data_root": str(data_root) if data_root is not None else None,
        "model": to_dict(ckpt_a.model),
        "precision": cfg.precision,
        "eval_batch_size": cfg.eval_batch_size,
        "settings": to_dict(cfg),
        "device": str(dev),
        "timing": dict(curves.timing),
    }
    if not (out_dir / "config.yaml").is_file():  # run_once (CLI, `lmcx run`) already wrote the caller's record
        write_yaml(out_dir / "config.yaml", {"interpolate": to_dict(cfg), "a": str(a_path),
                                             "b": [str(b) for b in b_paths], "labels": labels,
                                             **({"perms": [str(p) if p else None for p in perms]} if perms else {})})
    temperatures = None
    if cfg.calibrate:
        temperatures, settings["calibration"] = _calibrate(curves)
    save_curves(out_dir / LOGITS_FILE, curves, {"norm_fix": norm_fix})
    settings["timing"]["total_seconds"] = time.perf_counter() - started
    return write_outputs(out_dir, curves, settings, temperatures)


def _calibrate(curves: Curves) -> tuple[dict[str, list[float]], dict[str, Any]]:
    from .calibrate import METHOD

    t0 = time.perf_counter()
    temperatures = fit_temperatures(curves, "calib")
    info = {"calibrated": True, "split": "calib", "size": int(len(curves.targets["calib"])), "method": METHOD,
            "seconds": time.perf_counter() - t0}
    return temperatures, info


def calibrate_dir(out_dir, device: str = "auto", data_root=None) -> dict[str, Any]:
    """Calibrate a finished interpolation directory from its cached logits: fit T per label and λ on the
    calibration split (computing its logits once, from the recorded checkpoints, if the cache lacks them),
    then rewrite logits.safetensors, curve.csv, curve.png and barrier.json (last). Returns the barrier dict.
    Does not lock: callers hold `rundir.claim`."""
    from .data import load_dataset
    from .train import resolve_device

    out_dir = Path(out_dir)
    barrier_path = out_dir / BARRIER_FILE
    if not barrier_path.is_file():
        raise LmcxError(f"{out_dir} has no {BARRIER_FILE}; run `lmcx interpolate --out {out_dir}` first")
    settings = read_json(barrier_path)
    if not isinstance(settings, dict):
        raise LmcxError(f"{barrier_path} is not a barrier file (JSON {type(settings).__name__}); re-run "
                        f"`lmcx interpolate --force --out {out_dir}`")
    settings.pop("results", None)
    curves = load_curves(out_dir / LOGITS_FILE)
    missing = [label for label in curves.labels if "calib" not in curves.logits[label]]
    if missing:
        try:
            ck = settings["checkpoints"]
            a_path, entries = ck["a"], ck["b"]
            cfg = InterpolateConfig(**{k: v for k, v in settings["settings"].items()})
        except (KeyError, TypeError) as e:
            raise LmcxError(f"{barrier_path} does not record its checkpoints ({e}); re-run `lmcx interpolate "
                            f"--calibrate --force --out {out_dir}`") from None
        entries = [e for e in entries if e["label"] in missing]
        data_root = data_root if data_root is not None else settings.get("data_root")
        dev = resolve_device(device)
        ckpt_a, model_a, models_b, _ = _load_models(a_path, [e["path"] for e in entries],
                                                     [e["label"] for e in entries],
                                                     [e["permutation"] for e in entries], dev)
        data_cfg = replace(ckpt_a.data, root=str(data_root) if data_root is not None else ckpt_a.data.root)
        ds = load_dataset(data_cfg, dev)
        if len(ds.y_calib) == 0:
            raise LmcxError("calibration needs the held-out calibration split, but data.calib_size is 0 for "
                            "these models; train with data.calib_size > 0")
        extra = evaluate_curves(model_a, models_b, ds, curves.lambdas, settings["norm_fix"],
                                {"calib": (ds.x_calib, ds.y_calib)}, norm_fix_batches=cfg.norm_fix_batches,
                                norm_fix_batch_size=cfg.norm_fix_batch_size, eval_batch_size=cfg.eval_batch_size,
                                precision=cfg.precision)
        curves.targets["calib"] = extra.targets["calib"]
        for label in missing:
            curves.logits[label]["calib"] = extra.logits[label]["calib"]
        settings.setdefault("timing", {})["calib_forward_seconds"] = extra.timing["seconds"]
        save_curves(out_dir / LOGITS_FILE, curves, {"norm_fix": settings.get("norm_fix")})
    temperatures, settings["calibration"] = _calibrate(curves)
    if isinstance(settings.get("settings"), dict):
        settings["settings"]["calibrate"] = True
    settings.setdefault("splits", {})["calib"] = settings["calibration"]["size"]
    config_path = out_dir / "config.yaml"
    if config_path.is_file():  # the directory now holds calibrated results: say so in its record
        import yaml

        try:
            record = yaml.safe_load(config_path.read_text()) or {}
        except (yaml.YAMLError, OSError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("interpolate"), dict):
            record["interpolate"]["calibrate"] = True
            write_yaml(config_path, record)
    return write_outputs(out_dir, curves, settings, temperatures)


def is_calibrated(out_dir) -> bool:
    path = Path(out_dir) / BARRIER_FILE
    if not path.is_file():
        return False
    try:
        return bool(read_json(path).get("calibration", {}).get("calibrated"))
    except (LmcxError, AttributeError):
        return False


def summary_lines(barrier: dict[str, Any]) -> Iterable[str]:
    """One line per label: test loss / accuracy barrier (and the calibrated loss barrier)."""
    for label, per in barrier.get("results", {}).items():
        test = per.get("test", {})
        raw, cal = test.get("raw", {}), test.get("calibrated")
        num = lambda d, k: math.nan if d.get(k) is None else d[k]  # noqa: E731 - barrier.json has null for nan/inf
        line = (f"{label}: test loss barrier {num(raw, 'loss_barrier'):.4f} "
                f"(at λ={num(raw, 'loss_barrier_lambda'):.3f})")
        if cal:
            line += f", calibrated {num(cal, 'loss_barrier'):.4f}"
        line += f", accuracy barrier {100 * num(raw, 'accuracy_barrier'):.2f} pp"
        yield line


__all__ = ["LAMBDA_CONVENTION", "Interpolator", "Curves", "lambda_grid", "lerp_state",
           "model_norm", "check_norm_fix", "resolve_norm_fix", "norm_fix_inputs", "reset_bn_stats", "repair_points",
           "activation_stats", "endpoint_stats", "repair", "interpolated_model", "barrier_metrics", "evaluate_curves",
           "save_curves", "load_curves", "fit_temperatures", "summarize", "interpolate_checkpoints",
           "calibrate_dir", "is_calibrated", "check_same_layout"]
