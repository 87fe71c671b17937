"""Reliability, second round (issue 14): silent wrong results, untrusted headers, hostile configs, processes.

docs/RELIABILITY.md lists every fault with the test here that checks it. Models are conftest's tiny synthetic
MLPs (test_reliability's `models` fixture); commands run in-process through the `cli` fixture, except where a
real signal or a second process is the point.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import SYNTHETIC_TRAIN, assert_clean_error, write_yaml
from test_experiment import EXPERIMENT
from test_reliability import interpolate_args, models, same_weights, temp_files  # noqa: F401 - models: fixture

from lmcx.errors import BUSY_EXIT_CODE, TERMINATED_EXIT_CODE, LmcxError

TINY_EXPERIMENT = EXPERIMENT.replace("methods: [wm]", "methods: []").replace("analyses: [svd, lewc]", "analyses: []")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def header_of(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["lmcx"])


def rewrite(path: Path, out: Path, tensors=None, header=None, raw_header: str | None = None) -> Path:
    """A copy of checkpoint `path` with other tensors and/or another lmcx header."""
    state = load_file(str(path)) if tensors is None else tensors
    text = raw_header if raw_header is not None else json.dumps(header_of(path) if header is None else header)
    save_file(state, str(out), metadata={"lmcx": text})
    return out


def _interrupt_at_second_state(monkeypatch):
    """Ctrl-C while the training state of epoch 2 is being saved (epoch 1's is kept); returns `restore`."""
    import lmcx.checkpoint as checkpoint

    calls, real_save = [], checkpoint.torch.save

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    return lambda: monkeypatch.setattr(checkpoint.torch, "save", real_save)


def one_error_line(result) -> str:
    """conftest's assert_clean_error (one `error:` line, exit 2, no traceback), returning that line."""
    assert_clean_error(result)
    return result.err.strip()


# ---------------------------------------------------------------------------------------------
# 1. Completeness: the marker, the recorded settings and every file they vouch for must parse


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGES = {
    "empty model": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "truncated model": ("model.safetensors", _truncate),
    "missing model": ("model.safetensors", lambda p: p.unlink()),
    "model without lmcx header": ("model.safetensors", lambda p: save_file(load_file(str(p)), str(p))),
    "broken meta.json": ("meta.json", lambda p: p.write_text('{"architecture": ')),
    "empty history.csv": ("history.csv", lambda p: p.write_text("")),
    "empty marker": ("metrics.json", lambda p: p.write_text("")),
    "missing settings": ("config.yaml", lambda p: p.unlink()),
    "empty settings": ("config.yaml", lambda p: p.write_text("")),
    "unreadable settings": ("config.yaml", lambda p: p.write_bytes(b"\xff\xfe\x00 not yaml: [")),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_finished_train_directory_with_a_damaged_file_is_redone(tmp_path, models, synthetic_config, cli, damage):
    run = tmp_path / "run"
    assert cli("train", "-c", synthetic_config, "--out", run).code == 0
    name, damage_fn = DAMAGES[damage]
    damage_fn(run / name)
    again = cli("train", "-c", synthetic_config, "--out", run)
    assert again.code == 0 and "already complete" not in again.err, again.err
    assert "not complete after all" in again.err and name in again.err
    assert same_weights(run / "model.safetensors", models / "s0" / "model.safetensors")
    assert cli("train", "-c", synthetic_config, "--out", run).code == 0  # now complete: skipped
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3


def test_missing_settings_never_match_other_settings(tmp_path, synthetic_config, cli):
    run = tmp_path / "run"
    assert cli("train", "-c", synthetic_config, "--out", run).code == 0
    (run / "config.yaml").unlink()
    result = cli("train", "-c", synthetic_config, "--out", run, "--epochs", "2")
    assert result.code == 0 and "already complete" not in result.err
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2  # trained with the settings given


@pytest.mark.parametrize("name, content, fragment", [
    ("curve.png", b"\x89PNG\r\n\x1a\n truncated", "curve.png"),
    ("curve.csv", b"lambda,loss\n0,1", "curve.csv"),
    ("barrier.json", b"[1, 2", "barrier.json"),
    ("extra.yaml", b"a: 1\na: 2\n", "extra.yaml"),
    ("logits.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "logits.safetensors"),
])
def test_completeness_checks_every_kind_of_output(tmp_path, name, content, fragment):
    from lmcx.rundir import incomplete_reason, start
    from lmcx.io import write_json

    run = tmp_path / "run"
    run.mkdir()
    start(run, {"x": 1}, [], "barrier.json")
    write_json(run / "barrier.json", {"results": {}})
    assert incomplete_reason(run, "barrier.json") is None
    (run / name).write_bytes(content)
    reason = incomplete_reason(run, "barrier.json")
    assert reason is not None and fragment in reason


def test_lmcx_run_redoes_a_training_whose_model_file_is_empty(tmp_path, cli):
    exp = write_yaml(tmp_path / "exp.yaml", TINY_EXPERIMENT)
    out = tmp_path / "out"
    assert cli("run", exp, "--out", out).code == 0
    (out / "train" / "w0.125-s1" / "model.safetensors").write_bytes(b"")
    again = cli("run", exp, "--out", out)
    assert again.code == 0, again.err
    assert "train w0.125-s1: done" in again.err and "train w0.125-s0: skipped" in again.err
    assert cli("evaluate", out / "train" / "w0.125-s1").code == 0


# ---------------------------------------------------------------------------------------------
# 2. Non-finite or non-floating weights are refused by every command that reads weights


def _poisoned(models: Path, tmp_path: Path, kind: str) -> Path:
    state = load_file(str(models / "s1" / "model.safetensors"))
    if kind == "nan":
        state["layers.0.linear.weight"][0, 0] = float("nan")
    elif kind == "inf":
        state["classifier.weight"][1, 2] = float("-inf")
    elif kind == "int64":
        state = {k: v.round().long() for k, v in state.items()}
    else:  # one boolean tensor
        state["classifier.bias"] = state["classifier.bias"] > 0
    return rewrite(models / "s1" / "model.safetensors", tmp_path / f"{kind}.safetensors", tensors=state)


def _weight_commands(models: Path, bad: Path, out: Path) -> dict[str, list]:
    a, perm = models / "s0", models / "match" / "permutation.json"
    return {
        "evaluate": ["evaluate", bad],
        "match wm (B)": ["match", "--a", a, "--b", bad, "--out", out],
        "match am (A)": ["match", "--method", "am", "--set", "am_samples=64", "--a", bad, "--b", a, "--out", out],
        "interpolate (B)": ["interpolate", "--a", a, "--b", bad, "--points", "3", "--out", out],
        "interpolate --perm (B)": ["interpolate", "--a", a, "--b", bad, "--perm", perm, "--out", out],
        "analyze-svd (A)": ["analyze-svd", "--a", bad, "--b", a, "--out", out],
        "lewc (B)": ["lewc", "--a", a, "--b", bad, "--samples", "16", "--out", out],
    }


@pytest.mark.parametrize("kind, fragment", [("nan", "NaN or infinite"), ("inf", "NaN or infinite"),
                                            ("int64", "not floating-point"), ("bool", "not floating-point")])
def test_non_finite_or_non_float_weights_are_refused_by_every_command(tmp_path, models, cli, kind, fragment):
    bad = _poisoned(models, tmp_path, kind)
    for name, args in _weight_commands(models, bad, tmp_path / "out").items():
        line = one_error_line(cli(*args))
        assert str(bad) in line and fragment in line and "tensor" in line, (name, line)
        assert not any((tmp_path / "out").glob("*.json")), name  # no marker, no result


@pytest.mark.parametrize("kind", ["nan", "int64"])
def test_weight_matching_refuses_such_state_dicts(models, tmp_path, kind):
    from lmcx.checkpoint import load_checkpoint
    from lmcx.models import permutation_spec
    from lmcx.permutation import weight_matching

    a = load_checkpoint(models / "s0")
    bad = load_file(str(_poisoned(models, tmp_path, kind)))
    with pytest.raises(LmcxError, match="model B: tensor"):
        weight_matching(permutation_spec(a.model, a.in_shape, a.num_classes), a.state, bad)


def test_resuming_from_a_state_with_nan_weights_is_refused(tmp_path, synthetic_config, cli, monkeypatch):
    run = tmp_path / "run"
    restore = _interrupt_at_second_state(monkeypatch)
    assert cli("train", "-c", synthetic_config, "--out", run).code == 130
    restore()
    state = torch.load(run / "train_state.pt", weights_only=True)
    next(iter(state["model"].values())).fill_(float("nan"))
    torch.save(state, run / "train_state.pt")
    line = one_error_line(cli("train", "-c", synthetic_config, "--out", run))
    assert "train_state.pt" in line and "NaN" in line
    assert not (run / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# 3. Duplicate keys: an error naming the key (and for YAML the lines), never "the last one wins"

DUPLICATE_TRAIN = SYNTHETIC_TRAIN + "train: {optimizer: sgd, lr: 0.1, epochs: 100}\n"


def test_duplicate_yaml_keys_in_configs_experiments_and_set(tmp_path, cli):
    config = write_yaml(tmp_path / "dup.yaml", DUPLICATE_TRAIN)
    line = one_error_line(cli("train", "-c", config, "--out", tmp_path / "run"))
    assert "duplicate key 'train'" in line and "line 9" in line and "first at line 7" in line
    assert not (tmp_path / "run").exists()
    exp = write_yaml(tmp_path / "exp.yaml", TINY_EXPERIMENT + "seeds: [0, 1, 2]\n")
    assert "duplicate key 'seeds'" in one_error_line(cli("run", exp, "--out", tmp_path / "e", "--dry-run"))
    match = write_yaml(tmp_path / "m.yaml", "method: wm\nste: {epochs: 1, epochs: 2}\n")
    assert "duplicate key 'epochs'" in one_error_line(cli("match", "-c", match, "--a", "x", "--b", "y"))
    line = one_error_line(cli("train", "-c", write_yaml(tmp_path / "ok.yaml", SYNTHETIC_TRAIN),
                              "--set", "train={lr: 0.1, lr: 0.2}", "--out", tmp_path / "run"))
    assert "--set train" in line and "duplicate key 'lr'" in line


def test_duplicate_json_keys_in_permutation_barrier_and_checkpoint_header(tmp_path, models, cli):
    perm = json.loads((models / "match" / "permutation.json").read_text())
    name = next(iter(perm["permutations"]))
    body = json.dumps(perm["permutations"][name])
    text = (models / "match" / "permutation.json").read_text()
    dup = tmp_path / "dup.json"
    dup.write_text(text.replace('"permutations": {', f'"permutations": {{"{name}": {body}, ', 1))
    line = one_error_line(cli("interpolate", "--a", models / "s0", "--b", models / "s1", "--perm", dup,
                              "--points", "3", "--out", tmp_path / "i"))
    assert "duplicate key" in line and name in line and str(dup) in line
    curve = tmp_path / "curve"
    shutil.copytree(models / "curve", curve)
    barrier = (curve / "barrier.json").read_text()
    (curve / "barrier.json").write_text(barrier.replace("{", '{"results": {}, ', 1))
    assert "duplicate key 'results'" in one_error_line(cli("calibrate", curve))
    header = json.dumps(header_of(models / "s0" / "model.safetensors"))
    bad = rewrite(models / "s0" / "model.safetensors", tmp_path / "h.safetensors",
                  raw_header=header.replace("{", '{"num_classes": 1000, ', 1))
    assert "duplicate key 'num_classes'" in one_error_line(cli("evaluate", bad))


# ---------------------------------------------------------------------------------------------
# 4. A checkpoint header is data: range-checked, never a download, never an unbounded allocation


def _edit(header: dict, path: str, value) -> dict:
    header = json.loads(json.dumps(header))
    *parents, last = path.split(".")
    node = header
    for p in parents:
        node = node[p]
    node[last] = value
    return header


@pytest.mark.parametrize("path, value, fragment", [
    ("model.width", 1e9, "model.width"),
    ("model.width", -1, "model.width"),
    ("num_classes", 10 ** 12, "number of classes"),
    ("num_classes", True, "num_classes"),
    ("in_shape", [3, 10 ** 6, 10 ** 6], "input shape"),
    ("in_shape", "abc", "in_shape"),
    ("data.synthetic.train_size", 10 ** 11, "data.synthetic"),
    ("data.synthetic.num_classes", 10 ** 12, "data.synthetic"),
    ("data.synthetic.shape", [1, 10 ** 5, 10 ** 5], "data.synthetic.shape"),
    ("data.name", "digits", "do not fit digits"),  # 4 classes where digits has 10
    ("info", [1], "info"),
    ("model", [1], "model and data"),
])
def test_header_values_are_range_checked_before_allocation(tmp_path, models, cli, path, value, fragment):
    header = _edit(header_of(models / "s0" / "model.safetensors"), path, value)
    bad = rewrite(models / "s0" / "model.safetensors", tmp_path / "bad.safetensors", header=header)
    started = time.perf_counter()
    line = one_error_line(cli("evaluate", bad))
    assert fragment in line and str(bad) in line, line
    assert time.perf_counter() - started < 60  # refused, not attempted (a 10¹¹-image dataset would take hours)


def test_a_header_asking_for_a_download_does_not_download(tmp_path, models, cli, monkeypatch):
    import torchvision.datasets as tvd

    from lmcx.checkpoint import Checkpoint, save_checkpoint
    from lmcx.config import DataConfig, ModelConfig
    from lmcx.models import build_model

    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append(download)
            raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(tvd, "MNIST", FakeMNIST)
    model = ModelConfig(width=0.25, norm="none")
    data = DataConfig(name="mnist", download=True, root=str(tmp_path / "elsewhere"))
    bad = tmp_path / "dl.safetensors"
    save_checkpoint(bad, Checkpoint(model, data, (1, 28, 28), 10, build_model(model, (1, 28, 28), 10).state_dict()))
    assert "not found" in one_error_line(cli("evaluate", bad))
    assert calls == [False] and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("flag, fragment", [
    (["--width", "1e9"], "model.width"),
    (["--width", "200"], "parameters"),
    (["--set", "data.synthetic.train_size=100000000000"], "data.synthetic.train_size"),
    (["--set", "data.synthetic.num_classes=1000000000000"], "data.synthetic.num_classes"),
    (["--set", "data.synthetic.shape=[1, 100000, 100000]"], "data.synthetic.shape"),
])
def test_sizes_from_flags_are_range_checked(tmp_path, synthetic_config, cli, flag, fragment):
    line = one_error_line(cli("train", "-c", synthetic_config, *flag, "--out", tmp_path / "run"))
    assert fragment in line
    assert not (tmp_path / "run" / "metrics.json").exists()


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() |
                       st.text(max_size=12), lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
HEADER_PATHS = ["model", "model.arch", "model.width", "model.norm", "model.bias", "data", "data.name",
                "data.synthetic", "data.synthetic.train_size", "data.synthetic.test_size", "data.synthetic.shape",
                "data.synthetic.num_classes", "data.synthetic.seed", "data.calib_size", "data.train_size",
                "data.download", "data.root", "data.path", "in_shape", "num_classes", "info", "extra"]


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(HEADER_PATHS), JSONISH), min_size=1, max_size=3),
       raw=st.none() | st.text(max_size=40))
def test_fuzzed_checkpoint_headers_never_give_a_traceback(tmp_path_factory, models, cli, edits, raw):
    """Random JSON-ish values at random places of a valid header (or a random string as the header): either
    a clean error, or (when the edits happen to be valid) an evaluation of a model that really is the file."""
    header = header_of(models / "s0" / "model.safetensors")
    for path, value in edits:
        try:
            header = _edit(header, path, value)
        except (KeyError, TypeError, IndexError):
            pass  # a parent was replaced by a scalar earlier: skip this edit
    tmp = tmp_path_factory.mktemp("h")
    bad = rewrite(models / "s0" / "model.safetensors", tmp / "fuzz.safetensors", header=header, raw_header=raw)
    result = cli("evaluate", bad)
    assert "Traceback" not in result.err
    if result.code == 0:
        assert json.loads(result.out)["accuracy"] >= 0 and raw is None
    else:
        one_error_line(result)


# ---------------------------------------------------------------------------------------------
# 3b. Permutation files, fuzzed: accepted only when they are exactly a permutation of the model's units


def _perm_target(models: Path):
    from lmcx.checkpoint import load_checkpoint
    from lmcx.models import permutation_spec

    b = load_checkpoint(models / "s1")
    return permutation_spec(b.model, b.in_shape, b.num_classes), b.state


def _perm_edit(doc, path: list, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@FUZZ
@given(data=st.data())
def test_fuzzed_permutation_files_are_accepted_only_when_exact(tmp_path_factory, models, data):
    from lmcx.permutation.spec import check_permutation, load_permutation_file

    spec, params = _perm_target(models)
    doc = json.loads((models / "match" / "permutation.json").read_text())
    names = sorted(doc["permutations"])
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        place = data.draw(st.sampled_from([["format"], ["info"], ["permutations"], ["permutations", name],
                                           ["permutations", name, 0], ["permutations", "extra"], ["extra"]]))
        try:
            _perm_edit(doc, place, data.draw(JSONISH | st.permutations(range(len(doc["permutations"][name])))))
        except (KeyError, TypeError, IndexError):
            pass
    text = json.dumps(doc)
    if data.draw(st.booleans()):  # a key given twice, the second with another value
        text = text.replace('"permutations": {', '"permutations": {"%s": [0], ' % name, 1)
    path = tmp_path_factory.mktemp("p") / "perm.json"
    path.write_text(text)
    try:
        perm = load_permutation_file(path, spec, params)
    except LmcxError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    parsed = json.loads(text, object_pairs_hook=lambda pairs: (len(pairs) == len(dict(pairs))) and dict(pairs))
    assert parsed, "a file with a duplicate key was accepted"
    assert set(perm) == set(spec.names) == set(parsed["permutations"])
    check_permutation(spec, perm, params)
    assert all(perm[k].tolist() == parsed["permutations"][k] for k in perm)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edit=st.sampled_from(["truncate", "dup", "float", "shuffle", "short", "nested"]),
       cut=st.integers(0, 400))
def test_fuzzed_permutation_files_through_the_cli(tmp_path_factory, models, cli, edit, cut):
    text = (models / "match" / "permutation.json").read_text()
    doc = json.loads(text)
    name = sorted(doc["permutations"])[0]
    units = doc["permutations"][name]
    if edit == "truncate":
        text = text[:cut]
    elif edit == "dup":
        text = text.replace('"permutations": {', f'"permutations": {{"{name}": {json.dumps(units)}, ', 1)
    elif edit in ("float", "shuffle", "short", "nested"):
        doc["permutations"][name] = {"float": [u + 0.5 for u in units], "shuffle": units[1:] + units[:1],
                                     "short": units[:-1], "nested": [units]}[edit]
        text = json.dumps(doc)
    tmp = tmp_path_factory.mktemp("c")
    (tmp / "perm.json").write_text(text)
    result = cli("analyze-svd", "--a", models / "s0", "--b", models / "s1", "--perm", tmp / "perm.json",
                 "--out", tmp / "svd")
    assert "Traceback" not in result.err
    if edit == "shuffle":  # another valid permutation: a result about that permutation
        assert result.code == 0, result.err
    else:
        one_error_line(result)
        assert not (tmp / "svd" / "svd.json").exists()


# ---------------------------------------------------------------------------------------------
# 5. Hostile YAML: size, nesting, alias bombs, self-reference; nothing echoed at length


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text, fragment", [
    (BOMB + "train: {lr: *i}\n", "expands to more than"),
    ("train: {lr: [&x [1, 2, 3], " + ", ".join(["*x"] * 2000) + "]}\n", "train.lr"),  # reaches the type check
    ("train: {lr: &r [*r]}\n", "contains itself"),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
    ("model:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 200)), "nested more than"),
    ("# padding\n" * 200_000, "larger than"),
])
def test_hostile_yaml_configs_fail_fast_with_a_short_line(tmp_path, cli, text, fragment):
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    started = time.perf_counter()
    line = one_error_line(cli("train", "-c", config, "--out", tmp_path / "run"))
    assert fragment in line and len(line) <= 1100, line[:300]
    assert time.perf_counter() - started < 30


def test_hostile_set_values_and_endless_files(tmp_path, cli, synthetic_config):
    deep = "[" * 5000 + "]" * 5000
    for args, fragment in [(["--set", f"train.lr={deep}"], "nested more than"),
                           (["--set", "a" + ".a" * 5000 + "=1"], "levels"),
                           (["--set", "train.lr=" + "{a: " * 3000 + "1" + "}" * 3000], "nested more than"),
                           (["--set", "train.lr=&r [*r]"], "contains itself")]:
        line = one_error_line(cli("train", "-c", synthetic_config, *args, "--out", tmp_path / "run"))
        assert fragment in line and len(line) <= 1100, line[:300]
    assert "larger than" in one_error_line(cli("train", "-c", "/dev/zero", "--out", tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# 6. Processes and directories


def test_force_redoes_a_step_whose_settings_changed(tmp_path, synthetic_config, cli):
    run = tmp_path / "run"
    assert cli("train", "-c", synthetic_config, "--out", run).code == 0
    assert "other settings" in one_error_line(cli("train", "-c", synthetic_config, "--out", run, "--epochs", "2"))
    assert cli("train", "-c", synthetic_config, "--out", run, "--epochs", "2", "--force").code == 0
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert "pass one of them" in one_error_line(cli("train", "-c", synthetic_config, "--out", run, "--force",
                                                    "--resume"))


def test_lmcx_run_force_after_a_changed_train_config(tmp_path, cli):
    out = tmp_path / "out"
    assert cli("run", write_yaml(tmp_path / "a.yaml", TINY_EXPERIMENT), "--out", out).code == 0
    changed = write_yaml(tmp_path / "b.yaml", TINY_EXPERIMENT.replace("epochs: 3", "epochs: 2"))
    assert "--force" in one_error_line(cli("run", changed, "--out", out))
    result = cli("run", changed, "--out", out, "--force")
    assert result.code == 0, result.err
    assert json.loads((out / "train" / "w0.125-s0" / "metrics.json").read_text())["epochs"] == 2


def test_an_experiment_given_with_an_absolute_out_matches_its_finished_steps(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = write_yaml(tmp_path / "exp.yaml", TINY_EXPERIMENT)
    assert cli("run", exp, "--out", "rel").code == 0
    again = cli("run", exp, "--out", tmp_path / "rel")
    assert again.code == 0, again.err
    assert ": done" not in again.err and "interpolate w0.125-s0-s1: skipped" in again.err


def test_an_interrupted_train_resumes_without_resume_and_refuses_other_settings(tmp_path, models, synthetic_config,
                                                                                  cli, monkeypatch):
    run = tmp_path / "run"
    restore = _interrupt_at_second_state(monkeypatch)
    assert cli("train", "-c", synthetic_config, "--out", run).code == 130
    restore()
    line = one_error_line(cli("train", "-c", synthetic_config, "--out", run, "--set", "train.lr=0.001"))
    assert "other settings" in line and "train.lr" in line and "--force" in line
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == 1  # the finished epoch is kept
    result = cli("train", "-c", synthetic_config, "--out", run)
    assert result.code == 0 and "resuming" in result.err and "after epoch 1/3" in result.err
    assert same_weights(run / "model.safetensors", models / "s0" / "model.safetensors")


STOPPED_HOLDER = ("import sys; from lmcx.rundir import claim\n"
                  "with claim(sys.argv[1]) as ok:\n    print('locked', flush=True); sys.stdin.read()\n")


def test_a_lock_held_by_a_stopped_process_is_named_and_given_up_on(tmp_path, cli, monkeypatch):
    out = tmp_path / "out"
    held = out / "train" / "w0.125-s0"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", STOPPED_HOLDER, str(held)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGSTOP)
        monkeypatch.setenv("LMCX_LOCK_TIMEOUT", "1")
        started = time.perf_counter()
        result = cli("run", write_yaml(tmp_path / "exp.yaml", TINY_EXPERIMENT), "--out", out)
        assert time.perf_counter() - started < 120
        assert result.code == 1 and "Traceback" not in result.err
        assert f"waiting for process {holder.pid} (stopped" in result.err
        steps = json.loads((out / "steps.json").read_text())
        reason = steps["train w0.125-s0"]["reason"]
        assert steps["train w0.125-s0"]["status"] == "failed" and "gave up after 1 s" in reason
        assert f"process {holder.pid}" in reason and "LMCX_LOCK_TIMEOUT" in reason
        assert steps["train w0.125-s1"]["status"] == "done"
        monkeypatch.setenv("LMCX_LOCK_TIMEOUT", "soon")
        assert "LMCX_LOCK_TIMEOUT" in one_error_line(cli("run", tmp_path / "exp.yaml", "--out", out))
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()


def test_busy_exits_with_its_own_code_so_that_and_chains_stop(tmp_path, models, synthetic_config):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", STOPPED_HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lmcx = f"{sys.executable} -m lmcx"
        chain = subprocess.run(f"{lmcx} train -c {synthetic_config} --out {run} && "
                               f"{lmcx} evaluate {run} && echo evaluated", shell=True, env=env,
                               capture_output=True, text=True, timeout=300)
        assert chain.returncode == BUSY_EXIT_CODE and "evaluated" not in chain.stdout
        assert "another process is working on it" in chain.stderr and "Traceback" not in chain.stderr
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_is_like_ctrl_c(tmp_path, synthetic_config):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "lmcx", "train", "-c", str(synthetic_config), "--epochs", "200", "--out", str(run)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == TERMINATED_EXIT_CODE, err
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM)" and "Traceback" not in err
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] >= 1  # finished epochs are kept
    assert temp_files(run) == [] and not (run / "metrics.json").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_honour_the_umask_and_leave_no_lock(tmp_path, models, synthetic_config, cli, umask, mode):
    previous = os.umask(umask)
    try:
        assert cli("train", "-c", synthetic_config, "--out", tmp_path / "t").code == 0
        assert cli("match", "--a", models / "s0", "--b", models / "s1", "--out", tmp_path / "m").code == 0
        assert cli(*interpolate_args(models, tmp_path / "i")).code == 0
    finally:
        os.umask(previous)
    for run in ("t", "m", "i"):
        files = [p for p in (tmp_path / run).rglob("*") if p.is_file()]
        assert files and all(p.stat().st_mode & 0o777 == mode for p in files if p.name != ".lock"), run
        assert not (tmp_path / run / ".lock").exists(), run  # a finished step removes its lock file


@pytest.mark.parametrize("where", ["run dir", "dangling run dir", "model file", "lock file", "output folder"])
def test_symlinks_in_place_of_a_run_directory_or_its_files(tmp_path, models, synthetic_config, cli, where):
    run, target = tmp_path / "run", tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("untouched")
    if where == "run dir":
        run.symlink_to(target)
    elif where == "dangling run dir":
        run.symlink_to(tmp_path / "nowhere")
    else:
        run.mkdir()
        name = {"model file": "model.safetensors", "lock file": ".lock", "output folder": "b1"}[where]
        (run / name).symlink_to(target if where == "output folder" else target / "keep.txt")
    args = (["match", "--a", models / "s0", "--b", models / "s1", "--b", models / "s1", "--out", run]
            if where == "output folder" else ["train", "-c", synthetic_config, "--out", run])
    assert "symbolic link" in one_error_line(cli(*args))
    assert (target / "keep.txt").read_text() == "untouched" and sorted(p.name for p in target.iterdir()) == ["keep.txt"]
