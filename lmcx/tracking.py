"""Experiment tracking, an optional extra (`pip install 'lmcx[tensorboard]'`): TensorBoard event files
under each run directory, so `tensorboard --logdir outputs` shows every run of a sweep side by side.

A tracker receives three kinds of records:
  epoch(n, metrics)                 per-epoch training metrics  -> scalars train/<name>, step = epoch
  curve(label, split, λs, series)   an interpolation curve      -> scalars interpolate/<label>/<split>/<name>,
                                                                    step = round(1000 λ) (TensorBoard steps are
                                                                    integers: the x axis reads λ in thousandths)
  final(figures)                    the run's headline figures  -> scalars final/<name>, step 0
`log_finished_run` replays a finished run directory's files (history.csv, curve.csv, the marker's figures as
`lmcx collect` reads them) into a tracker, so past runs can be tracked too.

`track: none` (the default) gets `Tracker`, which records nothing.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from .errors import LmcxError

TRACKERS = ("none", "tensorboard")
EVENTS_DIR = "tensorboard"  # below the run directory
LAMBDA_STEPS = 1000  # curve step = round(LAMBDA_STEPS * λ)


class Tracker:
    """Records nothing; the interface of every tracker. Use as a context manager (closes on exit)."""

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        pass

    def curve(self, label: str, split: str, lambdas: Sequence[float], series: dict[str, Sequence[float] | None]) -> None:
        pass

    def final(self, figures: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _number(value: Any) -> float | None:
    """A finite number to plot, else None (missing evaluations, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class TensorBoardTracker(Tracker):
    """Event files in `<run_dir>/tensorboard/`, written by torch.utils.tensorboard.SummaryWriter."""

    def __init__(self, run_dir: str | Path):
        self.log_dir = Path(run_dir) / EVENTS_DIR
        self.writer = _summary_writer()(log_dir=str(self.log_dir))

    def _scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        for name, value in values.items():
            if (number := _number(value)) is not None:
                self.writer.add_scalar(f"{prefix}/{name}", number, step)

    def epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._scalars("train", {k: v for k, v in metrics.items() if k != "epoch"}, epoch)

    def curve(self, label: str, split: str, lambdas: Sequence[float], series: dict[str, Sequence[float] | None]) -> None:
        for name, values in series.items():
            for lam, value in zip(lambdas, values or []):
                self._scalars(f"interpolate/{label}/{split}", {name: value}, round(LAMBDA_STEPS * lam))

    def final(self, figures: dict[str, Any]) -> None:
        self._scalars("final", figures, 0)

    def close(self) -> None:
        self.writer.close()


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LmcxError("tracking with tensorboard needs the tensorboard package: pip install "
                        "'lmcx[tensorboard]' (or track with none)") from None
    return SummaryWriter


def check_tracker(kind: str) -> None:
    """Refuse an unknown tracker, or one whose package is missing, before any work is done."""
    if kind not in TRACKERS:
        raise LmcxError(f"track: {kind!r} is not one of {', '.join(TRACKERS)}")
    if kind == "tensorboard":
        _summary_writer()


def open_tracker(kind: str, run_dir: str | Path) -> Tracker:
    """The tracker named by `kind` (one of TRACKERS) for a run directory."""
    check_tracker(kind)
    return TensorBoardTracker(run_dir) if kind == "tensorboard" else Tracker()


def _read_csv(path: Path, text: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a CSV the steps wrote: columns in `text` as written, the others as floats (empty cells,
    e.g. epochs without a test, as None)."""
    def value(text: str) -> Any:
        try:
            return float(text) if text != "" else None
        except ValueError:
            return text

    with open(path, newline="") as f:
        return [{k: v if k in text else value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def log_finished_run(run_dir: str | Path, tracker: Tracker) -> None:
    """Replay a finished run directory into `tracker`: its training history, its curves and its figures."""
    from .collect import read_run

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if run["status"] != "finished":
        raise LmcxError(f"{run_dir} is not a finished run ({run['status']}: {run['note']}); finish it first")
    if (run_dir / "history.csv").is_file():
        for row in _read_csv(run_dir / "history.csv"):
            tracker.epoch(int(row["epoch"]), row)
    if (run_dir / "curve.csv").is_file():
        curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in _read_csv(run_dir / "curve.csv", text=("label", "split")):
            curves.setdefault((row["label"], row["split"]), []).append(row)
        for (label, split), rows in curves.items():
            names = [n for n in ("loss", "accuracy", "calibrated_loss", "temperature") if n in rows[0]]
            tracker.curve(label, split, [r["lambda"] for r in rows], {n: [r[n] for r in rows] for n in names})
    tracker.final(run["figures"])
