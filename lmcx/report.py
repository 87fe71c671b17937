"""`lmcx report`: gather an experiment's step outputs into report.md, summary.csv and plots.

Reads only files the steps wrote (train metrics.json, interpolate barrier.json, svd.json, lewc.json,
steps.json), so it can be re-run at any time, also on a partly finished experiment.
"""
from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path
from typing import Any

from .config import ExperimentConfig
from .errors import LmcxError
from .io import read_json, write_csv, write_text
from .layout import STEPS_FILE, load_experiment_settings, pair_dir, seed_pairs, three_dir, train_dir, width_tag

SPLITS = ("test", "train")


def _read(path: Path) -> dict[str, Any] | None:
    """A step's JSON output, or None when the step has not finished (or its file is unreadable)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except LmcxError:
        return None


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def fmt(values: list[float | None], scale: float = 1.0, digits: int = 3) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "–"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if n > 1 else f"{m * scale:.{digits}f}"


def collect(root: Path, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """One row per (width, pair, method, split) with barriers, plus SVD and LEWC figures of the pair."""
    rows: list[dict[str, Any]] = []
    for width in cfg.widths:
        for a, b in seed_pairs(cfg):
            barrier = _read(pair_dir(root, "interpolate", width, a, b) / "barrier.json")
            svd = _read(pair_dir(root, "svd", width, a, b) / "svd.json")
            for method in ["naive", *cfg.methods]:
                lewc = _read(pair_dir(root, "lewc", width, a, b, method) / "lewc.json")
                for split in SPLITS:
                    entry = ((barrier or {}).get("results", {}).get(method, {}) or {}).get(split) or {}
                    raw, cal = entry.get("raw") or {}, entry.get("calibrated") or {}
                    row = {"width": width, "seed_a": a, "seed_b": b, "method": method, "split": split,
                           "loss_barrier": raw.get("loss_barrier"), "accuracy_barrier": raw.get("accuracy_barrier"),
                           "midpoint_loss_barrier": raw.get("midpoint_loss_barrier"),
                           "midpoint_accuracy_barrier": raw.get("midpoint_accuracy_barrier"),
                           "calibrated_loss_barrier": cal.get("loss_barrier"),
                           "calibrated_midpoint_loss_barrier": cal.get("midpoint_loss_barrier"),
                           "accuracy_a": raw.get("accuracy_a"), "accuracy_b": raw.get("accuracy_b")}
                    row.update(_svd_figures(svd, method, cfg))
                    row.update(_lewc_figures(lewc))
                    rows.append(row)
    return rows


def _svd_figures(svd: dict | None, method: str, cfg: ExperimentConfig) -> dict[str, Any]:
    if svd is None or (method != "naive" and method != (cfg.methods[0] if cfg.methods else None)):
        return {}
    key = "naive" if method == "naive" else "permuted"
    out: dict[str, Any] = {}
    for entry in svd["totals"]["mean_alignment"]:
        out[f"alignment_R_gamma{entry['gamma']:g}"] = entry[key]
    if method != "naive":
        out["l2_relative_reduction"] = svd["totals"]["l2"]["parameters"]["relative_reduction"]
    return out


def _lewc_figures(lewc: dict | None) -> dict[str, Any]:
    if lewc is None:
        return {}
    out: dict[str, Any] = {}
    for entry in lewc["summary"]:
        tag = f"{entry['lambda']:g}"
        out[f"lewc_cos_lambda{tag}"] = entry["mean_cos_lewc"]
        out[f"llfc_cos_lambda{tag}"] = entry["mean_cos_llfc"]
        out[f"lewc_rel_err_lambda{tag}"] = entry["mean_rel_err_lewc"]
        out[f"llfc_rel_err_lambda{tag}"] = entry["mean_rel_err_llfc"]
    return out


def _endpoint_accuracy(root: Path, cfg: ExperimentConfig, width: float) -> list[float | None]:
    return [(_read(train_dir(root, width, s) / "metrics.json") or {}).get("test_accuracy")
            for s in cfg.seeds]


def _three_model_rows(root: Path, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    t = cfg.three_models
    if t is None:
        return []
    rows = []
    for width in cfg.widths:
        for b, c in itertools.combinations(t.others, 2):
            for method in ["naive", *t.methods]:
                path = three_dir(root, width, t.anchor, b, c, method) / "barrier.json"
                entry = ((_read(path) or {}).get("results", {}).get(method) or {}).get("test") or {}
                raw, cal = entry.get("raw") or {}, entry.get("calibrated") or {}
                rows.append({"width": width, "anchor": t.anchor, "seed_b": b, "seed_c": c, "method": method,
                             "loss_barrier": raw.get("loss_barrier"), "accuracy_barrier": raw.get("accuracy_barrier"),
                             "calibrated_loss_barrier": cal.get("loss_barrier")})
    return rows


def _select(rows, **match) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def write_report(root: str | Path) -> Path:
    """Write report.md, summary.csv (and three_models.csv) and plots/ under `root`; returns report.md's path."""
    from .plots import plot_barrier_vs_width, plot_curves_per_width

    root = Path(root)
    cfg = load_experiment_settings(root)
    rows = collect(root, cfg)
    three = _three_model_rows(root, cfg)
    steps = _read(root / STEPS_FILE) or {}
    methods = ["naive", *cfg.methods]
    write_csv(root / "summary.csv", rows)
    if three:
        write_csv(root / "three_models.csv", three)

    plots = root / "plots"
    plot_barrier_vs_width(rows, methods, plots / "barrier_vs_width.png")
    for width in cfg.widths:
        files = [pair_dir(root, "interpolate", width, a, b) / "curve.csv" for a, b in seed_pairs(cfg)]
        plot_curves_per_width([f for f in files if f.is_file()], methods, width,
                              plots / f"curves_{width_tag(width)}.png")

    md = [f"# {cfg.name}", ""]
    m = cfg.model
    md += [f"{cfg.data.name}, {m.arch} (norm {m.norm}, bias {m.bias}), widths {', '.join(f'{w:g}' for w in cfg.widths)}, "
           f"seeds {', '.join(map(str, cfg.seeds))}, pairs {len(seed_pairs(cfg))} per width. "
           f"Training: {cfg.train.optimizer} lr {cfg.train.lr:g}, weight decay {cfg.train.weight_decay:g}, "
           f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}.",
           "",
           "Interpolation θ(λ) = (1 − λ) θ_A + λ θ_B (λ = 0 is A) on "
           f"{cfg.interpolate.lambdas or cfg.interpolate.points} points, norm fix `{cfg.interpolate.norm_fix}`"
           f"{' (auto: reset for BatchNorm models, none otherwise)' if cfg.interpolate.norm_fix == 'auto' else ''}; "
           f"calibration {'on' if cfg.interpolate.calibrate else 'off'} (temperature per model on the held-out "
           f"calibration split of {cfg.data.calib_size} training images). Values are mean ± std over pairs; "
           "barriers of accuracy are in percentage points.", ""]
    md += ["![barrier vs width](plots/barrier_vs_width.png)", ""]

    endpoint_accuracy = {width: _endpoint_accuracy(root, cfg, width) for width in cfg.widths}
    md += ["## Summary across widths (test split)", ""]
    header = ["width", "endpoint acc %"] + [f"{meth} loss barrier" for meth in methods]
    if cfg.interpolate.calibrate:
        header += [f"{meth} calibrated" for meth in methods]
    header += [f"{meth} acc barrier" for meth in methods]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for width in cfg.widths:
        cells = [f"{width:g}", fmt(endpoint_accuracy[width], 100, 2)]
        test = lambda meth: _select(rows, width=width, method=meth, split="test")  # noqa: E731
        cells += [fmt([r["loss_barrier"] for r in test(meth)], 1, 4) for meth in methods]
        if cfg.interpolate.calibrate:
            cells += [fmt([r["calibrated_loss_barrier"] for r in test(meth)], 1, 4) for meth in methods]
        cells += [fmt([r["accuracy_barrier"] for r in test(meth)], 100, 2) for meth in methods]
        md.append("| " + " | ".join(cells) + " |")
    md.append("")

    for width in cfg.widths:
        w = width_tag(width)
        md += [f"## Width {width:g}", "", f"Endpoint test accuracy: {fmt(endpoint_accuracy[width], 100, 2)} %.", ""]
        header = ["method", "split", "loss barrier", "calibrated loss barrier", "acc barrier (pp)",
                  "midpoint loss barrier", "calibrated midpoint", "midpoint acc barrier (pp)"]
        md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for meth in methods:
            for split in SPLITS:
                sel = _select(rows, width=width, method=meth, split=split)
                md.append("| " + " | ".join([meth, split, fmt([r["loss_barrier"] for r in sel], 1, 4),
                                              fmt([r["calibrated_loss_barrier"] for r in sel], 1, 4),
                                              fmt([r["accuracy_barrier"] for r in sel], 100, 2),
                                              fmt([r["midpoint_loss_barrier"] for r in sel], 1, 4),
                                              fmt([r["calibrated_midpoint_loss_barrier"] for r in sel], 1, 4),
                                              fmt([r["midpoint_accuracy_barrier"] for r in sel], 100, 2)]) + " |")
        md.append("")
        test_rows = _select(rows, width=width, split="test")
        if "svd" in cfg.analyses and cfg.methods:
            naive = [r.get("alignment_R_gamma0.3") for r in test_rows if r["method"] == "naive"]
            perm = [r.get("alignment_R_gamma0.3") for r in test_rows if r["method"] == cfg.methods[0]]
            red = [r.get("l2_relative_reduction") for r in test_rows if r["method"] == cfg.methods[0]]
            md += [f"SVD: singular-vector alignment R(γ = 0.3) {fmt(naive)} without permutation, {fmt(perm)} with "
                   f"{cfg.methods[0].upper()}; {cfg.methods[0].upper()} shrinks ‖θ_A − θ_B‖ by {fmt(red, 100, 1)} %.", ""]
        if "lewc" in cfg.analyses:
            for meth in methods[: 1 + bool(cfg.methods)]:
                sel = [r for r in test_rows if r["method"] == meth]
                parts = []
                for lam in cfg.lewc.lambdas:
                    tag = f"{lam:g}"
                    parts.append(f"λ = {tag}: cos LEWC {fmt([r.get(f'lewc_cos_lambda{tag}') for r in sel])}, "
                                 f"LLFC {fmt([r.get(f'llfc_cos_lambda{tag}') for r in sel])}; rel. error LEWC "
                                 f"{fmt([r.get(f'lewc_rel_err_lambda{tag}') for r in sel])}, LLFC "
                                 f"{fmt([r.get(f'llfc_rel_err_lambda{tag}') for r in sel])}")
                md += [f"LEWC ({meth} pair, mean over layers): " + "; ".join(parts) + ".", ""]
        md += [f"![curves at width {width:g}](plots/curves_{w}.png)", ""]

    if three:
        md += ["## Three models matched to one anchor ([A]'s protocol)", "",
               "Barrier between π(B) and π(C), each matched to the anchor A only (test split).", "",
               "| width | method | loss barrier | calibrated loss barrier | acc barrier (pp) |", "|---|---|---|---|---|"]
        for width in cfg.widths:
            for meth in ["naive", *cfg.three_models.methods]:
                sel = _select(three, width=width, method=meth)
                md.append(f"| {width:g} | {meth} | {fmt([r['loss_barrier'] for r in sel], 1, 4)} | "
                          f"{fmt([r['calibrated_loss_barrier'] for r in sel], 1, 4)} | "
                          f"{fmt([r['accuracy_barrier'] for r in sel], 100, 2)} |")
        md.append("")

    failed = {k: v for k, v in steps.items() if v.get("status") in ("failed", "blocked")}
    md += ["## Steps", ""]
    done = sum(v.get("status") in ("done", "skipped") for v in steps.values())
    md.append(f"{done} of {len(steps)} steps finished.")
    if failed:
        md += ["", "| step | status | reason |", "|---|---|---|"]
        md += [f"| {k} | {v['status']} | {v.get('reason', '').replace('|', '/')} |" for k, v in failed.items()]
    md.append("")
    path = root / "report.md"
    write_text(path, "\n".join(md))
    return path
