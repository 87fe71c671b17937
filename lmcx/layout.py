"""An experiment's folder (`lmcx run`): where each step writes, and the files that describe the whole.

Each step (train, match, interpolate, svd, lewc) is the library call behind a subcommand, writing its
own run directory under the experiment's output folder (`experiment_dir`):

  train/w{W}-s{S}/                      lmcx train
  match/w{W}-s{A}-s{B}-{method}/        lmcx match   (B permuted to A)
  interpolate/w{W}-s{A}-s{B}/           lmcx interpolate (naive and every method on one plot)
  svd/w{W}-s{A}-s{B}/                   lmcx analyze-svd (B vs WM-permuted B)
  lewc/w{W}-s{A}-s{B}-{naive|method}/   lmcx lewc
  three/w{W}-a{A}-s{B}-s{C}-{method}/   [A]'s protocol: π(B) vs π(C), both matched to anchor A

and beside them experiment.yaml (the resolved settings), steps.json (each step's status) and what
`lmcx report` writes. The runner (experiment.py) writes this layout; the report (report.py) only reads it.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from .config import ExperimentConfig, from_dict
from .errors import LmcxError
from .io import read_yaml

EXPERIMENT_FILE = "experiment.yaml"
STEPS_FILE = "steps.json"


def width_tag(width: float) -> str:
    return f"w{width:g}"


def train_dir(root: Path, width: float, seed: int) -> Path:
    return root / "train" / f"{width_tag(width)}-s{seed}"


def pair_dir(root: Path, kind: str, width: float, a: int, b: int, suffix: str = "") -> Path:
    """The run directory of a step on the pair of seeds (a, b): match, interpolate, svd, lewc."""
    return root / kind / (f"{width_tag(width)}-s{a}-s{b}" + (f"-{suffix}" if suffix else ""))


def three_dir(root: Path, width: float, anchor: int, b: int, c: int, method: str) -> Path:
    """[A]'s protocol: the curve between B and C, both matched to `anchor` by `method` (or naive)."""
    return root / "three" / f"{width_tag(width)}-a{anchor}-s{b}-s{c}-{method}"


def seed_pairs(cfg: ExperimentConfig) -> list[tuple[int, int]]:
    """all: every pair; consecutive: (s0, s1), (s1, s2), ... (neighbours share a model, so their
    barriers are correlated); disjoint: (s0, s1), (s2, s3), ... (no model in two pairs; an odd last seed
    is left out); or the listed pairs."""
    if cfg.pairs == "all":
        return list(itertools.combinations(cfg.seeds, 2))
    if cfg.pairs == "consecutive":
        return list(zip(cfg.seeds, cfg.seeds[1:]))
    if cfg.pairs == "disjoint":
        return list(zip(cfg.seeds[0::2], cfg.seeds[1::2]))
    return [tuple(p) for p in cfg.pairs]


def width_label(width: float) -> str:
    """A width multiplier as every report, table and plot prints it: `0.25×`, `1×`."""
    return f"{width:g}×"


def experiment_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path("outputs") / cfg.name


def load_experiment_settings(root: Path) -> ExperimentConfig:
    """The settings `lmcx run` recorded in `root` (experiment.yaml)."""
    path = root / EXPERIMENT_FILE
    if not path.is_file():
        raise LmcxError(f"{root} has no {EXPERIMENT_FILE}; pass the output folder of an `lmcx run`")
    try:
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise LmcxError(f"expected a mapping of settings, got {type(data).__name__}")
        return from_dict(ExperimentConfig, data, "")
    except (LmcxError, yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise LmcxError(f"{path} is unreadable ({e}); re-run `lmcx run` to rewrite it") from None

