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
def test_two_process_ddp_matches_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "lmcx", "train", "-c", str(REPO / "configs" / "digits_mlp.yaml"), "--epochs", "6",
            "--set", "train.optimizer=sgd", "--set", "train.lr=0.05"]
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "single")], env=env,
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    # --standalone: the rendezvous takes a free port, so parallel test workers or runs never collide on one
    ddp = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", *args,
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    meta = json.loads((tmp_path / "ddp" / "meta.json").read_text())
    assert meta["world_size"] == 2
    acc = [json.loads((tmp_path / d / "metrics.json").read_text())["test_accuracy"] for d in ("single", "ddp")]
    assert acc[0] > 0.9
    assert abs(acc[0] - acc[1]) <= 0.005, acc
