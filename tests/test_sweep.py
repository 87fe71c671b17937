"""scripts/sweep.sh: two copies started at once on one outputs folder do every run exactly once."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LMCX = str(Path(sys.executable).with_name("lmcx"))


def test_two_concurrent_sweeps_train_each_run_once(tmp_path, synthetic_config):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMCX": LMCX}
    # two runs, two jobs per sweep: both sweeps start both runs at once, so each run is claimed by one sweep
    # while the other finds it busy or complete (each `lmcx train` process costs ~5 s of CPU, mostly imports)
    cmd = ["bash", str(REPO / "scripts" / "sweep.sh"), str(synthetic_config), str(tmp_path / "sweep"),
           "0.25 0.5", "0", "2"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    log = "\n".join(logs)
    runs = [f"w{w}-s0" for w in ("0.25", "0.5")]
    for run in runs:
        run_dir = tmp_path / "sweep" / run
        assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
        assert len((run_dir / "history.csv").read_text().strip().splitlines()) == 1 + 3
        trained = [line for line in log.splitlines() if line.startswith(f"{run_dir}: test accuracy")]
        assert len(trained) == 1, (run, log)  # trained by exactly one of the two sweeps
    others = [line for line in log.splitlines() if "another process is working on it" in line
              or "already complete" in line]
    assert len(others) == len(runs)


def test_sweep_usage_error():
    result = subprocess.run(["bash", str(REPO / "scripts" / "sweep.sh")], capture_output=True, text=True)
    assert result.returncode == 2 and "Usage" not in result.stdout and "sweep.sh CONFIG" in result.stderr
