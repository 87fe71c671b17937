"""Every setting of lmcx, in one place, as typed dataclasses loaded from YAML.

`load_config(cls, path, overrides)` reads a YAML file, applies `--set a.b=value` overrides and flags,
and validates the result (types here, ranges in lmcx/validation.py): unknown keys, wrong types and
out-of-range values raise LmcxError naming the key path and the file. `to_dict(cfg)` gives the fully
resolved config written beside results.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import LmcxError
from .io import MAX_DEPTH, MAX_YAML_BYTES, load_yaml, read_bounded, shorten
from .validation import (ANALYSES, check_data, check_experiment, check_interpolate, check_lewc, check_match,
                         check_model, check_ste, check_svd, check_synthetic, check_train, check_train_job)

# ---------------------------------------------------------------------------------------------
# Data, model, training


@dataclass
class SyntheticConfig:
    """Generated Gaussian-blob images: for tests and smoke runs."""

    train_size: int = 1024
    test_size: int = 256
    num_classes: int = 10
    shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    seed: int = 0


@dataclass
class DataConfig:
    name: Literal["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    root: str | None = None  # else $LMCX_DATA_ROOT, else ~/.cache/lmcx/data
    path: str | None = None  # imagefolder: folder holding train/ and test/ (relative to root)
    download: bool = False
    # held out of the training set (same split for every seed) for temperature calibration;
    # null = the dataset's default (data.default_calib_size: 5000, or a third of a small training set such
    # as digits', so the bare defaults train on digits)
    calib_size: int | None = None
    # per-channel mean/std that standardise the pixels: `train` = measured on the training split,
    # `standard` = the dataset's published constants (mnist, fashion-mnist, cifar10, cifar100 only)
    normalization: Literal["train", "standard"] = "train"
    train_size: int | None = None  # use only this many training images (after the calibration split)
    augment: bool = False  # random crop with padding + horizontal flip, on the device
    crop_padding: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    # mlp | vgg11 | vgg16 | resnet20 | torchvision.<name> | package.module:callable (lmcx/arch.py)
    arch: str = "mlp"
    width: float = 1.0  # multiplier: MLP h = 512*width, VGG/ResNet channels times width
    norm: Literal["bn", "ln", "none"] = "bn"  # models from outside lmcx: the norm they have (models/external.py)
    bias: bool = True


@dataclass
class TrainConfig:
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.4
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # after the linear warm-up
    warmup_epochs: float = 5.0
    epochs: int = 100
    batch_size: int = 500
    eval_batch_size: int = 2000
    eval_every: int = 1  # epochs between test-set evaluations (the last epoch is always evaluated)
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None = no clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model (CUDA)


@dataclass
class TrainJob:
    """Everything `lmcx train` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str | None = None  # run directory; default: see lmcx/names.py
    track: Literal["none", "tensorboard"] = "none"  # experiment tracking (lmcx/tracking.py)
    threads: int | str = "auto"  # CPU threads: auto | N (below --threads and $LMCX_THREADS; lmcx/threads.py)


# ---------------------------------------------------------------------------------------------
# Matching, interpolation, calibration, analyses


@dataclass
class SteConfig:
    """Straight-through estimator (lmcx/permutation/ste.py): Adam on the midpoint training loss."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 500
    eval_samples: int = 5000  # fixed training subset on which each candidate permutation's merge is scored
    eval_every: int = 1  # steps between candidate checks (1 = every step, as Git Re-Basin); 0 = once per epoch


@dataclass
class MatchConfig:
    """`lmcx match` (lmcx/match.py). `seed` orders weight matching's sweeps (and STE's batches)."""

    method: Literal["wm", "am", "ste"] = "wm"
    seed: int = 0
    # what weight matching's ||θ_A − π(θ_B)||² sums over: `params` = trainable parameters only (Git
    # Re-Basin, PLeaS, rebasin); `all` = also BatchNorm running statistics (lmcx before this setting)
    wm_objective: Literal["params", "all"] = "params"
    max_iter: int = 100  # weight matching sweeps (MergeMany: also rounds)
    tol: float = 1e-5  # weight matching stops after a sweep lowering ||A - pi(B)||^2 by less than tol of itself
    start: Literal["forward", "identity"] = "forward"  # weight matching's start (lmcx/permutation/weight_matching.py)
    am_samples: int = 5000  # training images whose activations are correlated
    am_batch_size: int = 500  # images per forward pass in activation matching
    many: Literal["anchor", "merge-many"] = "anchor"  # three or more models
    ste: SteConfig = field(default_factory=SteConfig)
    threads: int | str = "auto"  # CPU threads: auto | N (below --threads and $LMCX_THREADS; lmcx/threads.py)


@dataclass
class InterpolateConfig:
    """`lmcx interpolate` / `lmcx calibrate` (lmcx/interpolate/, lmcx/calibrate.py).

    θ(λ) = (1 − λ) θ_A + λ θ_B, λ = 0 is A. The grid always holds 0, ½ and 1 (added when missing):
    barriers need both endpoints and [B]'s tables the midpoint.
    """

    points: int = 25  # evenly spaced λ in [0, 1]
    lambdas: list[float] | None = None  # explicit grid; overrides `points`
    norm_fix: Literal["auto", "reset", "repair", "none"] = "auto"  # auto: reset for BN models, else none
    train_eval_size: int = 5000  # training images the train-split curve is measured on
    norm_fix_batches: int = 10  # training batches for BN reset / REPAIR statistics
    norm_fix_batch_size: int = 500
    eval_batch_size: int = 2000  # images per forward pass when evaluating θ(λ)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # fp32: barriers are small differences of losses
    calibrate: bool = False
    threads: int | str = "auto"  # CPU threads: auto | N (below --threads and $LMCX_THREADS; lmcx/threads.py)


@dataclass
class SvdConfig:
    """`lmcx analyze-svd` (lmcx/analysis/svd.py)."""

    gammas: list[float] = field(default_factory=lambda: [0.0, 0.3])  # R(γ): top-k with s_i/s_1 >= γ
    # k of R(γ): `min` = one k = min(k_A, k_B) for both layers ([A]'s single k); `own` = each layer its own
    # k, normalised by √(k_A·k_B)
    k_rule: Literal["min", "own"] = "min"
    weighted: bool = False  # also report the singular-value-weighted alignment
    wm_seed: int = 0  # weight matching run on the fly when no permutation is given
    wm_max_iter: int = 100
    threads: int | str = "auto"  # CPU threads: auto | N (below --threads and $LMCX_THREADS; lmcx/threads.py)
    wm_objective: Literal["params", "all"] = "params"  # its objective, as match.wm_objective


@dataclass
class LewcConfig:
    """`lmcx lewc` (lmcx/analysis/lewc.py). λ convention: θ(λ) = (1 − λ) θ_A + λ θ_B."""

    lambdas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    samples: int = 1000  # the first `samples` test images
    batch_size: int = 250  # images per forward pass (lower it for wide conv nets)
    norm_fix_batches: int = 10  # training batches for BN reset / REPAIR statistics of each θ(λ)
    norm_fix_batch_size: int = 500
    threads: int | str = "auto"  # CPU threads: auto | N (below --threads and $LMCX_THREADS; lmcx/threads.py)


# ---------------------------------------------------------------------------------------------
# Experiments: `lmcx run` (every step is an ordinary subcommand call with its own run directory)


@dataclass
class ThreeModelConfig:
    """[A]'s protocol: match each of `others` to `anchor`, then measure the barrier between the two
    permuted non-anchor models, which were never matched to each other."""

    anchor: int = 0  # seed of the anchor model
    others: list[int] = field(default_factory=lambda: [1, 2])
    methods: list[str] = field(default_factory=lambda: ["wm", "ste"])


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    out: str | None = None  # default outputs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # model.width is replaced by each of `widths`
    train: TrainConfig = field(default_factory=TrainConfig)
    widths: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    # "all" | "consecutive" ((s0,s1), (s1,s2), ...: shared endpoints) | "disjoint" ((s0,s1), (s2,s3), ...:
    # independent pairs, honest ± over pairs) | list of [seed_a, seed_b]
    pairs: Any = "all"
    methods: list[str] = field(default_factory=lambda: ["wm"])  # naive is always included
    match: MatchConfig = field(default_factory=MatchConfig)
    interpolate: InterpolateConfig = field(default_factory=lambda: InterpolateConfig(calibrate=True))
    analyses: list[str] = field(default_factory=lambda: list(ANALYSES))
    svd: SvdConfig = field(default_factory=SvdConfig)
    lewc: LewcConfig = field(default_factory=LewcConfig)
    three_models: ThreeModelConfig | None = None
    device: str = "auto"
    track: Literal["none", "tensorboard"] = "none"  # experiment tracking of the train and interpolate steps
    # `lmcx run --launcher slurm`: submitit SlurmExecutor parameters (partition, time in minutes or
    # timeout_min, gpus_per_node, cpus_per_task, mem or mem_gb, account, ...); see lmcx/slurm.py
    slurm: Any = field(default_factory=dict)
    threads: int | str = "auto"  # CPU threads: auto | N (below --threads and $LMCX_THREADS; lmcx/threads.py)


# ---------------------------------------------------------------------------------------------
# Loading and validation


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp`, converting only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LmcxError(f"{where}: expected a mapping of settings, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise LmcxError(f"{where}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, where)
            except LmcxError:
                continue
        raise LmcxError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise LmcxError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise LmcxError(f"{where}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise LmcxError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LmcxError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LmcxError(f"{where}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond the float range
            value = math.inf
        if not math.isfinite(value):  # .inf / .nan would pass `> 0` checks or silently disable them
            raise LmcxError(f"{where}: expected a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise LmcxError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            shown = key if str(key).isprintable() else repr(key)  # a key with a newline must not break the line
            raise LmcxError(f"{where + '.' if where else ''}{shown}: unknown setting; "
                            f"valid keys here are {', '.join(sorted(names))}")
    kwargs = {k: _convert(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}, with the value parsed as YAML (so 3, 1e-3, true, [1,2])."""
    if "=" not in text:
        raise LmcxError(f"--set {shorten(text)}: expected KEY=VALUE, for example --set train.lr=0.1")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise LmcxError(f"--set {shorten(text)}: the key must be dotted names, for example train.lr")
    if key.count(".") >= MAX_DEPTH:
        raise LmcxError(f"--set {shorten(key)}: more than {MAX_DEPTH} levels; lmcx settings nest a few levels")
    try:
        value = load_yaml(raw, f"--set {shorten(key)}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return nested(key, value)


def nested(key: str, value: Any) -> dict[str, Any]:
    """`nested("a.b", 1)` -> {"a": {"b": 1}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = read_bounded(path, MAX_YAML_BYTES, "config")
    except FileNotFoundError:
        raise LmcxError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise LmcxError(f"config {path} is a directory; pass a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LmcxError(f"cannot read config {path}: {e}") from None
    try:
        data = load_yaml(text, f"config {path}")  # no duplicate keys; bounded nesting and alias expansion
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise LmcxError(f"config {path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise LmcxError(f"config {path} is empty; see configs/ for examples")
    if not isinstance(data, dict):
        raise LmcxError(f"config {path} must be a mapping of settings, not {type(data).__name__}")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[dict[str, Any]] = ()) -> Any:
    """Defaults, then the YAML file, then each override in order; validated into `cls`."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for update in overrides:
        data = _deep_merge(data, update)
    source = f"config {path}" if path is not None else "settings"
    try:
        cfg = from_dict(cls, data, "")
        validate(cfg)
    except LmcxError as e:
        raise LmcxError(f"{source}: {e}") from None
    return cfg


# ---------------------------------------------------------------------------------------------
# Range checks (types are checked by the loader)


RANGE_CHECKS = {ModelConfig: check_model, DataConfig: check_data, SyntheticConfig: check_synthetic,
                TrainConfig: check_train, TrainJob: check_train_job, MatchConfig: check_match,
                SteConfig: check_ste, InterpolateConfig: check_interpolate, SvdConfig: check_svd,
                LewcConfig: check_lewc, ExperimentConfig: check_experiment}


def validate(cfg: Any, prefix: str = "") -> None:
    """Check ranges of every dataclass in `cfg` (recursively); the checks are in lmcx/validation.py."""
    for cls, check in RANGE_CHECKS.items():
        if isinstance(cfg, cls):
            check(cfg, prefix)
            break
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")


def data_root(configured: str | None) -> Path:
    """--data-root / data.root, else $LMCX_DATA_ROOT, else a cache folder under the home directory."""
    root = configured or os.environ.get("LMCX_DATA_ROOT") or "~/.cache/lmcx/data"
    return Path(root).expanduser()


def cache_dir() -> Path:
    """Where decoded datasets are cached: $LMCX_CACHE_DIR, else ~/.cache/lmcx."""
    return Path(os.environ.get("LMCX_CACHE_DIR") or "~/.cache/lmcx").expanduser()
