"""Plots, readable at a glance: one colour per method everywhere, direct labels, headless (Agg).

Sections: interpolation curves, SVD analysis, LEWC, experiment report. Each figure is written
atomically, like every other output.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_path  # noqa: E402

METHOD_COLORS = {"naive": "#7f7f7f", "wm": "#1f77b4", "am": "#ff7f0e", "ste": "#2ca02c",
                 "merge-many": "#9467bd"}
FALLBACK_COLORS = ["#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def method_color(label: str, index: int = 0) -> str:
    return METHOD_COLORS.get(label.split(" ")[0].lower(), FALLBACK_COLORS[index % len(FALLBACK_COLORS)])


def save_figure(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=130, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Interpolation curves (owner: interpolate)


def plot_interpolation(lambdas, series: dict, path: str | Path, *, title: str = "",
                       splits=("test", "train")) -> None:
    """Loss (top) and accuracy (bottom) against λ, one column per split, one colour per label.

    `series[label][split]` = {"loss": [...], "accuracy": [...] (fractions), "calibrated_loss": [...] or None}.
    Raw loss solid with markers, calibrated loss dashed in the same colour; λ = 0 is A, λ = 1 is B."""
    from matplotlib.lines import Line2D

    splits = list(splits)
    fig, axes = plt.subplots(2, len(splits), figsize=(5.0 * len(splits), 7.0), sharex=True, squeeze=False)
    any_calibrated = False
    handles = []
    for i, (label, per_split) in enumerate(series.items()):
        color = method_color(label, i)
        handles.append(Line2D([], [], color=color, lw=2.2, marker="o", ms=4, label=label))
        for j, split in enumerate(splits):
            d = per_split.get(split)
            if d is None:
                continue
            ax_loss, ax_acc = axes[0, j], axes[1, j]
            ax_loss.plot(lambdas, d["loss"], color=color, lw=2.2, marker="o", ms=3.5, zorder=3)
            if d.get("calibrated_loss"):
                any_calibrated = True
                ax_loss.plot(lambdas, d["calibrated_loss"], color=color, lw=1.8, ls="--", zorder=2)
            ax_acc.plot(lambdas, [100 * a for a in d["accuracy"]], color=color, lw=2.2, marker="o", ms=3.5)
    for j, split in enumerate(splits):
        axes[0, j].set_title(f"{split} split", fontsize=12)
        axes[0, j].set_ylabel("loss (cross-entropy)")
        axes[1, j].set_ylabel("accuracy (%)")
        axes[1, j].set_xlabel("λ   (0 = model A, 1 = model B)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.set_xlim(0, 1)
    if any_calibrated:
        handles += [Line2D([], [], color="black", lw=2.2, label="raw loss"),
                    Line2D([], [], color="black", lw=1.8, ls="--", label="calibrated loss (fitted T)")]
    fig.tight_layout(rect=(0, 0, 1, 0.91 if title else 0.94))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), frameon=False,
               bbox_to_anchor=(0.5, 0.955 if title else 1.0), fontsize=11)
    if title:
        fig.suptitle(title, y=0.995, fontsize=12)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# SVD analysis (owner: analysis)

MODEL_A_COLOR, MODEL_B_COLOR = "#000000", "#d62728"
SERIES_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _short_layer(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _log_ticks(ax, values: list[float]) -> None:
    """Labelled ticks on a log y axis, as plain numbers, dense enough for a spectrum spanning less than a
    decade and sparse enough for many decades (matplotlib's default labels every minor tick of a narrow
    range, on top of each other)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    decades = math.log10(max(values) / min(values)) if values else 0.0
    subs = (1.0,) if decades > 2.5 else (1.0, 2.0, 5.0) if decades > 0.8 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_svd_spectra(layers: list[dict], path: str | Path) -> None:
    """Small multiples, one per layer weight: singular values of A and B (log scale). π(B) has B's
    spectrum (a permutation never changes singular values), so it is not drawn separately."""
    n = len(layers)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        sv = layer["singular_values"]
        ax.semilogy(range(1, len(sv["a"]) + 1), sv["a"], color=MODEL_A_COLOR, lw=1.2, label="A")
        ax.semilogy(range(1, len(sv["b"]) + 1), sv["b"], color=MODEL_B_COLOR, lw=1.2, ls="--", label="B = π(B)")
        ax.set_title(f"{_short_layer(layer['name'])} {'x'.join(map(str, layer['matrix_shape']))}", fontsize=8)
        _log_ticks(ax, [v for v in sv["a"] + sv["b"] if v > 0])
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    for ax in axes[:, 0]:
        ax.set_ylabel("singular value s_i", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("index i (descending)", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Singular values per layer (B and π(B) coincide)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_svd_alignment(layers: list[dict], path: str | Path, weighted: bool = False, k_rule: str = "min") -> None:
    """R(γ) per layer: A vs π(B) solid, A vs B (no permutation) dashed, one colour per γ; with
    `weighted`, a second panel for the singular-value-weighted R_w(γ)."""
    panels = [("", "R(γ)")] + ([("_weighted", "weighted R_w(γ)")] if weighted else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 0.45 * len(layers) + 2.5) * len(panels), 3.8),
                             squeeze=False)
    x = list(range(1, len(layers) + 1))
    gammas = [a["gamma"] for a in layers[0]["alignment"]]
    k_text = "k = min(k_A, k_B)" if k_rule == "min" else "own k, ÷ √(k_A·k_B)"
    for ax, (suffix, title) in zip(axes.flat, panels):
        for i, g in enumerate(gammas):
            color = SERIES_COLORS[i % len(SERIES_COLORS)]
            perm = [layer["alignment"][i]["permuted" + suffix] for layer in layers]
            naive = [layer["alignment"][i]["naive" + suffix] for layer in layers]
            ax.plot(x, perm, color=color, marker="o", ms=3, lw=1.5, label=f"γ={g:g}, A vs π(B)")
            ax.plot(x, naive, color=color, marker="o", ms=3, lw=1.0, ls="--", alpha=0.8, label=f"γ={g:g}, A vs B")
        ax.axhline(0, color="#999999", lw=0.6)
        ax.set_xticks(x, [_short_layer(layer["name"]) for layer in layers], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("layer weight (input first)", fontsize=8)
        ax.set_ylabel(title)
        ax.set_title(f"{title}: A vs π(B) (solid) and A vs B (dashed); {k_text}", fontsize=9)
        ax.grid(alpha=0.3, lw=0.4)
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# LEWC (owner: analysis)


def _lambda_colors(n: int) -> list:
    cmap = plt.get_cmap("viridis")
    return [cmap(0.1 + 0.75 * i / max(1, n - 1)) for i in range(n)]


HALF_NOTE = "At λ = ½ both predictions are multiples of f(A) + f(B): their cosines coincide by construction."


def plot_lewc_cosine(layers: list[dict], path: str | Path) -> None:
    """Cosine similarity of the merged model's f_ℓ with LEWC's prediction (solid) and LLFC's (dashed)
    per layer ℓ, one colour per λ. θ(λ) = (1 − λ) θ_A + λ θ_B."""
    from matplotlib.lines import Line2D

    lambdas = [e["lambda"] for e in layers[0]["lambdas"]]
    x = [layer["index"] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.4 * len(x) + 3), 3.8))
    colors = _lambda_colors(len(lambdas))
    for j, (lam, color) in enumerate(zip(lambdas, colors)):
        ax.plot(x, [layer["lambdas"][j]["cos_lewc"] for layer in layers], color=color, marker="o", ms=3, lw=1.6)
        ax.plot(x, [layer["lambdas"][j]["cos_llfc"] for layer in layers], color=color, marker="s", ms=3, lw=1.0,
                ls="--")
    # legend in the title's order: the two predictions first, then one colour per λ
    handles = [Line2D([], [], color="black", marker="o", ms=3, lw=1.6, label="LEWC"),
               Line2D([], [], color="black", marker="s", ms=3, lw=1.0, ls="--", label="LLFC")]
    handles += [Line2D([], [], color=c, lw=3, label=f"λ = {lam:g}") for lam, c in zip(lambdas, colors)]
    ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xticks(x, [str(i) for i in x])
    ax.set_xlabel("layer ℓ (from the input; last = logits)")
    ax.set_ylabel("cosine similarity with prediction")
    ax.set_title("Merged features vs LEWC (solid) and LLFC (dashed); θ(λ) = (1−λ)θ_A + λθ_B", fontsize=9)
    ax.grid(alpha=0.3, lw=0.4)
    if 0.5 in lambdas:
        fig.text(0.01, 0.005, HALF_NOTE, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.05 if 0.5 in lambdas else 0, 1, 1))
    save_figure(fig, path)


def plot_lewc_coefficients(layers: list[dict], path: str | Path, note: str = "") -> None:
    """One panel per λ: fitted α (weight of f(A)) and β (weight of f(B)) per layer, against LEWC's
    ((1 − λ)^ℓ, λ^ℓ) (solid) and LLFC's (1 − λ, λ) (dashed). Unidentifiable fits are left out; the
    legend sits below the panels, off the data. `note` (e.g. what ℓ means) goes under the title."""
    lambdas = [e["lambda"] for e in layers[0]["lambdas"]]
    x = [layer["index"] for layer in layers]
    fig, axes = plt.subplots(1, len(lambdas), figsize=(3.6 * len(lambdas), 3.8), squeeze=False, sharey=True)
    colors = {"alpha": MODEL_A_COLOR, "beta": MODEL_B_COLOR}
    for ax, (j, lam) in zip(axes.flat, enumerate(lambdas)):
        for key, label in (("alpha", "α (A)"), ("beta", "β (B)")):
            fitted = [layer["lambdas"][j][key] for layer in layers]
            fitted = [float("nan") if v is None else v for v in fitted]
            ax.plot(x, fitted, color=colors[key], marker="o", ms=4, lw=0, label=f"fitted {label}")
            ax.plot(x, [layer["lambdas"][j][f"lewc_{key}"] for layer in layers], color=colors[key], lw=1.2,
                    label=f"LEWC {label}")
            ax.plot(x, [layer["lambdas"][j][f"llfc_{key}"] for layer in layers], color=colors[key], lw=1.0,
                    ls="--", alpha=0.7, label=f"LLFC {label}")
        ax.set_title(f"λ = {lam:g}", fontsize=9)
        ax.set_xticks(x, [str(i) for i in x], fontsize=7)
        ax.set_xlabel("layer ℓ")
        ax.set_ylabel("coefficient")
        ax.yaxis.set_tick_params(labelleft=True)
        ax.grid(alpha=0.3, lw=0.4)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7, frameon=False)
    title = "Least squares f_ℓ(θ(λ)) ≈ α f_ℓ(A) + β f_ℓ(B), θ(λ) = (1−λ)θ_A + λθ_B"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Experiment report (owner: report)


def _pairs_text(n: int) -> str:
    return f"{n} pair{'s' if n != 1 else ''}"


def plot_barrier_vs_width(rows: list[dict], methods: list[str], path: str | Path) -> None:
    """Test loss barrier (raw solid, calibrated dashed) and accuracy barrier (pp) against width, one
    colour per method, mean ± std over pairs (error bars only where n > 1; n in the titles)."""
    from .layout import width_label

    widths = sorted({r["width"] for r in rows})
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.9))
    counts: set[int] = set()
    plotted: dict[plt.Axes, list[float]] = {ax_loss: [], ax_acc: []}

    def series(method: str, key: str):
        xs, ms, ss = [], [], []
        for w in widths:
            vals = [r[key] for r in rows if r["width"] == w and r["method"] == method and r["split"] == "test"
                    and r.get(key) is not None]
            if vals:
                counts.add(len(vals))
                xs.append(w)
                ms.append(statistics.fmean(vals))
                ss.append(statistics.stdev(vals) if len(vals) > 1 else float("nan"))  # nan: no error bar
        return xs, ms, ss

    for i, method in enumerate(methods):
        color = method_color(method, i)
        for key, style, suffix in (("loss_barrier", "-", ""), ("calibrated_loss_barrier", "--", " calibrated")):
            xs, ms, ss = series(method, key)
            if xs:
                ax_loss.errorbar(xs, ms, yerr=ss, color=color, linestyle=style, marker="o", capsize=3,
                                 label=f"{method}{suffix}")
                plotted[ax_loss] += ms
        xs, ms, ss = series(method, "acc_barrier_pp")
        if xs:
            ax_acc.errorbar(xs, ms, yerr=ss, color=color, marker="o", capsize=3, label=method)
            plotted[ax_acc] += ms
    if counts == {1}:
        over = "1 pair per width, no error bars"
    else:
        over = f"mean ± std over n = {'–'.join(str(c) for c in sorted(counts)) or 0} pairs per width"
    for ax, title, ylabel in ((ax_loss, "test loss barrier", "loss barrier (nats)"),
                              (ax_acc, "test accuracy barrier", "accuracy barrier (pp)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [width_label(w) for w in widths])
        ax.minorticks_off()
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("width multiplier")
        # Matched barriers sit 100x below naive ones: on a linear axis they are a flat line at 0
        positive = [abs(v) for v in plotted[ax] if math.isfinite(v) and v != 0]
        if positive and max(positive) > 100 * min(positive):
            # linthresh on a decade, so the 0 tick and the first decade's tick are a decade apart
            ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(max(min(positive), 1e-4 * max(positive)))))
            lowest = min(v for v in plotted[ax] if math.isfinite(v))
            ax.set_ylim(0 if lowest >= 0 else 3 * lowest, 3 * max(positive))  # no empty negative half
            ylabel += ", symmetric log scale"
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({over})", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a report written before any step finished has nothing to label
            ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_curves_per_width(curve_files: list[Path], methods: list[str], width: float, path: str | Path) -> None:
    """Test loss and accuracy against λ at one width: thin lines per pair, one colour per method."""
    import csv

    from .layout import width_label

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.9))
    for file in curve_files:
        with open(file) as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
        for i, method in enumerate(methods):
            sel = [r for r in rows if r["label"] == method]
            if not sel:
                continue
            lam = [float(r["lambda"]) for r in sel]
            color = method_color(method, i)
            label = method if file == curve_files[0] else None
            ax_loss.plot(lam, [float(r["loss"]) for r in sel], color=color, linewidth=1.4, label=label)
            if sel[0].get("calibrated_loss"):
                ax_loss.plot(lam, [float(r["calibrated_loss"]) for r in sel], color=color, linestyle="--",
                             linewidth=1.0, label=f"{method} calibrated" if label else None)
            ax_acc.plot(lam, [100 * float(r["accuracy"]) for r in sel], color=color, linewidth=1.4, label=label)
    pairs = _pairs_text(len(curve_files))
    for ax, title, ylabel in ((ax_loss, "test loss", "loss (cross-entropy)"), (ax_acc, "test accuracy", "accuracy (%)")):
        ax.set_xlabel("λ  (0 = model A, 1 = model B)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, width {width_label(width)}, {pairs} (one line each)", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a report written before any step finished has nothing to label
            ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
