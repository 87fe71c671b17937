"""Checkpoints in, outputs out: `interpolate_checkpoints` (`lmcx interpolate`) and `calibrate_dir`
(`lmcx calibrate`).

Outputs in the output directory:
  logits.safetensors  every logits tensor of the curves (curves.py)
  curve.csv           label, lambda, split, loss, accuracy (+ temperature, calibrated_loss once calibrated;
                      calibrated runs add the `calib` split's rows)
  curve.png           loss and accuracy against λ, test and train, one colour per label
  tensorboard/        the curves and barriers as TensorBoard events, with track: tensorboard (tracking.py)
  config.yaml         the resolved settings (written by the caller's run directory logic when present)
  barrier.json        written last (the completeness marker): settings actually used and, per label
                      and split, `raw` and `calibrated` barriers (see `barrier.barrier_metrics`)

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
  results[label]["temperatures"] = T per λ once calibrated, and results[label]["calibration_check"] =
  {reliable, reasons, calib_size, rule} (calibrate.calibration_check: small split, or an endpoint whose
  calibrated test loss is above its raw loss).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import InterpolateConfig, to_dict
from ..errors import LmcxError
from ..io import read_json, read_yaml, write_csv, write_json, write_yaml
from ..tracking import EVENTS_DIR, check_tracker, open_tracker
from .barrier import summarize
from .curves import CURVE_SPLITS, LOGITS_FILE, Curves, evaluate_curves, load_curves, save_curves
from .norm_fix import NORM_FIX_NOTES, resolve_norm_fix
from .path import LAMBDA_CONVENTION, lambda_grid

BARRIER_FILE = "barrier.json"
OUTPUTS = [BARRIER_FILE, "curve.csv", "curve.png", LOGITS_FILE, EVENTS_DIR]


def fit_temperatures(curves: Curves, split: str = "calib") -> dict[str, list[float]]:
    """T per label and λ, fitted on `split`'s cached logits."""
    from ..calibrate import fit_temperature

    y = curves.targets[split]
    return {label: [fit_temperature(z, y) for z in curves.logits[label][split]] for label in curves.labels}


def _title(settings: dict[str, Any]) -> str:
    ck = settings.get("checkpoints", {})
    a = Path(ck.get("a", "A")).parent.name or "A"
    # B's in the legend's order, each named by its label
    bs = [f"{b.get('label', 'B')} = {Path(b.get('path', 'B')).parent.name}" for b in ck.get("b", [])]
    return f"A = {a}; B: {', '.join(bs) or 'B'}   (norm fix: {settings.get('norm_fix')}, λ = 0 is A)"


def write_outputs(out_dir: Path, curves: Curves, settings: dict[str, Any],
                  temperatures: dict[str, list[float]] | None, track: str = "none") -> dict[str, Any]:
    """curve.csv, curve.png, the tracker's events (`track`: lmcx/tracking.py), then barrier.json (last).
    Returns the barrier dict."""
    from ..collect import FIGURES
    from ..plots import plot_interpolation

    rows, results, series = summarize(curves, temperatures)
    write_csv(out_dir / "curve.csv", rows)
    plot_interpolation(curves.lambdas, series, out_dir / "curve.png", title=_title(settings),
                       splits=[s for s in CURVE_SPLITS if s in curves.targets])
    barrier = {**settings, "results": results}
    if track != "none":  # a recalibration adds an events file: the earlier ones stay, the finished run lists them
        with open_tracker(track, out_dir) as tracker:
            for label, splits in series.items():
                for split, values in splits.items():
                    tracker.curve(label, split, curves.lambdas, values)
            tracker.final(FIGURES["interpolate"](barrier))
    write_json(out_dir / BARRIER_FILE, barrier)
    return barrier


def _load_models(a_path, b_paths: Sequence, labels: Sequence[str], perms: Sequence | None, device: torch.device):
    from ..checkpoint import build_from_checkpoint, check_compatible, load_checkpoint, resolve_model_path
    from ..models import permutation_spec
    from ..permutation.spec import apply_permutation, load_permutation_file

    ckpt_a = load_checkpoint(a_path)
    model_a = build_from_checkpoint(ckpt_a, device).eval()
    models_b: dict[str, nn.Module] = {}
    used = []
    for label, b_path, perm_path in zip(labels, b_paths, perms or [None] * len(b_paths)):
        ckpt_b = load_checkpoint(b_path)
        check_compatible(ckpt_a, ckpt_b)
        if perm_path is not None:
            spec = permutation_spec(ckpt_b.model, ckpt_b.in_shape, ckpt_b.num_classes)
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
                            device: str = "auto", perms: list | None = None, data_root=None,
                            track: str = "none") -> dict[str, Any]:
    """Interpolate checkpoint A with each B (optionally permuted by its permutation file), evaluate every
    θ(λ), optionally calibrate, and write the outputs (module docstring) into `out_dir`. Returns the
    barrier dict (the content of barrier.json). Does not skip or lock: callers use `rundir.run_once`."""
    from ..data import load_dataset
    from ..threads import thread_info
    from ..train import resolve_device

    started = time.perf_counter()
    check_tracker(track)
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
        "threads": thread_info(),
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
    return write_outputs(out_dir, curves, settings, temperatures, track)


def _calibrate(curves: Curves) -> tuple[dict[str, list[float]], dict[str, Any]]:
    from ..calibrate import METHOD

    t0 = time.perf_counter()
    temperatures = fit_temperatures(curves, "calib")
    info = {"calibrated": True, "split": "calib", "size": int(len(curves.targets["calib"])), "method": METHOD,
            "seconds": time.perf_counter() - t0}
    return temperatures, info


def calibrate_dir(out_dir, device: str = "auto", data_root=None, track: str = "none") -> dict[str, Any]:
    """Calibrate a finished interpolation directory from its cached logits: fit T per label and λ on the
    calibration split (computing its logits once, from the recorded checkpoints, if the cache lacks them),
    then rewrite logits.safetensors, curve.csv, curve.png and barrier.json (last). Returns the barrier dict.
    Does not lock: callers hold `rundir.claim`."""
    from ..data import load_dataset
    from ..train import resolve_device

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
            record = read_yaml(config_path)
        except (LmcxError, yaml.YAMLError, OSError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("interpolate"), dict):
            record["interpolate"]["calibrate"] = True
            write_yaml(config_path, record)
    return write_outputs(out_dir, curves, settings, temperatures, track)


def is_calibrated(out_dir) -> bool:
    path = Path(out_dir) / BARRIER_FILE
    if not path.is_file():
        return False
    try:
        return bool(read_json(path).get("calibration", {}).get("calibrated"))
    except (LmcxError, AttributeError):
        return False
