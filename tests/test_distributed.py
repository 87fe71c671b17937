"""`lmcx train` under torchrun (gloo on CPU): same global batch, same accuracy as one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_process_ddp_matches_single_process(tmp_path, cli):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "-c", str(REPO / "configs" / "digits_mlp.yaml"), "--epochs", "6",
            "--set", "train.optimizer=sgd", "--set", "train.lr=0.05", "--threads", "1"]
    # The single-process reference runs in this process (one thread, like each rank): the same `lmcx train`,
    # without the cost of starting another Python and importing torch once more.
    single = cli(*args, "--out", tmp_path / "single")
    assert single.code == 0, single.err
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    # --standalone: the rendezvous takes a free port, so parallel test workers or runs never collide on one
    ddp = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lmcx", *args,
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    worlds = [json.loads((tmp_path / d / "meta.json").read_text())["world_size"] for d in ("single", "ddp")]
    assert worlds == [1, 2]
    acc = [json.loads((tmp_path / d / "metrics.json").read_text())["test_accuracy"] for d in ("single", "ddp")]
    assert acc[0] > 0.9
    assert abs(acc[0] - acc[1]) <= 0.005, acc
