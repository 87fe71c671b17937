"""`lmcx report`: gather an experiment's step outputs into report.md, summary.csv and plots.

Reads only files the steps wrote (train metrics.json, interpolate barrier.json, svd.json, lewc.json,
steps.json), so it can be re-run at any time, also on a partly finished experiment.

Units are the same in report.md and summary.csv: losses in nats, accuracy barriers in percentage
points (`acc_barrier_pp`), accuracies in percent (`acc_a_pct`). Every mean ± std carries the number of
pairs n it is over (summary.csv: `n_pairs`); a single value (n = 1) has no ±.
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
from .layout import (STEPS_FILE, load_experiment_settings, pair_dir, seed_pairs, three_dir, train_dir, width_label,
                     width_tag)

SPLITS = ("test", "train")


def _read(path: Path) -> dict[str, Any] | None:
    """A step's JSON output, or None when the step has not finished (or its file is unreadable)."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except LmcxError:
        return None


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def fmt(values: list[float | None], digits: int = 3, unit: str = "") -> str:
    """`mean ± std unit (n=N)` over the finite values; the bare value for one (no ±); `–` for none."""
    m, s, n = mean_std(values)
    if n == 0:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}{unit} (n={n})" if n > 1 else f"{m:.{digits}f}{unit}"


def md_table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def collect(root: Path, cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """One row per (width, pair, method, split) with barriers, plus SVD and LEWC figures of the pair."""
    rows: list[dict[str, Any]] = []
    for width in cfg.widths:
        for a, b in seed_pairs(cfg):
            barrier = _read(pair_dir(root, "interpolate", width, a, b) / "barrier.json")
            svd = _read(pair_dir(root, "svd", width, a, b) / "svd.json")
            for method in ["naive", *cfg.methods]:
                lewc = _read(pair_dir(root, "lewc", width, a, b, method) / "lewc.json")
                per = (barrier or {}).get("results", {}).get(method, {}) or {}
                check = per.get("calibration_check") or {}
                for split in SPLITS:
                    entry = per.get(split) or {}
                    raw, cal = entry.get("raw") or {}, entry.get("calibrated") or {}
                    row = {"width": width, "seed_a": a, "seed_b": b, "method": method, "split": split,
                           "loss_barrier": raw.get("loss_barrier"),
                           "acc_barrier_pp": _pct(raw.get("accuracy_barrier")),
                           "midpoint_loss_barrier": raw.get("midpoint_loss_barrier"),
                           "midpoint_acc_barrier_pp": _pct(raw.get("midpoint_accuracy_barrier")),
                           "calibrated_loss_barrier": cal.get("loss_barrier"),
                           "calibrated_midpoint_loss_barrier": cal.get("midpoint_loss_barrier"),
                           "calibration_reliable": check.get("reliable"),
                           "acc_a_pct": _pct(raw.get("accuracy_a")), "acc_b_pct": _pct(raw.get("accuracy_b"))}
                    row.update(_svd_figures(svd, method, cfg))
                    row.update(_lewc_figures(lewc))
                    rows.append(row)
    for row in rows:  # n of the mean the report prints for this row's (width, method, split)
        row["n_pairs"] = sum(r["loss_barrier"] is not None for r in _select(
            rows, width=row["width"], method=row["method"], split=row["split"]))
    return rows


def _svd_figures(svd: dict | None, method: str, cfg: ExperimentConfig) -> dict[str, Any]:
    if svd is None or (method != "naive" and method != (cfg.methods[0] if cfg.methods else None)):
        return {}
    key = "naive" if method == "naive" else "permuted"
    out: dict[str, Any] = {}
    for entry in svd["totals"]["mean_alignment"]:
        out[f"alignment_R_gamma{entry['gamma']:g}"] = entry[key]
    if method != "naive":
        out["l2_relative_reduction_pct"] = _pct(svd["totals"]["l2"]["parameters"]["relative_reduction"])
    return out


def _lewc_figures(lewc: dict | None) -> dict[str, Any]:
    if lewc is None:
        return {}
    out: dict[str, Any] = {"lewc_comparison": lewc["settings"].get("comparison", "raw")}
    for entry in lewc["summary"]:
        tag = f"{entry['lambda']:g}"
        for model in ("lewc", "llfc"):
            out[f"{model}_cos_lambda{tag}"] = entry[f"mean_cos_{model}"]
            out[f"{model}_rel_err_lambda{tag}"] = entry[f"mean_rel_err_{model}"]
            out[f"{model}_scale_free_err_lambda{tag}"] = entry.get(f"mean_rel_err_{model}_scale_free")
            out[f"{model}_beta_share_err_lambda{tag}"] = entry.get(f"mean_beta_share_err_{model}")
    return out


def _endpoint_accuracy(root: Path, cfg: ExperimentConfig, width: float) -> list[float | None]:
    return [_pct((_read(train_dir(root, width, s) / "metrics.json") or {}).get("test_accuracy"))
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
                             "loss_barrier": raw.get("loss_barrier"), "acc_barrier_pp": _pct(raw.get("accuracy_barrier")),
                             "calibrated_loss_barrier": cal.get("loss_barrier")})
    return rows


def _select(rows, **match) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def _pairing_note(cfg: ExperimentConfig) -> str:
    pairs = seed_pairs(cfg)
    shared = len({s for p in pairs for s in p}) < 2 * len(pairs)
    how = cfg.pairs if isinstance(cfg.pairs, str) else "listed"
    count = f"{len(pairs)} pair{'s' if len(pairs) != 1 else ''} per width"
    if not shared:
        return f"{count} ({how}: no model is in two pairs)"
    return (f"{count} ({how}: pairs share models, so their barriers are correlated and ± over "
            "pairs understates the spread between independent pairs; `pairs: disjoint` avoids this)")


def _methods_note(cfg: ExperimentConfig) -> str:
    used = set(cfg.methods) | set(cfg.three_models.methods if cfg.three_models else ())
    parts = []
    if "wm" in used or "svd" in cfg.analyses:
        parts.append(f"weight matching objective `{cfg.match.wm_objective}` ("
                     + ("trainable parameters only" if cfg.match.wm_objective == "params"
                        else "parameters and BatchNorm running statistics") + ")")
    if "ste" in used:
        s = cfg.match.ste
        cadence = f"every {s.eval_every} steps" if s.eval_every > 1 else ("every step" if s.eval_every else "once per epoch")
        parts.append(f"STE {s.epochs} epoch{'s' if s.epochs != 1 else ''}, batch {s.batch_size}, lr {s.lr:g}, "
                     f"candidate checked {cadence}")
    return "Matching: " + "; ".join(parts) + "." if parts else ""


def _calibration_size(root: Path, cfg: ExperimentConfig) -> int | None:
    for width in cfg.widths:
        for a, b in seed_pairs(cfg):
            barrier = _read(pair_dir(root, "interpolate", width, a, b) / "barrier.json")
            if barrier is not None:
                return (barrier.get("calibration") or {}).get("size")
    return None


def _calibration_flags(root: Path, cfg: ExperimentConfig, width: float) -> list[str]:
    flags = []
    for a, b in seed_pairs(cfg):
        results = (_read(pair_dir(root, "interpolate", width, a, b) / "barrier.json") or {}).get("results", {})
        for method, per in results.items():
            check = per.get("calibration_check") or {}
            if check and not check.get("reliable", True):
                flags.append(f"{method} s{a}–s{b} ({'; '.join(check['reasons'])})")
    return flags


def _lewc_line(cfg: ExperimentConfig, meth: str, sel: list[dict[str, Any]]) -> str:
    scale_free = any(r.get("lewc_comparison") == "scale_free" for r in sel)
    parts = []
    for lam in cfg.lewc.lambdas:
        tag = f"{lam:g}"
        col = lambda name: [r.get(f"{name}_lambda{tag}") for r in sel]  # noqa: E731
        if lam == 0.5:  # both predictions are multiples of the plain average there
            cos = f"cos {fmt(col('lewc_cos'))} (LEWC = LLFC at λ = ½ by construction)"
        else:
            cos = f"cos LEWC {fmt(col('lewc_cos'))}, LLFC {fmt(col('llfc_cos'))}"
        if scale_free:
            err = (f"error after fitting the scale LEWC {fmt(col('lewc_scale_free_err'))}, LLFC "
                   f"{fmt(col('llfc_scale_free_err'))}; |β/(α+β) − prediction| LEWC {fmt(col('lewc_beta_share_err'))}, "
                   f"LLFC {fmt(col('llfc_beta_share_err'))}")
        else:
            err = f"rel. error LEWC {fmt(col('lewc_rel_err'))}, LLFC {fmt(col('llfc_rel_err'))}"
        parts.append(f"λ = {tag}: {cos}; {err}")
    how = ("scale-free comparison: the network re-normalises every layer of θ(λ), so LEWC's (1 − λ)^ℓ shrinkage "
           "cannot show in the features' size" if scale_free else "plain relative errors")
    return f"LEWC ({meth} pairs, mean over layers; {how}): " + "; ".join(parts) + "."


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
    calib = _calibration_size(root, cfg)
    md += [f"{cfg.data.name}, {m.arch} (norm {m.norm}, bias {m.bias}), widths "
           f"{', '.join(width_label(w) for w in cfg.widths)}, seeds {', '.join(map(str, cfg.seeds))}; "
           f"{_pairing_note(cfg)}. Training: {cfg.train.optimizer} lr {cfg.train.lr:g}, weight decay "
           f"{cfg.train.weight_decay:g}, {cfg.train.epochs} epochs, batch {cfg.train.batch_size}; inputs standardised "
           f"with the {'published' if cfg.data.normalization == 'standard' else 'training split'}'s mean/std.",
           "",
           "Interpolation θ(λ) = (1 − λ) θ_A + λ θ_B (λ = 0 is A) on "
           f"{cfg.interpolate.lambdas or cfg.interpolate.points} points, norm fix `{cfg.interpolate.norm_fix}`"
           f"{' (auto: reset for BatchNorm models, none otherwise)' if cfg.interpolate.norm_fix == 'auto' else ''}; "
           f"calibration {'on' if cfg.interpolate.calibrate else 'off'} (temperature per model on the held-out "
           f"calibration split of {calib if calib is not None else '?'} training images). {_methods_note(cfg)}",
           "",
           "A figure over several pairs (or models) is their mean ± standard deviation with n written beside "
           "it; a figure without ± is a single pair's. Accuracy barriers are in percentage points (pp) and accuracies in percent, as in summary.csv "
           "(`acc_barrier_pp`, `acc_a_pct`).", ""]
    md += ["![barrier vs width](plots/barrier_vs_width.png)", ""]

    endpoint_accuracy = {width: _endpoint_accuracy(root, cfg, width) for width in cfg.widths}
    md += ["## Summary across widths (test split)", ""]
    header = ["width", "endpoint acc %"] + [f"{meth} loss barrier" for meth in methods]
    if cfg.interpolate.calibrate:
        header += [f"{meth} calibrated" for meth in methods]
    header += [f"{meth} acc barrier (pp)" for meth in methods]
    body = []
    for width in cfg.widths:
        cells = [width_label(width), fmt(endpoint_accuracy[width], 2)]
        test = lambda meth: _select(rows, width=width, method=meth, split="test")  # noqa: E731
        cells += [fmt([r["loss_barrier"] for r in test(meth)], 4) for meth in methods]
        if cfg.interpolate.calibrate:
            cells += [fmt([r["calibrated_loss_barrier"] for r in test(meth)], 4) for meth in methods]
        cells += [fmt([r["acc_barrier_pp"] for r in test(meth)], 2) for meth in methods]
        body.append(cells)
    md += md_table(header, body) + [""]

    for width in cfg.widths:
        w = width_tag(width)
        md += [f"## Width {width_label(width)}", "",
               f"Endpoint test accuracy (over models): {fmt(endpoint_accuracy[width], 2, ' %')}.", ""]
        header = ["method", "split", "loss barrier", "calibrated loss barrier", "acc barrier (pp)",
                  "midpoint loss barrier", "calibrated midpoint", "midpoint acc barrier (pp)"]
        columns = (("loss_barrier", 4), ("calibrated_loss_barrier", 4), ("acc_barrier_pp", 2),
                   ("midpoint_loss_barrier", 4), ("calibrated_midpoint_loss_barrier", 4), ("midpoint_acc_barrier_pp", 2))
        body = [[meth, split] + [fmt([r[key] for r in _select(rows, width=width, method=meth, split=split)], digits)
                                 for key, digits in columns]
                for meth in methods for split in SPLITS]
        md += md_table(header, body) + [""]
        flags = _calibration_flags(root, cfg, width) if cfg.interpolate.calibrate else []
        if flags:
            md += ["Fitted temperatures flagged unreliable (calibrated barriers of these curves are doubtful): "
                   + "; ".join(flags) + ".", ""]
        test_rows = _select(rows, width=width, split="test")
        if "svd" in cfg.analyses and cfg.methods:
            first = cfg.methods[0]
            naive = [r.get("alignment_R_gamma0.3") for r in test_rows if r["method"] == "naive"]
            perm = [r.get("alignment_R_gamma0.3") for r in test_rows if r["method"] == first]
            red = [r.get("l2_relative_reduction_pct") for r in test_rows if r["method"] == first]
            md += [f"SVD (k rule `{cfg.svd.k_rule}`): singular-vector alignment R(γ = 0.3) {fmt(naive)} without "
                   f"permutation, {fmt(perm)} with {first.upper()}; {first.upper()} shrinks ‖θ_A − θ_B‖ (over "
                   f"trainable parameters) by {fmt(red, 1, ' %')}.", ""]
        if "lewc" in cfg.analyses:
            for meth in methods[: 1 + bool(cfg.methods)]:
                md += [_lewc_line(cfg, meth, [r for r in test_rows if r["method"] == meth]), ""]
        md += [f"![curves at width {width_label(width)}](plots/curves_{w}.png)", ""]

    if three:
        md += ["## Three models matched to one anchor ([A]'s protocol)", "",
               "Barrier between π(B) and π(C), each matched to the anchor A only (test split); n = triples.", ""]
        body = []
        for width in cfg.widths:
            for meth in ["naive", *cfg.three_models.methods]:
                sel = _select(three, width=width, method=meth)
                body.append([width_label(width), meth, fmt([r["loss_barrier"] for r in sel], 4),
                             fmt([r["calibrated_loss_barrier"] for r in sel], 4), fmt([r["acc_barrier_pp"] for r in sel], 2)])
        md += md_table(["width", "method", "loss barrier", "calibrated loss barrier", "acc barrier (pp)"], body) + [""]

    failed = {k: v for k, v in steps.items() if v.get("status") in ("failed", "blocked")}
    md += ["## Steps", ""]
    done = sum(v.get("status") in ("done", "skipped") for v in steps.values())
    md.append(f"{done} of {len(steps)} steps finished.")
    if failed:
        md += [""] + md_table(["step", "status", "reason"],
                              [[k, v["status"], v.get("reason", "").replace("|", "/")] for k, v in failed.items()])
    md.append("")
    path = root / "report.md"
    write_text(path, "\n".join(md))
    return path
