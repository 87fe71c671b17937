"""Range checks of every setting: lmcx/config.py checks types while it loads, these check values.

One function per settings class, raising LmcxError that names the key (`p`: the key path of the
section, e.g. `interpolate.`); `config.validate` picks the one for each settings object and recurses
into its sections.
"""
from __future__ import annotations

from typing import Any

from .arch import TORCHVISION_PREFIX, arch_kind, check_arch
from .errors import LmcxError

METHODS = ("wm", "am", "ste")  # what an experiment may list in `methods` (naive is always included)
ANALYSES = ("svd", "lewc")
PAIRINGS = ("all", "consecutive", "disjoint")  # named ways to pair an experiment's seeds
# datasets with published per-channel pixel constants (data.normalization: standard); data.py holds them
STANDARD_NORMALIZATION = ("mnist", "fashion-mnist", "cifar10", "cifar100")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise LmcxError(f"{key}: {message}")


SEED_LIMIT = 2 ** 32  # every seed feeds torch / numpy generators, which take non-negative 32/64-bit values


def _require_seed(seed: int, key: str) -> None:
    _require(0 <= seed < SEED_LIMIT, key, f"must be an integer in [0, 2**32), got {seed}")


def _require_distinct_names(values: list[float], key: str, where: str, prefix: str = "") -> None:
    """Values are named `{:g}` (6 significant digits) in directory names and report columns: two values that
    differ only beyond those digits would share one name, and one result would stand for both."""
    names = [f"{v:g}" for v in values]
    for i, name in enumerate(names):
        j = names.index(name)
        _require(j == i, key, f"{values[j]!r} and {values[i]!r} would share the {where} named {prefix}{name} (6 "
                 "significant digits); drop one or make them differ within those digits")


def _require_device(value: str, key: str) -> None:
    _require(value == "auto" or value == "cpu" or value.startswith("cuda"), key,
             f"must be auto, cpu, cuda or cuda:N, got {value!r}")


def _require_threads(value: Any, key: str) -> None:
    from .threads import parse

    try:
        parse(value, key)
    except LmcxError:
        raise LmcxError(f"{key}: must be auto or a positive integer, got {value!r}") from None


def _require_loop(cfg: Any, p: str) -> None:
    """epochs, lr and batch_size of an optimisation loop (TrainConfig, SteConfig)."""
    _require(cfg.epochs > 0, f"{p}epochs", f"must be > 0, got {cfg.epochs}")
    _require(cfg.lr > 0, f"{p}lr", f"must be > 0, got {cfg.lr}")
    _require(cfg.batch_size > 0, f"{p}batch_size", f"must be > 0, got {cfg.batch_size}")


def check_model(cfg: Any, p: str) -> None:
    """Ranges of a ModelConfig (and that its architecture exists: lmcx/arch.py)."""
    try:
        kind = arch_kind(cfg.arch)
        check_arch(cfg.arch)
    except LmcxError as e:
        raise LmcxError(f"{p}arch: {e}") from None
    _require(cfg.width > 0, f"{p}width", f"must be > 0, got {cfg.width}")
    _require(kind != "torchvision" or cfg.width == 1, f"{p}width",
             f"torchvision models have no width multiplier; leave it at 1, got {cfg.width:g}")
    _require(kind == "builtin" or cfg.bias, f"{p}bias",
             f"false applies to the built-in architectures only; {cfg.arch} has the biases it was written with")


def check_data(cfg: Any, p: str) -> None:
    """Ranges of a DataConfig."""
    _require(cfg.calib_size is None or cfg.calib_size >= 0, f"{p}calib_size",
             f"must be >= 0 or null (the dataset's default), got {cfg.calib_size}")
    _require(cfg.normalization == "train" or cfg.name in STANDARD_NORMALIZATION, f"{p}normalization",
             f"'standard' means a dataset's published mean/std, which exist for {', '.join(STANDARD_NORMALIZATION)} "
             f"but not for {cfg.name!r} (its pixels are standardised with the training split's own statistics); "
             "use data.normalization: train")
    _require(cfg.train_size is None or cfg.train_size > 0, f"{p}train_size", "must be > 0 or null")
    _require(cfg.crop_padding >= 0, f"{p}crop_padding", "must be >= 0")


def check_synthetic(cfg: Any, p: str) -> None:
    """Ranges of a SyntheticConfig."""
    _require(cfg.train_size > 0 and cfg.test_size > 0, f"{p}train_size", "sizes must be > 0")
    _require(cfg.num_classes >= 2, f"{p}num_classes", "must be >= 2")
    _require(len(cfg.shape) == 3 and all(s > 0 for s in cfg.shape), f"{p}shape",
             "must be [channels, height, width], all > 0")
    _require_seed(cfg.seed, f"{p}seed")


def check_train(cfg: Any, p: str) -> None:
    """Ranges of a TrainConfig."""
    _require_loop(cfg, p)
    _require(cfg.eval_batch_size > 0, f"{p}eval_batch_size", "must be > 0")
    _require(cfg.eval_every > 0, f"{p}eval_every", "must be > 0")
    _require(cfg.weight_decay >= 0, f"{p}weight_decay", "must be >= 0")
    _require(0 <= cfg.momentum < 1, f"{p}momentum", "must be in [0, 1)")
    _require(cfg.warmup_epochs >= 0, f"{p}warmup_epochs", "must be >= 0")
    _require(0 <= cfg.label_smoothing < 1, f"{p}label_smoothing", "must be in [0, 1)")
    _require(cfg.grad_clip is None or cfg.grad_clip > 0, f"{p}grad_clip", "must be > 0 or null")
    _require(not (cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0), f"{p}nesterov",
             "Nesterov momentum needs train.momentum > 0")


def check_train_job(cfg: Any, p: str) -> None:
    """Ranges of a TrainJob."""
    _require_device(cfg.device, f"{p}device")
    _require_seed(cfg.seed, f"{p}seed")
    _require_threads(cfg.threads, f"{p}threads")


def check_match(cfg: Any, p: str) -> None:
    """Ranges of a MatchConfig."""
    _require(cfg.max_iter > 0, f"{p}max_iter", "must be > 0")
    _require(cfg.tol >= 0, f"{p}tol", f"must be >= 0 (0: stop only when a sweep improves nothing), got {cfg.tol}")
    _require(cfg.am_samples > 0, f"{p}am_samples", "must be > 0")
    _require(cfg.am_batch_size > 0, f"{p}am_batch_size", "must be > 0")
    _require_seed(cfg.seed, f"{p}seed")
    _require_threads(cfg.threads, f"{p}threads")


def check_ste(cfg: Any, p: str) -> None:
    """Ranges of a SteConfig."""
    _require_loop(cfg, p)
    _require(cfg.eval_samples > 0, f"{p}eval_samples", "must be > 0")
    _require(cfg.eval_every >= 0, f"{p}eval_every", "must be >= 0 (0 = once per epoch)")


def check_interpolate(cfg: Any, p: str) -> None:
    """Ranges of a InterpolateConfig."""
    _require(cfg.points >= 2, f"{p}points", f"must be >= 2, got {cfg.points}")
    if cfg.lambdas is not None:
        outside = [x for x in cfg.lambdas if not 0 <= x <= 1]
        _require(not outside, f"{p}lambdas", f"every λ must be in [0, 1] (λ = 0 is A, 1 is B), got {outside}")
        _require(len(cfg.lambdas) >= 2, f"{p}lambdas", "must hold at least two values, each in [0, 1]")
    _require(cfg.train_eval_size > 0, f"{p}train_eval_size", "must be > 0")
    _require(cfg.norm_fix_batches > 0, f"{p}norm_fix_batches", "must be > 0")
    _require(cfg.norm_fix_batch_size >= 2, f"{p}norm_fix_batch_size", "must be >= 2 (batch statistics)")
    _require(cfg.eval_batch_size > 0, f"{p}eval_batch_size", "must be > 0")
    _require_threads(cfg.threads, f"{p}threads")


def check_svd(cfg: Any, p: str) -> None:
    """Ranges of a SvdConfig."""
    _require(all(0 <= g <= 1 for g in cfg.gammas) and cfg.gammas, f"{p}gammas", "each γ must be in [0, 1]")
    _require_distinct_names(cfg.gammas, f"{p}gammas", "report columns")
    _require(cfg.wm_max_iter > 0, f"{p}wm_max_iter", "must be > 0")
    _require_seed(cfg.wm_seed, f"{p}wm_seed")
    _require_threads(cfg.threads, f"{p}threads")


def check_lewc(cfg: Any, p: str) -> None:
    """Ranges of a LewcConfig."""
    _require(all(0 <= x <= 1 for x in cfg.lambdas) and cfg.lambdas, f"{p}lambdas", "each λ must be in [0, 1]")
    _require_distinct_names(cfg.lambdas, f"{p}lambdas", "report columns")
    _require(cfg.samples > 0, f"{p}samples", "must be > 0")
    _require(cfg.batch_size > 0, f"{p}batch_size", "must be > 0")
    _require(cfg.norm_fix_batches > 0, f"{p}norm_fix_batches", "must be > 0")
    _require(cfg.norm_fix_batch_size > 0, f"{p}norm_fix_batch_size", "must be > 0")
    _require_threads(cfg.threads, f"{p}threads")


def check_experiment(cfg: Any, p: str) -> None:
    """Ranges of a ExperimentConfig."""
    # everything that would otherwise fail half-way through a sweep fails here, before any training
    _require_threads(cfg.threads, f"{p}threads")
    _require_device(cfg.device, f"{p}device")
    for section in ("match", "interpolate", "svd", "lewc"):  # one process runs every step: one thread count
        _require(getattr(cfg, section).threads == "auto", f"{p}{section}.threads",
                 "set threads once, at the top level of the experiment")
    _require(bool(cfg.widths), f"{p}widths", "list at least one width multiplier, e.g. widths: [1, 2]")
    _require(all(w > 0 for w in cfg.widths), f"{p}widths", f"every width must be > 0, got {cfg.widths}")
    _require(len(cfg.seeds) >= 2, f"{p}seeds", "list at least two seeds (a pair of models), e.g. seeds: [0, 1]")
    _require(len(set(cfg.seeds)) == len(cfg.seeds), f"{p}seeds", f"seeds repeat: {cfg.seeds}")
    for seed in cfg.seeds:
        _require_seed(seed, f"{p}seeds")
    _require(len(set(cfg.widths)) == len(cfg.widths), f"{p}widths", f"widths repeat: {cfg.widths}")
    _require(not cfg.model.arch.startswith(TORCHVISION_PREFIX) or cfg.widths == [1], f"{p}widths",
             f"torchvision models have no width multiplier; use widths: [1], got {cfg.widths}")
    _require_distinct_names(cfg.widths, f"{p}widths", "directories", "w")
    for m in cfg.methods:
        _require(m in METHODS, f"{p}methods", f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for a in cfg.analyses:
        _require(a in ANALYSES, f"{p}analyses", f"unknown analysis {a!r}; choose from {', '.join(ANALYSES)}")
    _require(cfg.name != "" and "/" not in cfg.name, f"{p}name", "must be a non-empty name without '/'")
    pairs = cfg.pairs
    pairs_hint = "must be all, consecutive, disjoint, or a list of [seed_a, seed_b]"
    if isinstance(pairs, str):
        _require(pairs in PAIRINGS, f"{p}pairs", pairs_hint)
    else:
        _require(isinstance(pairs, list) and len(pairs) > 0, f"{p}pairs", pairs_hint)
        for pair in pairs:
            _require(isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, int) for s in pair)
                     and pair[0] != pair[1], f"{p}pairs", f"{pair!r} is not a pair of two different seeds")
            for s in pair:
                _require(s in cfg.seeds, f"{p}pairs", f"pair {pair} refers to seed {s}, which is not in seeds {cfg.seeds}")
    if cfg.three_models is not None:
        t = cfg.three_models
        for s in [t.anchor, *t.others]:
            _require(s in cfg.seeds, f"{p}three_models", f"seed {s} is not in seeds {cfg.seeds}")
        _require(len(t.others) >= 2 and t.anchor not in t.others, f"{p}three_models.others",
                 "list at least two seeds other than the anchor")
        for m in t.methods:
            _require(m in METHODS, f"{p}three_models.methods", f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    _require(isinstance(cfg.slurm, dict) and all(isinstance(k, str) for k in cfg.slurm), f"{p}slurm",
             "must be a mapping of submitit SlurmExecutor parameters, e.g. slurm: {partition: gpu, time: 120}")
