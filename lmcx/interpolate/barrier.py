"""Barriers of a curve (SCIENCE.md), and the rows, barriers and plot series of every curve of a run."""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from ..train import loss_and_accuracy
from .curves import CURVE_SPLITS, Curves


def barrier_metrics(lambdas: Sequence[float], loss: Sequence[float], accuracy: Sequence[float]) -> dict[str, float]:
    """Barriers of one curve, exactly as in SCIENCE.md (the grid must hold 0 and 1; ½ for midpoints):

    loss barrier      max_λ [ L(θ(λ)) − ((1 − λ) L(θ_A) + λ L(θ_B)) ]
    accuracy barrier  max_λ [ ((1 − λ) Acc(θ_A) + λ Acc(θ_B)) − Acc(θ(λ)) ]
    with the λ where each maximum is reached, and at λ = ½ the loss, accuracy and both gaps.
    Accuracies are fractions in [0, 1]."""
    lam = np.asarray(lambdas, dtype=np.float64)
    loss_ = np.asarray(loss, dtype=np.float64)
    acc = np.asarray(accuracy, dtype=np.float64)
    if not (len(lam) == len(loss_) == len(acc)) or len(lam) < 2:
        raise ValueError("lambdas, loss and accuracy must have one value per λ (at least two)")

    def at(value: float) -> int:
        hits = np.flatnonzero(np.isclose(lam, value, rtol=0, atol=1e-12))
        if not len(hits):
            raise ValueError(f"the λ grid must contain {value}")
        return int(hits[0])

    i0, i1 = at(0.0), at(1.0)
    loss_gap = loss_ - ((1 - lam) * loss_[i0] + lam * loss_[i1])
    acc_gap = ((1 - lam) * acc[i0] + lam * acc[i1]) - acc
    il, ia = int(np.nanargmax(loss_gap)) if np.isfinite(loss_gap).any() else 0, int(np.argmax(acc_gap))
    out = {"loss_barrier": float(loss_gap[il]) if np.isfinite(loss_gap).any() else math.nan,
           "loss_barrier_lambda": float(lam[il]),
           "accuracy_barrier": float(acc_gap[ia]), "accuracy_barrier_lambda": float(lam[ia]),
           "loss_a": float(loss_[i0]), "loss_b": float(loss_[i1]),
           "accuracy_a": float(acc[i0]), "accuracy_b": float(acc[i1])}
    if np.isclose(lam, 0.5, rtol=0, atol=1e-12).any():
        im = at(0.5)
        out.update(midpoint_loss=float(loss_[im]), midpoint_accuracy=float(acc[im]),
                   midpoint_loss_barrier=float(loss_gap[im]), midpoint_accuracy_barrier=float(acc_gap[im]))
    return out


def loss_gaps(lambdas: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """L(θ(λ)) − ((1 − λ) L(θ_A) + λ L(θ_B)) at every λ of the grid (0 and 1 must be on it)."""
    lam, loss_ = np.asarray(lambdas, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    i0, i1 = int(np.flatnonzero(lam == 0.0)[0]), int(np.flatnonzero(lam == 1.0)[0])
    return loss_ - ((1 - lam) * loss_[i0] + lam * loss_[i1])


def summarize(curves: Curves, temperatures: dict[str, list[float]] | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, dict]]:
    """(rows of curve.csv, per-label-and-split barriers, per-label series for the plot)."""
    from ..calibrate import calibrated_nll, calibration_check

    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    series: dict[str, dict] = {}
    for label in curves.labels:
        results[label], series[label] = {}, {}
        splits = [s for s in CURVE_SPLITS if s in curves.logits[label]]
        if temperatures is not None and "calib" in curves.logits[label]:
            splits.append("calib")
        for split in splits:
            y = curves.targets[split]
            loss, acc, cal = [], [], []
            for i, lam in enumerate(curves.lambdas):
                z = curves.logits[label][split][i]
                l_, a_ = loss_and_accuracy(z, y)
                row = {"label": label, "lambda": lam, "split": split, "loss": l_, "accuracy": a_}
                if temperatures is not None:
                    t = temperatures[label][i]
                    cal.append(calibrated_nll(z, y, t))
                    row.update(temperature=t, calibrated_loss=cal[-1])
                loss.append(l_)
                acc.append(a_)
                rows.append(row)
            series[label][split] = {"loss": loss, "accuracy": acc, "calibrated_loss": cal or None}
            if split == "calib":
                continue
            entry = {"raw": barrier_metrics(curves.lambdas, loss, acc), "calibrated": None}
            if temperatures is not None:
                entry["calibrated"] = barrier_metrics(curves.lambdas, cal, acc)
                entry["calibrated"]["loss_barrier_at_most_raw_everywhere"] = bool(
                    np.all(loss_gaps(curves.lambdas, cal) <= loss_gaps(curves.lambdas, loss) + 1e-12))
            results[label][split] = entry
        if temperatures is not None:
            results[label]["temperatures"] = list(temperatures[label])
            if "test" in results[label]:
                raw, cal = results[label]["test"]["raw"], results[label]["test"]["calibrated"]
                results[label]["calibration_check"] = calibration_check(
                    len(curves.targets["calib"]), (raw["loss_a"], raw["loss_b"]), (cal["loss_a"], cal["loss_b"]))
    return rows, results, series


def summary_lines(barrier: dict[str, Any]) -> Iterable[str]:
    """One line per label: test loss / accuracy barrier (and the calibrated loss barrier)."""
    for label, per in barrier.get("results", {}).items():
        test = per.get("test", {})
        raw, cal = test.get("raw", {}), test.get("calibrated")
        num = lambda d, k: math.nan if d.get(k) is None else d[k]  # noqa: E731 - barrier.json has null for nan/inf
        line = (f"{label}: test loss barrier {num(raw, 'loss_barrier'):.4f} "
                f"(at λ={num(raw, 'loss_barrier_lambda'):.3f})")
        if cal:
            line += f", calibrated {num(cal, 'loss_barrier'):.4f}"
        line += f", accuracy barrier {100 * num(raw, 'accuracy_barrier'):.2f} pp"
        yield line

