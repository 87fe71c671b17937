"""Training: determinism, resume after SIGKILL, divergence, skip/force semantics of run directories."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_clean_error
from lmcx.config import TrainJob, load_config
from lmcx.errors import RunFailed
from lmcx.train import lr_multiplier, train


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_same_seed_bit_identical_different_seed_differs(tmp_path, synthetic_config, cli):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert cli("train", "-c", synthetic_config, "--seed", seed, "--out", tmp_path / name).code == 0
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_outputs_and_metadata(tmp_path, synthetic_config, cli):
    run = tmp_path / "run"
    assert cli("train", "-c", synthetic_config, "--out", run).code == 0
    assert {p.name for p in run.iterdir()} >= {"model.safetensors", "meta.json", "history.csv", "config.yaml",
                                                "metrics.json"}
    assert not (run / "train_state.pt").exists()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["architecture"] == "mlp" and meta["dataset"] == "synthetic" and meta["seed"] == 0
    assert meta["config"]["train"]["epochs"] == 3 and "torch" in meta["versions"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5  # 4 separable blobs: far above the 25% chance level
    assert len((run / "history.csv").read_text().strip().splitlines()) == 1 + 3


def test_complete_run_is_skipped_force_redoes_and_other_settings_refused(tmp_path, synthetic_config, cli):
    run = tmp_path / "run"
    assert cli("train", "-c", synthetic_config, "--out", run).code == 0
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    again = cli("train", "-c", synthetic_config, "--out", run, "--device", "cpu")
    assert again.code == 0 and "already complete" in again.err
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp
    assert_clean_error(cli("train", "-c", synthetic_config, "--out", run, "--set", "train.lr=0.1"),
                       "train.lr", "--force")
    assert cli("train", "-c", synthetic_config, "--out", run, "--force").code == 0
    assert (run / "model.safetensors").stat().st_mtime_ns != stamp


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, synthetic_config, cli):
    """A process killed mid-training and continued with --resume ends with bit-identical weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train_args = ["train", "-c", str(synthetic_config), "--epochs", "40", "--set", "data.synthetic.train_size=2048"]
    args = [sys.executable, "-m", "lmcx", *train_args]
    full = tmp_path / "full"  # the uninterrupted reference: in this process, one thread like the subprocesses
    assert cli(*train_args, "--threads", "1", "--out", full).code == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "train_state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    epoch = torch.load(killed / "train_state.pt", weights_only=True)["epoch"]
    assert 1 <= epoch < 40

    resumed = subprocess.run(args + ["--out", str(killed), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    a, b = _weights(full), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_message_and_keeps_last_good_state(tmp_path, synthetic_config, monkeypatch):
    import lmcx.train as train_module

    job = load_config(TrainJob, synthetic_config)
    real_batches = train_module.train_batches

    def poisoned(ds, batch_size, generator, *args, **kwargs):
        epoch_is_third = generator.initial_seed() == 2  # epoch_generator(seed=0, epoch=2)
        for x, y in real_batches(ds, batch_size, generator, *args, **kwargs):
            yield (x * float("nan") if epoch_is_third else x), y

    monkeypatch.setattr(train_module, "train_batches", poisoned)
    with pytest.raises(RunFailed, match="diverged in epoch 3.*lower train.lr"):
        train(job, tmp_path)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "metrics.json").exists()


def test_nan_exit_code_from_cli(tmp_path, synthetic_config, cli):
    result = cli("train", "-c", synthetic_config, "--out", tmp_path / "r", "--set", "train.lr=1e30",
                 "--set", "train.optimizer=sgd")
    assert result.code == 1 and "diverged" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_schedules():
    assert lr_multiplier(0, 100, 10, "linear") == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(99, 100, 0, "cosine") < 0.01
    assert lr_multiplier(80, 100, 10, "constant") == 1.0


def test_digits_default_config_reaches_90_percent(tmp_path, cli):
    result = cli("train", "-c", REPO / "configs" / "digits_mlp.yaml", "--out", tmp_path / "d", "--epochs", "10")
    assert result.code == 0
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["test_accuracy"] >= 0.9
