"""Reliability, second round, phase 2 (issue 14): logits caches, exact endpoints, injective names, the
experiment's own lock, moved experiments, strict readers.

docs/RELIABILITY.md lists every fault with the test here that checks it (R3::). Models are test_reliability's
tiny synthetic MLPs; commands run in-process through the `cli` fixture, except where a second process is the
point.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, write_yaml
from test_reliability import models  # noqa: F401 - fixture
from test_reliability2 import TINY_EXPERIMENT

from lmcx.errors import LmcxError

# 20 examples (each a `calibrate --force`, ~0.5 s): every bad kind is also checked once, in order, by
# test_logits_caches_that_do_not_fit_are_refused; the fuzz adds other splits, labels and harmless edits
FUZZ = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# 1. Logits caches: labels, λ grids and shapes that do not fit are one error line


@pytest.fixture(scope="module")
def calibrated(models, tmp_path_factory):  # noqa: F811 - pytest fixture
    """models/curve calibrated once, so its cache holds every split (calibrate --force then needs no model)."""
    from lmcx.interpolate import calibrate_dir

    out = tmp_path_factory.mktemp("calibrated") / "curve"
    shutil.copytree(models / "curve", out)
    calibrate_dir(out, "cpu")
    return out


def _cache(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = directory / "logits.safetensors"
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), json.loads(f.metadata()["lmcx"])


def _copy_with(calibrated: Path, out: Path, tensors: dict, meta: dict | None = None, raw: str | None = None) -> Path:
    shutil.copytree(calibrated, out)
    tensors = {k: v.clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "logits.safetensors"), metadata={"lmcx": raw if raw is not None else json.dumps(meta)})
    return out


def _bad_caches(tensors: dict, meta: dict, split: str = "test", i: int = 0) -> dict[str, tuple[dict, dict]]:
    """Caches damaged in one known-bad way each, on `split` and the `i`-th label."""
    other = f"logits/{1 - i}/{'train' if split == 'test' else 'test'}"
    lam, y, z = tensors["lambdas"], tensors[f"targets/{split}"], tensors[f"logits/{i}/{split}"]
    classes = z.shape[-1]
    cases = {
        "lambdas too short": {"lambdas": lam[:-1]},
        "lambdas with NaN": {"lambdas": torch.cat([lam[:2], torch.tensor([float("nan")], dtype=lam.dtype), lam[3:]])},
        "lambdas outside [0, 1]": {"lambdas": lam * 1.5},
        "lambdas unsorted": {"lambdas": lam[[0, 2, 1, 3, 4]]},
        "lambdas repeated": {"lambdas": lam[[0, 1, 1, 3, 4]]},
        "lambdas not float": {"lambdas": torch.arange(len(lam))},
        "targets too long": {f"targets/{split}": torch.cat([y, y[:1]])},
        "targets out of range": {f"targets/{split}": torch.where(y == 0, torch.full_like(y, classes), y)},
        "negative targets": {f"targets/{split}": y - 1},
        "targets not integers": {f"targets/{split}": y.float() + 0.5},
        "logits of another length": {f"logits/{i}/{split}": z[:, :-1]},
        "logits of another grid": {other: tensors[other][:-1]},
        "logits of another class count": {f"logits/{i}/{split}": z[..., :-1]},
        "logits as integers": {f"logits/{i}/{split}": z.long()},
        "logits of a third label": {f"logits/7/{split}": z},
        "logits with a negative index": {f"logits/-1/{split}": z},
    }
    out = {name: ({**tensors, **change}, meta) for name, change in cases.items()}
    out["a split missing"] = ({k: v for k, v in tensors.items() if k != other}, meta)
    out["targets missing"] = ({k: v for k, v in tensors.items() if k != f"targets/{split}"}, meta)
    out["labels not a list"] = (tensors, {**meta, "labels": "naive"})
    out["labels repeated"] = (tensors, {**meta, "labels": ["wm", "wm"]})
    out["one label too many"] = (tensors, {**meta, "labels": [*meta["labels"], "ste"]})
    return out


def test_logits_caches_that_do_not_fit_are_refused(calibrated, tmp_path, cli):
    tensors, meta = _cache(calibrated)
    for i, (name, (t, m)) in enumerate(_bad_caches(tensors, meta).items()):
        out = _copy_with(calibrated, tmp_path / str(i), t, m)
        before = (out / "barrier.json").read_bytes()
        assert_clean_error(cli("calibrate", out, "--force"), "not a readable logits cache")
        assert (out / "barrier.json").read_bytes() == before, name
    dup = json.dumps(meta)[:-1] + ', "labels": ["x", "y"]}'
    assert "duplicate key" in cli("calibrate", _copy_with(calibrated, tmp_path / "dup", tensors, raw=dup),
                                  "--force").err


@FUZZ
@given(data=st.data())
def test_fuzzed_logits_caches_through_calibrate(calibrated, tmp_path_factory, cli, data):
    """Each example damages the cache in one known-bad way (drawn from the list above, on a random split and
    label), or changes it in a harmless way (new logits values, renamed labels, other valid targets): the bad
    ones are one error line and leave barrier.json as it was, the harmless ones calibrate."""
    tensors, meta = _cache(calibrated)
    names = [k for k in tensors if k.startswith(("logits/", "targets/"))]
    harmless = data.draw(st.booleans())
    if harmless:
        kind = data.draw(st.sampled_from(["values", "labels", "targets"]))
        name = data.draw(st.sampled_from([n for n in names if n.startswith("logits/" if kind == "values" else
                                                                             "targets/")]))
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31)))
        t, m = dict(tensors), dict(meta)
        if kind == "values":
            t[name] = torch.randn(t[name].shape, generator=gen) * data.draw(st.floats(1e-3, 1e3))
        elif kind == "targets":
            t[name] = torch.randint(0, tensors["logits/0/test"].shape[-1], t[name].shape, generator=gen)
        else:
            m["labels"] = data.draw(st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8), min_size=len(meta["labels"]),
                                             max_size=len(meta["labels"]), unique=True))
    else:
        split, i = data.draw(st.sampled_from(["test", "train", "calib"])), data.draw(st.sampled_from([0, 1]))
        t, m = data.draw(st.sampled_from(sorted(_bad_caches(tensors, meta, split, i).items())))[1]
    out = _copy_with(calibrated, tmp_path_factory.mktemp("fuzz") / "curve", t, m)
    before = (out / "barrier.json").read_bytes()
    result = cli("calibrate", out, "--force")
    assert "Traceback" not in result.err
    if harmless:
        assert result.code == 0, result.err
        assert json.loads((out / "barrier.json").read_text())["calibration"]["calibrated"]
    else:
        assert_clean_error(result, "not a readable logits cache")
        assert (out / "barrier.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 2. θ(λ): each endpoint is exactly that endpoint


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def test_endpoints_of_the_path_are_bitwise_the_endpoints(models):  # noqa: F811 - fixture
    from lmcx.checkpoint import build_from_checkpoint, load_checkpoint
    from lmcx.interpolate import Interpolator, lerp_state

    model_a = build_from_checkpoint(load_checkpoint(models / "s0"))
    model_b = build_from_checkpoint(load_checkpoint(models / "s1"))
    with torch.no_grad():  # signed zeros: −0·1 + 0·0 is +0, so arithmetic would not give A back
        for pa, pb in zip(model_a.parameters(), model_b.parameters()):
            pa[..., :3] = -0.0
            pb[..., 3:6] = -0.0
            pb[..., :3] = 0.0
    a, b = model_a.state_dict(), model_b.state_dict()
    interp = Interpolator(model_a, model_b, [], "none")
    for lam, end in ((0.0, a), (1.0, b)):
        for state in (lerp_state(a, b, lam), interp.at(lam).state_dict()):
            assert all(torch.equal(_bits(state[k]), _bits(end[k])) for k in end), lam
    mid = lerp_state(a, b, 0.5)
    assert not all(torch.equal(mid[k], a[k]) for k in a)


def test_a_nan_in_b_never_reaches_a_and_the_library_refuses_it(models):  # noqa: F811 - fixture
    from lmcx.checkpoint import build_from_checkpoint, load_checkpoint
    from lmcx.interpolate import Interpolator, lerp_state

    model_a = build_from_checkpoint(load_checkpoint(models / "s0"))
    model_b = build_from_checkpoint(load_checkpoint(models / "s1"))
    with torch.no_grad():
        next(model_b.parameters())[0, 0] = float("nan")
    a, b = model_a.state_dict(), model_b.state_dict()
    at_a = lerp_state(a, b, 0.0)
    assert all(torch.equal(at_a[k], a[k]) for k in a)
    for norm_fix in ("none", "repair"):
        with pytest.raises(LmcxError, match="model B: tensor .* NaN"):
            Interpolator(model_a, model_b, [], norm_fix)


# ---------------------------------------------------------------------------------------------
# 3. Names are injective over distinct settings


@pytest.mark.parametrize("edit, fragment", [
    (("widths: [0.125]", "widths: [0.125, 0.1250001]"), "0.125 and 0.1250001 would share the directories named w0.125"),
    (("widths: [0.125]", "widths: [1, 1.0000001]"), "1.0 and 1.0000001 would share"),
    (("lambdas: [0.25, 0.5]", "lambdas: [0.25, 0.2500001]"), "lewc.lambdas"),
    (("analyses: []", "analyses: [svd]\nsvd: {gammas: [0.3, 0.30000001]}"), "svd.gammas"),
])
def test_settings_whose_names_collide_are_refused(tmp_path, cli, edit, fragment):
    text = TINY_EXPERIMENT.replace(*edit)
    assert text != TINY_EXPERIMENT
    exp = write_yaml(tmp_path / "exp.yaml", text)
    assert_clean_error(cli("run", exp, "--out", tmp_path / "out", "--dry-run"), fragment)
    assert not (tmp_path / "out").exists()


def test_distinct_names_are_still_accepted(tmp_path, cli):
    exp = write_yaml(tmp_path / "exp.yaml", TINY_EXPERIMENT.replace("widths: [0.125]", "widths: [0.125, 0.12501]"))
    result = cli("run", exp, "--out", tmp_path / "out", "--dry-run")
    assert result.code == 0, result.err
    assert "train w0.125-s0" in result.out + result.err and "train w0.12501-s0" in result.out + result.err


# ---------------------------------------------------------------------------------------------
# 4. `lmcx run` claims its experiment folder; 5. a moved experiment keeps its finished steps


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny experiment (run once per module, in this process: module-scoped, so without conftest's
    function-scoped `cli`), copied by the tests that change it."""
    from lmcx.cli import main

    root = tmp_path_factory.mktemp("finished")
    exp = write_yaml(root / "exp.yaml", TINY_EXPERIMENT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["lmcx", "--threads", "1", "run", str(exp), "--out", str(root / "out")])
        try:
            main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
    return root


def test_a_second_lmcx_run_of_one_experiment_waits_for_the_first(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished / "out", out)
    steps = (out / "steps.json").read_bytes()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMCX_LOCK_TIMEOUT": "120"}
    second = subprocess.Popen([sys.executable, "-m", "lmcx", "run", str(finished / "exp.yaml"), "--out", str(out)],
                              env=env, stderr=subprocess.PIPE, text=True)
    try:
        said = second.stderr.readline()  # blocks until it says something: that it waits for us
        assert f"waiting for process {os.getpid()}" in said, said
        assert second.poll() is None and (out / "steps.json").read_bytes() == steps
    finally:
        os.close(fd)  # let go: the second run goes on, and finds every step finished
    err = said + second.communicate(timeout=120)[1]
    assert second.returncode == 0, err
    assert ": done" not in err and "interpolate w0.125-s0-s1: skipped" in err


@pytest.mark.parametrize("how", ["moved", "absolute"])
def test_a_moved_experiment_folder_skips_every_finished_step(finished, tmp_path, cli, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "renamed" / "elsewhere"
    out.parent.mkdir()
    shutil.copytree(finished / "out", out)  # as a move: the recorded paths name the old folder
    again = cli("run", finished / "exp.yaml", "--out", out if how == "absolute" else "renamed/elsewhere")
    assert again.code == 0, again.err
    assert ": done" not in again.err and "train w0.125-s0: skipped" in again.err
    assert "interpolate w0.125-s0-s1: skipped" in again.err


def test_a_moved_experiment_still_refuses_changed_settings(finished, tmp_path, cli):
    out = tmp_path / "moved"
    shutil.copytree(finished / "out", out)
    changed = write_yaml(tmp_path / "b.yaml", TINY_EXPERIMENT.replace("points: 5", "points: 3"))
    assert_clean_error(cli("run", changed, "--out", out), "other settings", "interpolate.points")


# ---------------------------------------------------------------------------------------------
# 6. Every reader of recorded YAML is strict


def test_recorded_yaml_with_a_duplicate_key_is_refused_by_report_and_collect(finished, tmp_path, cli):
    out = tmp_path / "out"
    shutil.copytree(finished / "out", out)
    text = (out / "experiment.yaml").read_text()
    (out / "experiment.yaml").write_text(text + "name: again\n")
    assert_clean_error(cli("report", out), "experiment.yaml", "duplicate key 'name'")
    result = cli("collect", out)
    assert "Traceback" not in result.err
    assert "duplicate key 'name'" in result.out + result.err
