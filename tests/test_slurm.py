"""The SLURM launcher: which steps become which jobs, the job bodies (run here, without SLURM), and a
real submission where a SLURM cluster answers (skipped elsewhere): a failed train blocks only what
needs it, and a re-submission runs only what is missing."""
import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import assert_clean_error
from lmcx.config import ExperimentConfig, load_config, to_dict
from lmcx.errors import LmcxError
from lmcx.experiment import EXPERIMENT_FILE, plan
from lmcx.io import write_yaml
from lmcx.slurm import REPORT, finish_experiment, run_step, schedule, submit_experiment
from test_collect import EXPERIMENT  # the tiny digits experiment


def _config(tmp_path, out):
    (tmp_path / "tiny.yaml").write_text(EXPERIMENT)
    return load_config(ExperimentConfig, tmp_path / "tiny.yaml", [{"out": str(out)}])


def _statuses(root):
    return {label: entry["status"] for label, entry in json.loads((root / "steps.json").read_text()).items()}


def test_schedule_submits_what_is_missing_with_its_dependencies(tmp_path):
    cfg = _config(tmp_path, tmp_path / "exp")
    steps = plan(cfg)
    trains, others = schedule(steps)
    assert [s.label for s in trains] == ["train w0.25-s0", "train w0.25-s1"]
    needs = {s.label: n for s, n in others}
    assert needs == {"match w0.25-s0-s1-wm": ["train w0.25-s0", "train w0.25-s1"],
                     "interpolate w0.25-s0-s1": ["train w0.25-s0", "train w0.25-s1", "match w0.25-s0-s1-wm"],
                     "svd w0.25-s0-s1": ["train w0.25-s0", "train w0.25-s1", "match w0.25-s0-s1-wm"],
                     "lewc w0.25-s0-s1-naive": ["train w0.25-s0", "train w0.25-s1"],
                     "lewc w0.25-s0-s1-wm": ["train w0.25-s0", "match w0.25-s0-s1-wm"]}
    # once the trains and the match are complete, only the analyses remain, waiting on nothing
    for step in steps[:3]:
        step.out.mkdir(parents=True)
        write_yaml(step.out / "config.yaml", step.settings)  # complete: its settings recorded, its marker written
        (step.out / step.marker).write_text("{}")
    trains, others = schedule(steps)
    assert trains == [] and {s.label: n for s, n in others} == {
        "interpolate w0.25-s0-s1": [], "svd w0.25-s0-s1": [], "lewc w0.25-s0-s1-naive": [], "lewc w0.25-s0-s1-wm": []}


def test_job_bodies_run_here_and_record_the_outcome(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, "exp")  # relative, as most experiments: a job works in the submitting folder
    settings = to_dict(cfg)
    monkeypatch.chdir("/")
    assert run_step(settings, "exp/train/w0.25-s0", str(tmp_path)) == "done"
    assert (tmp_path / "exp" / "train" / "w0.25-s0" / "metrics.json").is_file()
    assert run_step(settings, "exp/train/w0.25-s0", str(tmp_path)) == "skipped"
    with pytest.raises(LmcxError, match="no step writing exp/train/w9-s9"):
        run_step(settings, "exp/train/w9-s9", str(tmp_path))

    jobs = {"train w0.25-s0": {"job": "7_0", "log": "7_0.err"}, "train w0.25-s1": {"job": "7_1", "log": "7_1.err"}}
    write_yaml(tmp_path / "exp" / EXPERIMENT_FILE, settings)  # as submit_experiment does
    report = finish_experiment(settings, str(tmp_path), jobs)
    assert report == "exp/report.md" and (tmp_path / report).is_file()
    steps = json.loads((tmp_path / "exp" / "steps.json").read_text())
    assert steps["train w0.25-s0"]["status"] == "done" and steps["train w0.25-s0"]["job"] == "7_0"
    assert steps["train w0.25-s1"] == {"out": "exp/train/w0.25-s1", "job": "7_1", "log": "7_1.err",
                                       "status": "failed", "reason": "SLURM job 7_1 did not finish it; see 7_1.err"}
    assert steps["match w0.25-s0-s1-wm"]["status"] == "blocked"
    assert steps["match w0.25-s0-s1-wm"]["reason"] == "needs train w0.25-s1, which failed"


def test_without_submitit_or_slurm_one_clear_error(tmp_path, monkeypatch):
    cfg = _config(tmp_path, tmp_path / "exp")
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(LmcxError, match=r"pip install 'lmcx\[slurm\]'"):
        submit_experiment(cfg, plan(cfg), tmp_path / "slurm")
    monkeypatch.undo()
    pytest.importorskip("submitit")
    if shutil.which("srun") is None:
        with pytest.raises(LmcxError, match="no SLURM here"):
            submit_experiment(cfg, plan(cfg), tmp_path / "slurm")
    else:
        with pytest.raises(LmcxError, match=r"slurm options: Unavailable parameter\(s\): \['partitoin'\]"):
            submit_experiment(cfg, plan(cfg), tmp_path / "slurm", {"partitoin": "gpu"})


def _slurm_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_answers(), reason="no SLURM cluster answers here (sbatch / sinfo)")
def test_real_slurm_failure_blocks_dependents_and_resubmit_completes(tmp_path):
    pytest.importorskip("submitit")
    root = tmp_path / "exp"
    cfg = _config(tmp_path, root)
    with pytest.raises(LmcxError, match="sbatch refused a job .*invalid partition"):
        submit_experiment(cfg, plan(cfg), root / "slurm", {"partition": "no-such-partition"})
    (root / "train").mkdir(parents=True)
    (root / "train" / "w0.25-s1").write_text("a file where the run directory goes: this train fails")
    ids = submit_experiment(cfg, plan(cfg), root / "slurm")
    assert set(ids) == {s.label for s in plan(cfg)} | {REPORT}
    assert ids["train w0.25-s0"].split("_")[0] == ids["train w0.25-s1"].split("_")[0]  # one job array
    deadline = time.monotonic() + 600
    while not (root / "slurm" / ids[REPORT] / f"{ids[REPORT]}_0_result.pkl").is_file():
        assert time.monotonic() < deadline, "the report job did not finish within 10 minutes"
        time.sleep(2)
    statuses = _statuses(root)
    assert statuses.pop("train w0.25-s0") == "done" and statuses.pop("train w0.25-s1") == "failed"
    assert set(statuses.values()) == {"blocked"}
    assert not (root / "match").exists()  # SLURM cancelled the dependent jobs: they never started

    (root / "train" / "w0.25-s1").unlink()
    again = submit_experiment(cfg, plan(cfg), root / "slurm", wait=True)
    assert "train w0.25-s0" not in again and "train w0.25-s1" in again
    statuses = _statuses(root)
    assert statuses.pop("train w0.25-s0") == "skipped" and set(statuses.values()) == {"done"}
    assert (root / "report.md").is_file() and (root / "summary.csv").is_file()


def test_run_cli_refuses_launcher_mistakes(tmp_path, cli):
    (tmp_path / "tiny.yaml").write_text(EXPERIMENT)
    for args, says in [(["--launcher", "pbs"], "--launcher 'pbs': choose local or slurm"),
                       (["--wait"], "--wait waits for SLURM jobs"),
                       (["--launcher", "slurm", "--force"], "--force cannot be sent to SLURM jobs"),
                       (["--launcher", "slurm", "--set", "slurm=gpu"], "slurm: must be a mapping")]:
        assert_clean_error(cli("run", tmp_path / "tiny.yaml", "--out", tmp_path / "exp", *args), says)
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_answers(), reason="no SLURM cluster answers here (sbatch / sinfo)")
def test_real_slurm_through_lmcx_run(tmp_path, cli, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(EXPERIMENT)
    result = cli("run", "tiny.yaml", "--out", "exp", "--launcher", "slurm", "--wait", "--set", "slurm.timeout_min=20")
    assert result.code == 0, result.err
    printed = re.findall(r"^ +(\d+(?:_\d+)?)  (.+)$", result.err, re.M)
    assert {label for _, label in printed} == {s.label for s in plan(_config(tmp_path, "exp"))} | {REPORT}
    assert set(_statuses(tmp_path / "exp").values()) == {"done"} and (tmp_path / "exp" / "report.md").is_file()
