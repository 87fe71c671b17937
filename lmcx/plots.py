"""Plots, readable at a glance: one colour per method everywhere, direct labels, headless (Agg).

Sections: interpolation curves, SVD analysis, LEWC, experiment report. Each figure is written
atomically, like every other output.
"""
from __future__ import annotations

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


# ---------------------------------------------------------------------------------------------
# SVD analysis (owner: analysis)


# ---------------------------------------------------------------------------------------------
# LEWC (owner: analysis)


# ---------------------------------------------------------------------------------------------
# Experiment report (owner: report)
