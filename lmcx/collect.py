"""`lmcx collect`: one table of every run below some folders, standalone or part of an experiment.

A run directory is recognised by the files its step writes (the marker, written last, says it finished):

  kind         marker         also there                    figures (test split)
  experiment   report.md      experiment.yaml, steps.json   steps_done, steps_failed, steps_total
  train        metrics.json   meta.json                     test_accuracy, test_loss
  match        metrics.json   permutation.json (or b1/ ...) l2_before, l2_after (per B with several)
  interpolate  barrier.json   curve.csv, logits             per label: loss_barrier, calibrated_loss_barrier
                                                            (once calibrated), accuracy_barrier
  svd          svd.json       svd.csv                       l2_before, l2_after (over parameters),
                                                            alignment_R_gamma{γ}_naive / _permuted
  lewc         lewc.json      lewc.csv                      lewc_cos_lambda{λ}, llfc_cos_lambda{λ}

`lmcx calibrate` adds calibrated barriers to an interpolate run, so it has no kind of its own.
A directory holding a step's config.yaml (or lock) but not its marker is `unfinished` (running, or
interrupted); one whose marker cannot be read, or lacks the figures, is `broken`. Every row has the
same columns: kind, path, status, the settings (from config.yaml / experiment.yaml, dotted keys) whose
values differ between rows, the figures, and a note.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import LmcxError
from .layout import EXPERIMENT_FILE, STEPS_FILE
from .io import read_json, read_yaml, shorten
from .rundir import CONFIG_FILE, NON_RESULT_KEYS, _flatten

REPORT_FILE = "report.md"
KINDS = ("experiment", "train", "match", "interpolate", "svd", "lewc")
MARKERS = {"train": "metrics.json", "match": "metrics.json", "interpolate": "barrier.json", "svd": "svd.json",
           "lewc": "lewc.json"}
# A file only one kind writes, so its presence names the kind even before the marker exists.
SIGNATURES = [(EXPERIMENT_FILE, "experiment"), ("barrier.json", "interpolate"), ("svd.json", "svd"),
              ("lewc.json", "lewc"), ("meta.json", "train"), ("permutation.json", "match"),
              ("b1/permutation.json", "match")]
SETTINGS_KEYS = [("match", "match"), ("interpolate", "interpolate"), ("svd", "svd"), ("lewc", "lewc"),
                 ("train", "train")]  # top-level key of a step's config.yaml -> its kind


def collect(paths: list[str | Path]) -> list[dict[str, Any]]:
    """One row per run directory below `paths`, ordered by kind then path; every row has the same keys."""
    runs = [read_run(d) for d in find_run_dirs(paths)]
    runs.sort(key=lambda r: (KINDS.index(r["kind"]) if r["kind"] in KINDS else len(KINDS), r["path"]))
    differing = differing_settings([r["settings"] for r in runs])
    figures: list[str] = []
    for run in runs:
        figures.extend(k for k in run["figures"] if k not in figures)
    return [{"kind": r["kind"], "path": r["path"], "status": r["status"],
             **{k: r["settings"].get(k) for k in differing},
             **{k: r["figures"].get(k) for k in figures}, "note": r["note"]} for r in runs]


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    found: list[Path] = []
    for root in map(Path, paths):
        if not root.is_dir():
            raise LmcxError(f"{root} is not a directory; pass folders that hold lmcx outputs")
        for here, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if _is_run_dir(set(files)):
                found.append(Path(here))
    unique: dict[Path, Path] = {}
    for path in found:  # overlapping PATHs (or one given twice, relative and absolute) list a run once
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _is_run_dir(files: set[str]) -> bool:
    # (a match of several B's keeps b1/, b2/ without any of these inside its own run directory)
    return bool(files & {EXPERIMENT_FILE, CONFIG_FILE, ".lock", *MARKERS.values()})


def read_run(path: Path) -> dict[str, Any]:
    """kind, path, status (finished | unfinished | failed | broken), flat settings, figures, note."""
    settings, note = _read_settings(path)
    kind = _kind(path, settings)
    run = {"kind": kind, "path": str(path), "status": "finished", "settings": settings, "figures": {},
           "note": note}
    if kind == "experiment":
        run.update(_experiment_status(path))
        return run
    marker = MARKERS.get(kind)
    if marker is None or not (path / marker).is_file():
        run.update(status="unfinished", note=f"no {marker or 'marker file'} yet (running or interrupted)")
        return run
    try:
        run["figures"] = FIGURES[kind](read_json(path / marker))
    except LmcxError as e:
        run.update(status="broken", note=str(e))
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        run.update(status="broken", note=f"{path / marker} lacks the expected figures ({type(e).__name__}: {e})")
    return run


def _read_settings(path: Path) -> tuple[dict[str, Any], str]:
    """The run's recorded settings, flattened to dotted keys without the ones that never change a result."""
    file = path / (EXPERIMENT_FILE if (path / EXPERIMENT_FILE).is_file() else CONFIG_FILE)
    if not file.is_file():
        return {}, ""
    try:
        data = read_yaml(file)
    except (LmcxError, yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        return {}, f"{file} is unreadable ({shorten(str(e)) if isinstance(e, LmcxError) else type(e).__name__})"
    if not isinstance(data, dict):
        return {}, f"{file} is not a mapping of settings"
    # an experiment's model.width is replaced by each of its `widths`: not a setting of its results
    ignored = NON_RESULT_KEYS | ({"model.width"} if file.name == EXPERIMENT_FILE else set())
    return {k: _cell(v) for k, v in _flatten(data).items() if k not in ignored}, ""


def _cell(value: Any) -> Any:
    """A list setting as comma-separated text: one table cell, one CSV field."""
    if isinstance(value, list):
        return ", ".join(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)
    return value


def differing_settings(settings: list[dict[str, Any]]) -> list[str]:
    """Keys with at least two different values among the runs that record them, sorted."""
    values: dict[str, set[str]] = {}
    for s in settings:
        for key, value in s.items():
            values.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    return sorted(k for k, v in values.items() if len(v) > 1)


def _kind(path: Path, settings: dict[str, Any]) -> str:
    for file, kind in SIGNATURES:
        if (path / file).is_file():
            return kind
    for prefix, kind in SETTINGS_KEYS:
        if any(k.startswith(prefix + ".") for k in settings):
            return kind
    return "unknown"


def _experiment_status(path: Path) -> dict[str, Any]:
    steps_file, report = path / STEPS_FILE, path / REPORT_FILE
    if not steps_file.is_file():
        return {"status": "unfinished", "note": f"no {STEPS_FILE} yet (no step has ended)"}
    try:
        steps = read_json(steps_file)
        statuses = [v["status"] for v in steps.values()]
    except LmcxError as e:
        return {"status": "broken", "note": str(e)}
    except (AttributeError, KeyError, TypeError):
        return {"status": "broken", "note": f"{steps_file} is not a record of steps"}
    failed = [k for k, v in steps.items() if v["status"] in ("failed", "blocked")]
    figures = {"steps_done": sum(s in ("done", "skipped") for s in statuses), "steps_failed": len(failed),
               "steps_total": len(statuses)}
    if failed:
        return {"status": "failed", "figures": figures,
                "note": f"{failed[0]}: {steps[failed[0]].get('reason', '')}" + (
                    f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")}
    # report.md is written after the last step: older than steps.json means a run is under way or stopped
    if not report.is_file() or report.stat().st_mtime < steps_file.stat().st_mtime:
        return {"status": "unfinished", "figures": figures, "note": f"{REPORT_FILE} not written after the last step"}
    return {"status": "finished", "figures": figures}


# ---------------------------------------------------------------------------------------------
# Headline figures of each kind, from its marker file


def _train_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"]}


def _match_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    if "l2_before" in metrics:  # one B
        return {"l2_before": metrics["l2_before"]["total"], "l2_after": metrics["l2_after"]["total"]}
    out: dict[str, Any] = {}
    for i, entry in enumerate(metrics["outputs"], 1):
        out[f"l2_before_b{i}"], out[f"l2_after_b{i}"] = entry["l2_before"]["total"], entry["l2_after"]["total"]
    return out


def _interpolate_figures(barrier: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tests = {label: per["test"] for label, per in barrier["results"].items()}
    for label, test in tests.items():
        out[f"loss_barrier_{label}"] = test["raw"]["loss_barrier"]
    for label, test in tests.items():
        out[f"calibrated_loss_barrier_{label}"] = (test.get("calibrated") or {}).get("loss_barrier")
    for label, test in tests.items():
        out[f"accuracy_barrier_{label}"] = test["raw"]["accuracy_barrier"]
    return out


def _svd_figures(svd: dict[str, Any]) -> dict[str, Any]:
    l2 = svd["totals"]["l2"]["parameters"]
    out: dict[str, Any] = {"l2_before": l2["a_b"], "l2_after": l2["a_permuted_b"]}
    for entry in svd["totals"]["mean_alignment"]:
        out[f"alignment_R_gamma{entry['gamma']:g}_naive"] = entry["naive"]
        out[f"alignment_R_gamma{entry['gamma']:g}_permuted"] = entry["permuted"]
    return out


def _lewc_figures(lewc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for entry in lewc["summary"]:
        out[f"lewc_cos_lambda{entry['lambda']:g}"] = entry["mean_cos_lewc"]
        out[f"llfc_cos_lambda{entry['lambda']:g}"] = entry["mean_cos_llfc"]
    return out


FIGURES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train": _train_figures, "match": _match_figures, "interpolate": _interpolate_figures, "svd": _svd_figures,
    "lewc": _lewc_figures}
