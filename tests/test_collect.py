"""`lmcx collect`: one row per run below the given folders, with the figures the runs' own files hold
(checked against independent readers: history.csv and the experiment's summary.csv), and unfinished or
broken runs listed as such instead of a traceback."""
import csv
import json
import shutil
import sys

import pytest

from conftest import REPO, assert_clean_error
from lmcx.collect import collect

EXPERIMENT = """
name: tiny
data: {name: digits, calib_size: 200}
model: {arch: mlp, norm: none, bias: true}
train: {optimizer: adam, lr: 0.001, weight_decay: 0.0, warmup_epochs: 0, epochs: 1, batch_size: 64}
widths: [0.25]
seeds: [0, 1]
methods: [wm]
interpolate: {points: 5, calibrate: true, train_eval_size: 200}
analyses: [svd, lewc]
lewc: {lambdas: [0.5], samples: 50}
device: cpu
"""


def _lmcx(*args) -> None:
    """`lmcx ARGS...` in-process (module-scoped, so without conftest's function-scoped `cli`)."""
    from lmcx.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lmcx", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            main()
    assert exit_.value.code in (0, None), args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An experiment (`lmcx run`: 2 trains, match, interpolate, svd, 2 lewc) and standalone runs beside
    it: a train of another width and seed, a match, an uncalibrated interpolation, two broken
    interpolations and an unfinished train."""
    root = tmp_path_factory.mktemp("collect")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMCX_CACHE_DIR", str(root / "cache"))
        (root / "tiny.yaml").write_text(EXPERIMENT)
        exp, alone = root / "runs" / "exp", root / "runs" / "alone"
        _lmcx("run", root / "tiny.yaml", "--out", exp)
        a, b = exp / "train" / "w0.25-s0", exp / "train" / "w0.25-s1"
        _lmcx("train", "-c", REPO / "configs" / "digits_mlp.yaml", "--width", "0.5", "--epochs", "1", "--seed", "2",
              "--device", "cpu", "--out", alone / "train")
        _lmcx("match", "--a", a, "--b", b, "--device", "cpu", "--out", alone / "match")
        _lmcx("interpolate", "--a", a, "--b", b, "--points", "5", "--set", "train_eval_size=200", "--device", "cpu",
              "--out", alone / "interpolate")
    for name, text in [("not-json", "{not json"), ("no-results", "{}")]:
        broken = alone / name
        broken.mkdir()
        shutil.copy(alone / "interpolate" / "config.yaml", broken / "config.yaml")
        (broken / "barrier.json").write_text(text)
    (alone / "interrupted").mkdir()
    shutil.copy(alone / "train" / "config.yaml", alone / "interrupted" / "config.yaml")
    return root / "runs"


def _by_path(rows):
    return {row["path"]: row for row in rows}


def _summary(exp, method, split="test"):
    with open(exp / "summary.csv") as f:
        return next(r for r in csv.DictReader(f) if r["method"] == method and r["split"] == split)


def test_one_row_per_run_with_kind_and_status(runs):
    rows = collect([runs])
    got = {(r["kind"], r["path"][len(str(runs)) + 1:], r["status"]) for r in rows}
    assert got == {
        ("experiment", "exp", "finished"), ("train", "exp/train/w0.25-s0", "finished"),
        ("train", "exp/train/w0.25-s1", "finished"), ("match", "exp/match/w0.25-s0-s1-wm", "finished"),
        ("interpolate", "exp/interpolate/w0.25-s0-s1", "finished"), ("svd", "exp/svd/w0.25-s0-s1", "finished"),
        ("lewc", "exp/lewc/w0.25-s0-s1-naive", "finished"), ("lewc", "exp/lewc/w0.25-s0-s1-wm", "finished"),
        ("train", "alone/train", "finished"), ("match", "alone/match", "finished"),
        ("interpolate", "alone/interpolate", "finished"), ("interpolate", "alone/not-json", "broken"),
        ("interpolate", "alone/no-results", "broken"), ("train", "alone/interrupted", "unfinished")}
    assert len(rows) == len(got)
    assert all(list(r) == list(rows[0]) for r in rows)  # one set of columns, in one order
    assert [r["kind"] for r in rows] == sorted((r["kind"] for r in rows), key=[
        "experiment", "train", "match", "interpolate", "svd", "lewc"].index)
    # overlapping paths list a run once
    assert len(collect([runs, runs / "exp", runs / "exp" / "train" / "w0.25-s0", runs / "exp" / ".." / "exp"])) == len(rows)


def test_figures_are_the_runs_numbers(runs):
    exp = runs / "exp"
    rows = _by_path(collect([runs]))
    for seed in (0, 1):
        run = exp / "train" / f"w0.25-s{seed}"
        with open(run / "history.csv") as f:
            last = list(csv.DictReader(f))[-1]
        row = rows[str(run)]
        assert row["test_accuracy"] == pytest.approx(float(last["test_accuracy"]), rel=1e-12)
        assert row["test_loss"] == pytest.approx(float(last["test_loss"]), rel=1e-12)

    curve = rows[str(exp / "interpolate" / "w0.25-s0-s1")]
    for method in ("naive", "wm"):
        s = _summary(exp, method)  # written by `lmcx report` from the same barrier.json
        assert curve[f"loss_barrier_{method}"] == float(s["loss_barrier"])
        assert curve[f"calibrated_loss_barrier_{method}"] == float(s["calibrated_loss_barrier"])
        assert 100 * curve[f"accuracy_barrier_{method}"] == pytest.approx(float(s["acc_barrier_pp"]), rel=1e-12)
        lewc = rows[str(exp / "lewc" / f"w0.25-s0-s1-{method}")]
        assert lewc["lewc_cos_lambda0.5"] == float(s["lewc_cos_lambda0.5"])
        assert lewc["llfc_cos_lambda0.5"] == float(s["llfc_cos_lambda0.5"])
    assert curve["loss_barrier_wm"] < curve["loss_barrier_naive"]

    svd, match = rows[str(exp / "svd" / "w0.25-s0-s1")], rows[str(exp / "match" / "w0.25-s0-s1-wm")]
    assert svd["alignment_R_gamma0.3_naive"] == float(_summary(exp, "naive")["alignment_R_gamma0.3"])
    assert svd["alignment_R_gamma0.3_permuted"] == float(_summary(exp, "wm")["alignment_R_gamma0.3"])
    assert 100 * (1 - svd["l2_after"] / svd["l2_before"]) == pytest.approx(
        float(_summary(exp, "wm")["l2_relative_reduction_pct"]))
    # an MLP without buffers: the match's L2 (every float tensor) is the SVD's (parameters)
    assert match["l2_before"] == pytest.approx(svd["l2_before"], rel=1e-12)
    assert match["l2_after"] == pytest.approx(svd["l2_after"], rel=1e-12) and match["l2_after"] < match["l2_before"]
    metrics = json.loads((runs / "alone" / "match" / "metrics.json").read_text())
    assert rows[str(runs / "alone" / "match")]["l2_after"] == metrics["l2_after"]["total"] == match["l2_after"]

    experiment = rows[str(exp)]
    assert (experiment["steps_done"], experiment["steps_failed"], experiment["steps_total"]) == (7, 0, 7)
    uncalibrated = rows[str(runs / "alone" / "interpolate")]
    assert uncalibrated["calibrated_loss_barrier_naive"] is None
    assert uncalibrated["loss_barrier_naive"] == curve["loss_barrier_naive"]  # same models, grid and data


def test_only_differing_settings_become_columns(runs):
    row = collect([runs])[0]
    assert {"model.width", "seed", "a", "b", "interpolate.calibrate"} <= set(row)
    assert "train.lr" not in row and "data.name" not in row  # the same in every run
    assert "device" not in row and "out" not in row  # never a setting of the results
    assert "model.width" not in collect([runs / "exp" / "train"])[0]  # both w0.25


def test_broken_and_unfinished_runs_say_why(runs):
    rows = _by_path(collect([runs / "alone"]))
    assert "not valid JSON" in rows[str(runs / "alone" / "not-json")]["note"]
    assert "lacks the expected figures" in rows[str(runs / "alone" / "no-results")]["note"]
    interrupted = rows[str(runs / "alone" / "interrupted")]
    assert "no metrics.json" in interrupted["note"] and interrupted["test_accuracy"] is None


def test_experiment_status_from_steps_and_report(runs, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(runs / "exp", exp, ignore=shutil.ignore_patterns("train", "match", "interpolate", "svd", "lewc"))
    (exp / "report.md").unlink()
    assert collect([exp])[0]["status"] == "unfinished"
    steps = json.loads((exp / "steps.json").read_text())
    label = next(iter(steps))
    steps[label] = {"status": "failed", "reason": "boom", "out": "x"}
    (exp / "steps.json").write_text(json.dumps(steps))
    row = collect([exp])[0]
    assert row["status"] == "failed" and row["steps_failed"] == 1 and row["note"] == f"{label}: boom"


def test_cli_table_csv_and_json(runs, tmp_path, cli):
    rows = collect([runs])
    result = cli("collect", runs, "--csv", tmp_path / "runs.csv")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split()[:3] == ["kind", "path", "status"] and len(lines) == 1 + len(rows)
    assert any(line.split()[:3] == ["interpolate", "alone/not-json", "broken"] for line in lines)
    assert "14 runs below" in result.err and "Traceback" not in result.err
    with open(tmp_path / "runs.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(rows[0]) and len(table) == len(rows)
    assert [float(r["test_accuracy"]) for r in table if r["test_accuracy"]] == [
        r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]

    result = cli("collect", runs, "--json")
    assert result.code == 0 and json.loads(result.out) == json.loads(json.dumps(rows))


def test_cli_bad_path_is_one_line(cli, tmp_path):
    assert_clean_error(cli("collect", tmp_path / "nowhere"), "nowhere", "is not a directory")
    result = cli("collect", tmp_path)
    assert result.code == 0 and "0 runs below" in result.err
