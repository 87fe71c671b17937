"""The thread policy: explicit choices win, auto counts free cores and small models get one thread."""
from __future__ import annotations

import json

import pytest
import torch

from lmcx import threads
from lmcx.errors import LmcxError

from conftest import assert_clean_error


@pytest.fixture
def policy(monkeypatch):
    """No real torch calls, no user OMP_NUM_THREADS, no LMCX_THREADS; _info restored afterwards."""
    calls = []
    monkeypatch.setattr(threads, "_set_torch", calls.append)
    monkeypatch.setattr(threads, "USER_OMP", None)
    monkeypatch.setattr(threads, "_info", {})
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored by monkeypatch after `apply` sets it
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    return calls


def test_parse():
    assert threads.parse(None) is None and threads.parse("auto") is None and threads.parse(" AUTO ") is None
    assert threads.parse("3") == 3 and threads.parse(2) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(LmcxError, match="positive integer"):
            threads.parse(bad)


def test_explicit_choices_win_in_order(policy, monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setenv(threads.ENV, "3")
    monkeypatch.setattr(threads, "USER_OMP", "5")
    assert threads.choose("2")["threads"] == 2 and threads.choose("2")["source"] == "--threads"
    assert threads.choose("auto") == {"threads": 3, "source": threads.ENV, "cores": 8}
    monkeypatch.setenv(threads.ENV, "lots")
    with pytest.raises(LmcxError, match="LMCX_THREADS must be 'auto' or a positive integer, got 'lots'"):
        threads.choose(None)
    monkeypatch.delenv(threads.ENV)
    assert threads.choose(None) == {"threads": 5, "source": "OMP_NUM_THREADS", "cores": 8}
    monkeypatch.setattr(threads, "USER_OMP", None)
    assert threads.choose(None)["threads"] == 8 and threads.choose(None)["source"] == "auto"


@pytest.mark.parametrize("cores, busy, expected", [(4, 0, 4), (4, 1, 3), (2, 1, 1), (2, 3, 1), (1, 0, 1)])
def test_auto_uses_the_free_cores(policy, monkeypatch, cores, busy, expected):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(threads, "busy_cores", lambda: busy)
    info = threads.apply(None)
    assert info["threads"] == expected and info["busy"] == busy
    assert policy == [expected]  # torch is loaded here, so it is set directly
    import os
    assert os.environ["OMP_NUM_THREADS"] == str(expected)  # and inherited by child processes


def test_busy_cores_reads_runnable_tasks_and_load(monkeypatch, tmp_path):
    loadavg = tmp_path / "loadavg"
    monkeypatch.setattr(threads, "LOADAVG", str(loadavg))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    loadavg.write_text("0.40 0.30 0.20 4/321 12345\n")  # 4 runnable, this process included
    assert threads.busy_cores() == 3
    loadavg.write_text("2.60 1.00 0.50 1/321 12345\n")  # only this process runs now, but the load is high
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.6, 1.0, 0.5))
    assert threads.busy_cores() == 3


def test_forward_macs_counts_linear_and_conv_layers():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10))
    net.train()
    before = net[1].running_mean.clone()
    assert threads.forward_macs(net, torch.randn(1, 3, 8, 8)) == 8 * 8 * 8 * 3 * 9 + 512 * 10
    assert net.training and torch.equal(net[1].running_mean, before)  # mode and BN statistics untouched


def test_small_models_get_one_thread_under_auto_only(policy, monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    small, big = torch.nn.Linear(64, 64), torch.nn.Linear(4096, 4096)
    threads.apply(None)
    assert threads.fit_to_model(small, torch.zeros(1, 64), 64)["threads"] == 1
    info = threads.fit_to_model(big, torch.zeros(1, 4096), 128)  # 2.1 G multiply-adds per step
    assert info["threads"] == 4 and info["small_model"] is False and policy[-1] == 4
    threads.apply("3")
    assert threads.fit_to_model(small, torch.zeros(1, 64), 64)["threads"] == 3  # an explicit choice stays


def test_cli_threads_option_before_or_after_the_subcommand(cli, synthetic_config, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    assert_clean_error(cli("--threads", "0", "train", "-c", synthetic_config), "--threads", "positive integer")
    assert_clean_error(cli("train", "-c", synthetic_config, "--threads", "many"), "--threads", "'many'")
    run = tmp_path / "run"
    result = cli("train", "-c", synthetic_config, "--out", run, "--threads=1")
    assert result.code == 0, result.err
    recorded = json.loads((run / "meta.json").read_text())["threads"]
    assert recorded["threads"] == 1 and recorded["source"] == "--threads" and recorded["torch_threads"] == 1


def test_config_key_ranks_between_the_environment_and_omp(policy, monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    monkeypatch.setattr(threads, "USER_OMP", "5")
    threads.apply(None)  # OMP_NUM_THREADS=5: the config key replaces it
    assert threads.apply_config(3) == {"threads": 3, "source": "config", "cores": 8, "torch_threads": torch.get_num_threads()}
    assert policy[-1] == 3
    monkeypatch.setattr(threads, "USER_OMP", None)
    threads.apply(None)  # auto: replaced too
    assert threads.apply_config("2")["threads"] == 2
    assert threads.apply_config("auto")["threads"] == 2  # auto in the config leaves the choice as it is
    threads.apply("4")  # --threads wins over the config
    assert threads.apply_config(3)["threads"] == 4
    monkeypatch.setenv(threads.ENV, "6")  # and so does $LMCX_THREADS
    threads.apply(None)
    assert threads.apply_config(3)["threads"] == 6 and threads.thread_info()["source"] == threads.ENV


def test_config_key_in_a_train_config(cli, synthetic_config, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "USER_OMP", None)
    monkeypatch.setattr(threads, "_set_torch", lambda n: None)  # later tests keep torch's one thread
    monkeypatch.setattr(threads, "_info", {})
    assert_clean_error(cli("train", "-c", synthetic_config, "--set", "threads=0"), "threads", "auto or a positive")
    run = tmp_path / "run"
    assert cli("train", "-c", synthetic_config, "--out", run, "--set", "threads=1").code == 0
    recorded = json.loads((run / "meta.json").read_text())["threads"]
    assert recorded["threads"] == 1 and recorded["source"] == "config"
    again = cli("train", "-c", synthetic_config, "--out", run, "--set", "threads=2")
    assert again.code == 0 and "already complete" in again.err  # the thread count is not a result setting
