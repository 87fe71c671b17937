"""Experiment tracking: TensorBoard event files written under the run directory and read back with
TensorBoard's own reader (skipped where the optional tensorboard package is absent)."""
import csv
import json
import math
import sys

import pytest

from conftest import REPO, SYNTHETIC_TRAIN, write_yaml
from lmcx.errors import LmcxError
from lmcx.tracking import EVENTS_DIR, Tracker, log_finished_run, open_tracker


def _read_events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series as [(step, value)], via TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / EVENTS_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _close(got, expected):
    """Scalars are stored as float32."""
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    with open_tracker("tensorboard", tmp_path) as tracker:
        tracker.epoch(1, {"epoch": 1, "train_loss": 1.5, "test_accuracy": None})  # no test this epoch
        tracker.epoch(2, {"epoch": 2, "train_loss": 0.75, "test_accuracy": 0.875})
        tracker.curve("wm", "test", [0.0, 0.25, 0.5, 1.0], {"loss": [0.1, 0.3, 0.5, 0.2], "calibrated_loss": None})
        tracker.final({"test_accuracy": 0.875, "loss_barrier_wm": 0.4, "method": "wm", "diverged": math.nan})
    events = _read_events(tmp_path)
    assert set(events) == {"train/train_loss", "train/test_accuracy", "interpolate/wm/test/loss",
                           "final/test_accuracy", "final/loss_barrier_wm"}
    _close(events["train/train_loss"], [(1, 1.5), (2, 0.75)])
    _close(events["train/test_accuracy"], [(2, 0.875)])
    _close(events["interpolate/wm/test/loss"], [(0, 0.1), (250, 0.3), (500, 0.5), (1000, 0.2)])
    _close(events["final/loss_barrier_wm"], [(0, 0.4)])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two synthetic MLPs and their calibrated interpolation (5 points), written by the library."""
    from lmcx.config import InterpolateConfig, TrainJob, load_config
    from lmcx.interpolate import interpolate_checkpoints
    from lmcx.train import train

    root = tmp_path_factory.mktemp("tracked")
    config = write_yaml(root / "train.yaml", SYNTHETIC_TRAIN)
    for seed in (0, 1):
        train(load_config(TrainJob, config, [{"seed": seed, "device": "cpu"}]), root / f"s{seed}")
    interpolate_checkpoints(root / "s0", [root / "s1"], ["naive"],
                            InterpolateConfig(points=5, train_eval_size=128, calibrate=True), root / "curve", "cpu")
    return root


def test_finished_runs_replayed_into_tensorboard(finished):
    pytest.importorskip("tensorboard")
    for run in ("s0", "curve"):
        with open_tracker("tensorboard", finished / run) as tracker:
            log_finished_run(finished / run, tracker)

    events = _read_events(finished / "s0")
    with open(finished / "s0" / "history.csv") as f:
        history = list(csv.DictReader(f))
    _close(events["train/test_accuracy"], [(int(r["epoch"]), float(r["test_accuracy"])) for r in history])
    _close(events["train/lr"], [(int(r["epoch"]), float(r["lr"])) for r in history])
    metrics = json.loads((finished / "s0" / "metrics.json").read_text())
    _close(events["final/test_accuracy"], [(0, metrics["test_accuracy"])])

    events = _read_events(finished / "curve")
    with open(finished / "curve" / "curve.csv") as f:
        curve = [r for r in csv.DictReader(f) if r["split"] == "test"]
    for name in ("loss", "accuracy", "calibrated_loss"):
        _close(events[f"interpolate/naive/test/{name}"], [(round(1000 * float(r["lambda"])), float(r[name]))
                                                          for r in curve])
    assert [s for s, _ in events["interpolate/naive/test/loss"]] == [0, 250, 500, 750, 1000]
    test = json.loads((finished / "curve" / "barrier.json").read_text())["results"]["naive"]["test"]
    _close(events["final/loss_barrier_naive"], [(0, test["raw"]["loss_barrier"])])
    _close(events["final/calibrated_loss_barrier_naive"], [(0, test["calibrated"]["loss_barrier"])])
    assert "interpolate/naive/calib/temperature" in events  # the calibration split's curve too


def test_none_records_nothing_and_bad_choices_are_one_line(tmp_path, monkeypatch):
    tracker = open_tracker("none", tmp_path)
    assert type(tracker) is Tracker
    tracker.epoch(1, {"train_loss": 1.0})
    tracker.close()
    assert not (tmp_path / EVENTS_DIR).exists()
    with pytest.raises(LmcxError, match="'wandb' is not one of none, tensorboard"):
        open_tracker("wandb", tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as where tensorboard is not installed
    with pytest.raises(LmcxError, match=r"pip install 'lmcx\[tensorboard\]'"):
        open_tracker("tensorboard", tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("train: {epochs: 1}\n")
    with pytest.raises(LmcxError, match="not a finished run"):
        log_finished_run(tmp_path / "run", Tracker())


def test_train_and_interpolate_track_tensorboard_from_the_cli(tmp_path, cli):
    """`--track tensorboard` on digits: per-epoch rows and final figures of training, the curves and
    barriers of an interpolation, read back with TensorBoard's reader; `track` never makes a run stale."""
    pytest.importorskip("tensorboard")
    runs = {}
    for seed in (0, 1):
        runs[seed] = tmp_path / f"s{seed}"
        result = cli("train", "-c", REPO / "configs" / "digits_mlp.yaml", "--epochs", "2", "--seed", seed,
                     "--width", "0.25", "--device", "cpu", "--out", runs[seed], "--track", "tensorboard")
        assert result.code == 0, result.err
    events = _read_events(runs[0])
    with open(runs[0] / "history.csv") as f:
        history = list(csv.DictReader(f))
    _close(events["train/train_loss"], [(int(r["epoch"]), float(r["train_loss"])) for r in history])
    assert [s for s, _ in events["train/test_accuracy"]] == [1, 2]
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    _close(events["final/test_accuracy"], [(0, metrics["test_accuracy"])])
    again = cli("train", "-c", REPO / "configs" / "digits_mlp.yaml", "--epochs", "2", "--width", "0.25",
                "--device", "cpu", "--out", runs[0])  # tracking off now: still the same run
    assert again.code == 0 and "already complete" in again.err

    curve = tmp_path / "curve"
    result = cli("interpolate", "--a", runs[0], "--b", runs[1], "--points", "5", "--set", "train_eval_size=200",
                 "--device", "cpu", "--out", curve, "--track", "tensorboard")
    assert result.code == 0, result.err
    events = _read_events(curve)
    with open(curve / "curve.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    _close(events["interpolate/naive/train/accuracy"], [(round(1000 * float(r["lambda"])), float(r["accuracy"]))
                                                        for r in rows])
    test = json.loads((curve / "barrier.json").read_text())["results"]["naive"]["test"]
    _close(events["final/loss_barrier_naive"], [(0, test["raw"]["loss_barrier"])])


def test_resumed_training_tracks_each_epoch_once(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import lmcx.train as training
    from lmcx.config import TrainJob, load_config

    job = load_config(TrainJob, write_yaml(tmp_path / "train.yaml", SYNTHETIC_TRAIN),  # 3 epochs
                      [{"track": "tensorboard", "device": "cpu"}])
    save, saved = training.save_train_state, []

    def save_then_stop(path, state):  # as if killed right after the second epoch's state was saved
        save(path, state)
        saved.append(state["epoch"])
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_train_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        training.train(job, tmp_path / "run")
    monkeypatch.setattr(training, "save_train_state", save)
    training.train(job, tmp_path / "run", resume=True)
    events = _read_events(tmp_path / "run")
    assert [step for step, _ in events["train/train_loss"]] == [1, 2, 3]
    assert [step for step, _ in events["final/test_accuracy"]] == [0]
