"""Names on disk: checkpoint files, the run a path stands for, and every default output directory.

A command given no `--out` writes to outputs/<command>/<readable>-<hash>:
  readable  what the run is about, short: the models' run names (their shared start written once, a
            hash already in them left out) and what tells runs of one pair apart (method, labels, ...)
  hash      6 hex digits of the settings that change results (the ones rundir compares before reusing a
            directory, input paths as the locations they name) and differ from lmcx's defaults: runs
            whose settings differ never share a default directory.
Experiments (`lmcx run`) are the exception: outputs/<name>, so that adding a width or seed to the YAML
extends the same folder; their steps' directories are in layout.py.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import InterpolateConfig, LewcConfig, MatchConfig, SvdConfig, TrainJob, to_dict
from .rundir import INPUT_PATH_KEYS, input_location, result_settings

MODEL_FILE = "model.safetensors"
PERMUTED_FILE = "permuted.safetensors"  # B permuted into A's frame, written by `lmcx match`
OUTPUTS = Path("outputs")
HASH_CHARS = 6
MAX_READABLE = 60  # characters of the readable part; the hash keeps longer names apart
_HASH_SUFFIX = re.compile(rf"-[0-9a-f]{{{HASH_CHARS}}}$")


def run_name(path: str | Path) -> str:
    """The run a checkpoint path stands for: a run directory's name, the folder of its model.safetensors
    or permuted.safetensors, or a file's stem."""
    p = Path(path)
    if p.is_dir() or p.suffix != ".safetensors":
        return p.name
    return p.parent.name if p.name in (MODEL_FILE, PERMUTED_FILE) else p.stem


def joined(paths: Sequence[str | Path]) -> str:
    """The run names of `paths` in one readable part: `digits-mlp-none-w1-s0` and `...-s1` give
    `digits-mlp-none-w1-s0-s1` (the parts they start with are written once)."""
    names = [_HASH_SUFFIX.sub("", run_name(p)).split("-") for p in paths]
    shared = 0
    while all(len(n) > shared + 1 and n[shared] == names[0][shared] for n in names):
        shared += 1
    return "-".join(names[0][:shared] + [part for n in names for part in n[shared:]])


def settings_hash(resolved: dict[str, Any], defaults: dict[str, Any] | None = None,
                  ignore: Iterable[str] = ()) -> str:
    """Hash of the result-relevant settings of `resolved` that differ from `defaults` (same shape)."""
    given = result_settings(_located(resolved), ignore)
    usual = result_settings(defaults or {}, ignore)
    kept = {k: v for k, v in given.items() if k not in usual or usual[k] != v}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _located(resolved: dict[str, Any]) -> dict[str, Any]:
    """Input paths as the locations they name (rundir.input_location), as rundir.check_settings compares them."""
    out = dict(resolved)
    for key in INPUT_PATH_KEYS:
        if key in out:
            value = out[key]
            out[key] = [input_location(v) for v in value] if isinstance(value, list) else input_location(value)
    return out


def default_dir(command: str, readable: str, resolved: dict[str, Any], defaults: dict[str, Any] | None = None,
                ignore: Iterable[str] = ()) -> Path:
    readable = readable[:MAX_READABLE].strip("-") or command
    return OUTPUTS / command / f"{readable}-{settings_hash(resolved, defaults, ignore)}"


def train_dir(job: TrainJob) -> Path:
    """outputs/train/<dataset>-<arch>-<norm>-w<width>-s<seed>-<hash>."""
    m = job.model
    return default_dir("train", f"{job.data.name}-{path_safe(m.arch)}-{m.norm}-w{m.width:g}-s{job.seed}",
                       to_dict(job), to_dict(TrainJob()))


def import_dir(job: TrainJob, weights: str | Path, resolved: dict[str, Any]) -> Path:
    """outputs/import/<dataset>-<arch>-<weights file's stem>-<hash>."""
    return default_dir("import", f"{job.data.name}-{path_safe(job.model.arch)}-{Path(weights).stem}", resolved)


def path_safe(arch: str) -> str:
    """An architecture name in a folder name: a factory's `module:callable` without the colon."""
    return arch.replace(":", ".")


def match_dir(a: str | Path, bs: Sequence[str | Path], cfg: MatchConfig, resolved: dict[str, Any]) -> Path:
    """outputs/match/<A and the B's>-<method | merge-many>-<hash>."""
    tag = cfg.method if len(bs) == 1 or cfg.many == "anchor" else "merge-many"
    return default_dir("match", f"{joined([a, *bs])}-{tag}", resolved, {"match": to_dict(MatchConfig())})


def interpolate_dir(a: str | Path, b: str | Path, labels: Sequence[str], norm_fix: str,
                    resolved: dict[str, Any], ignore: Iterable[str] = ()) -> Path:
    """outputs/interpolate/<A and the first B>-<labels>[-<norm fix unless auto>]-<hash>."""
    parts = [joined([a, b]), *labels] + ([norm_fix] if norm_fix != "auto" else [])
    return default_dir("interpolate", "-".join(parts), resolved, {"interpolate": to_dict(InterpolateConfig())},
                       ignore)


def svd_dir(a: str | Path, b: str | Path, resolved: dict[str, Any]) -> Path:
    """outputs/svd/<A and B>-<hash>."""
    return default_dir("svd", joined([a, b]), resolved, {"svd": to_dict(SvdConfig())})


def lewc_dir(a: str | Path, b: str | Path, permuted: bool, resolved: dict[str, Any]) -> Path:
    """outputs/lewc/<A and B>-<naive | permuted>-<hash>."""
    return default_dir("lewc", f"{joined([a, b])}-{'permuted' if permuted else 'naive'}", resolved,
                       {"lewc": to_dict(LewcConfig()), "norm_fix": "auto"})
