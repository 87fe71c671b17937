"""`lmcx run`: a whole experiment from one YAML; resumable, incremental, validated before training."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_clean_error, write_yaml
from lmcx.errors import LmcxError

EXPERIMENT = """
name: tiny
data:
  name: synthetic
  calib_size: 64
  synthetic: {train_size: 384, test_size: 128, num_classes: 4, shape: [1, 8, 8]}
model: {arch: mlp, norm: none, bias: true}
train: {optimizer: adam, lr: 0.003, weight_decay: 0.0, epochs: 3, batch_size: 64, warmup_epochs: 0}
widths: [0.125]
seeds: [0, 1]
pairs: all
methods: [wm]
interpolate: {points: 5, calibrate: true, train_eval_size: 128}
analyses: [svd, lewc]
lewc: {lambdas: [0.25, 0.5], samples: 64}
"""


def _summary(root):
    with open(root / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_run_writes_report_and_rerun_is_incremental(tmp_path, cli, monkeypatch):
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT)
    out = tmp_path / "out"
    monkeypatch.setenv("LMCX_PROGRESS_INTERVAL", "0")  # a progress line at every chance
    result = cli("run", exp, "--out", out)
    monkeypatch.delenv("LMCX_PROGRESS_INTERVAL")
    assert result.code == 0, result.err
    steps = json.loads((out / "steps.json").read_text())
    run_lines = [line for line in result.err.splitlines() if line.startswith("run tiny: ")]
    assert len(run_lines) >= 2 * len(steps) and f"{len(steps)}/{len(steps)} step (100%)" in run_lines[-1]
    assert any(line.startswith(("interpolate: ", "svd: ", "lewc layers: ", "weight matching: "))
               for line in result.err.splitlines())
    assert all(entry["threads"]["torch_threads"] >= 1 for entry in steps.values())  # each step's thread record
    for f in out.rglob("*"):  # progress goes to the terminal only, never into a result file
        if f.suffix in (".json", ".csv", ".yaml", ".md"):
            text = f.read_text()
            assert not any(unit in text for unit in ("step/s", "batch/s", "λ/s", "sweep/s", "layer/s")), f
    for name in ("report.md", "summary.csv", "steps.json", "experiment.yaml", "plots/barrier_vs_width.png",
                 "plots/curves_w0.125.png", "train/w0.125-s0/model.safetensors", "match/w0.125-s0-s1-wm/permuted.safetensors",
                 "interpolate/w0.125-s0-s1/barrier.json", "svd/w0.125-s0-s1/svd.json", "lewc/w0.125-s0-s1-wm/lewc.json"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "## Width 0.125×" in report and "| wm | test |" in report
    rows = _summary(out)
    assert {r["method"] for r in rows} == {"naive", "wm"} and all(r["loss_barrier"] for r in rows)
    # one pair: single values, no ± (and no n); summary.csv in the report's units (pp)
    wm_test = next(line for line in report.splitlines() if line.startswith("| wm | test |"))
    assert "(n=" not in wm_test and "±" not in wm_test and "1 pair per width" in report
    barrier = json.loads((out / "interpolate/w0.125-s0-s1/barrier.json").read_text())
    row = next(r for r in rows if r["method"] == "wm" and r["split"] == "test")
    assert row["n_pairs"] == "1" and float(row["acc_barrier_pp"]) == pytest.approx(
        100 * barrier["results"]["wm"]["test"]["raw"]["accuracy_barrier"])
    assert f"| {float(row['acc_barrier_pp']):.2f} |" in wm_test
    # 64 calibration images: the fitted temperatures are flagged, in barrier.json and in the report
    check = barrier["results"]["wm"]["calibration_check"]
    assert check["reliable"] is False and "64 images" in check["reasons"][0]
    assert "flagged unreliable" in report and row["calibration_reliable"] == "False"

    # Re-running trains nothing: every step is already complete.
    stamp = (out / "train/w0.125-s0/model.safetensors").stat().st_mtime_ns
    again = cli("run", exp, "--out", out)
    assert again.code == 0
    assert again.err.count(": done") == 0 and again.err.count(": skipped") >= 7
    assert (out / "train/w0.125-s0/model.safetensors").stat().st_mtime_ns == stamp
    steps = json.loads((out / "steps.json").read_text())
    assert steps["train w0.125-s0"]["status"] == "skipped"
    assert steps["train w0.125-s0"]["seconds_when_done"] > 0  # how long it took is not forgotten

    # Adding a seed trains exactly the new model (and the new pairs' steps).
    grown = write_yaml(tmp_path / "exp2.yaml", EXPERIMENT.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    dry = cli("run", grown, "--out", out, "--dry-run")
    assert dry.code == 0 and "train w0.125-s2" in dry.err
    more = cli("run", grown, "--out", out)
    assert more.code == 0
    trained = [line for line in more.err.splitlines() if line.split(": ")[0].split("] ")[-1].startswith("train")
               and ": done" in line]
    assert trained == [line for line in trained if "w0.125-s2" in line] and len(trained) == 1
    assert len({(r["seed_a"], r["seed_b"]) for r in _summary(out)}) == 3
    assert {r["n_pairs"] for r in _summary(out)} == {"3"} and "(n=3)" in (out / "report.md").read_text()
    assert "pairs share models" in (out / "report.md").read_text()  # `all` reuses each model in two pairs


def test_disjoint_pairs_share_no_model(tmp_path):
    from lmcx.config import ExperimentConfig, load_config
    from lmcx.layout import seed_pairs

    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.replace("seeds: [0, 1]", "seeds: [0, 1, 2, 3, 4]"))
    pairings = {p: seed_pairs(load_config(ExperimentConfig, exp, [{"pairs": p}]))
                for p in ("all", "consecutive", "disjoint")}
    assert pairings["disjoint"] == [(0, 1), (2, 3)]  # the odd last seed is left out
    assert pairings["consecutive"] == [(0, 1), (1, 2), (2, 3), (3, 4)] and len(pairings["all"]) == 10
    with pytest.raises(LmcxError, match="disjoint"):
        load_config(ExperimentConfig, exp, [{"pairs": "random"}])


def test_changed_settings_are_refused_before_anything_runs(tmp_path, cli):
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.replace("methods: [wm]", "methods: []")
                     .replace("analyses: [svd, lewc]", "analyses: []"))
    assert cli("run", exp, "--out", tmp_path / "out").code == 0
    changed = write_yaml(tmp_path / "changed.yaml", EXPERIMENT.replace("lr: 0.003", "lr: 0.001"))
    assert_clean_error(cli("run", changed, "--out", tmp_path / "out"), "train.lr", "--force")


@pytest.mark.parametrize("edit, fragments", [
    (lambda t: t.replace("widths: [0.125]\n", ""), ["widths", "at least one width"]),
    (lambda t: t.replace("methods: [wm]", "methods: [wm, magic]"), ["methods", "'magic'"]),
    (lambda t: t.replace("pairs: all", "pairs: [[0, 5]]"), ["pairs", "seed 5"]),
    (lambda t: t.replace("analyses: [svd, lewc]", "analyses: [pca]"), ["analyses", "'pca'"]),
    (lambda t: t.replace("seeds: [0, 1]", "seeds: [0]"), ["seeds", "at least two"]),
    (lambda t: t + "colour: blue\n", ["colour", "unknown setting"]),
])
def test_malformed_experiment_fails_before_training(tmp_path, cli, edit, fragments):
    exp = write_yaml(tmp_path / "bad.yaml", edit(EXPERIMENT))
    assert_clean_error(cli("run", exp, "--out", tmp_path / "out"), str(exp), *fragments)
    assert not (tmp_path / "out" / "train").exists()


def test_killed_run_resumes_to_the_same_report(tmp_path, cli):
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.replace("epochs: 3", "epochs: 30")
                     .replace("analyses: [svd, lewc]", "analyses: []"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "lmcx", "run", str(exp), "--out"]
    # the uninterrupted reference runs in this process, on one thread like the subprocesses below
    full = cli("--threads", "1", "run", exp, "--out", tmp_path / "full")
    assert full.code == 0, full.err

    proc = subprocess.Popen(run + [str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "train" / "w0.125-s1" / "train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "report.md").exists(), "the run finished before it could be killed"
    subprocess.run(run + [str(tmp_path / "killed")], env=env, check=True, capture_output=True)
    assert _summary(tmp_path / "killed") == _summary(tmp_path / "full")


def test_threads_only_at_the_top_of_an_experiment(tmp_path, cli):
    ok = write_yaml(tmp_path / "ok.yaml", EXPERIMENT + "threads: 1\n")
    assert cli("run", ok, "--out", tmp_path / "out", "--dry-run").code == 0
    nested = write_yaml(tmp_path / "nested.yaml", EXPERIMENT.replace("interpolate: {", "interpolate: {threads: 2, "))
    assert_clean_error(cli("run", nested, "--out", tmp_path / "out"), "interpolate.threads", "top level")
