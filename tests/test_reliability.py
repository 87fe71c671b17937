"""Reliability: faults tried on purpose. docs/RELIABILITY.md lists every fault with the test that checks it.

Interruptions are real SIGKILLs of a real `lmcx` process, delivered at a chosen point by a tiny launcher
(KILLER below) that wraps `os.replace` (the rename every write ends with, io.atomic_path) or a library
function. Re-runs and reference runs are in-process (the `cli` fixture) to keep the suite fast.
"""
from __future__ import annotations

import builtins
import csv
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import REPO, SYNTHETIC_TRAIN, assert_clean_error, write_yaml
from lmcx.checkpoint import load_checkpoint, save_checkpoint
from lmcx.config import InterpolateConfig, MatchConfig, TrainJob, load_config, to_dict
from lmcx.errors import BUSY_EXIT_CODE, RunFailed
from lmcx.interpolate import interpolate_checkpoints
from lmcx.match import match_checkpoints
from lmcx.train import train

# Kill the process at the n-th rename onto a file named TARGET (before or after the rename), or at the
# n-th call of MODULE:FUNCTION; then run `lmcx ARGS...` as usual.
KILLER = r'''
import importlib, os, signal, sys
target, mode, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = [0]
if mode in ("before", "after"):
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        hit = False
        if os.path.basename(str(dst)) == target:
            seen[0] += 1
            hit = seen[0] == nth
        if hit and mode == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, *a, **k)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
else:
    module, name = target.split(":")
    module = importlib.import_module(module)
    real = getattr(module, name)
    def wrapper(*a, **k):
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(module, name, wrapper)
from lmcx.cli import main
sys.argv = ["lmcx"] + sys.argv[4:]
main()
'''


def kill_at(tmp_path, target: str, mode: str, nth: int, *args) -> None:
    """Run `lmcx ARGS` in a new process and SIGKILL it at the chosen point (see KILLER)."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), target, mode, str(nth), *map(str, args)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def assert_error_after_progress(result, *fragments) -> None:
    """Like conftest's assert_clean_error, for a failure after some epochs were logged: the last line is the
    one error line, exit code 2, no traceback."""
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and all(" epoch " in line for line in lines[:-1]), result.err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def temp_files(run_dir):
    return sorted(p.name for p in run_dir.rglob(".*.tmp"))


def assert_whole(run_dir) -> None:
    """Every file a reader would open parses completely; only hidden temporary files may be partial."""
    from PIL import Image

    for f in sorted(run_dir.rglob("*")):
        if f.is_dir() or f.name.startswith("."):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".safetensors":
            load_file(str(f))
        elif f.suffix == ".pt":
            torch.load(f, weights_only=True)
        elif f.suffix == ".yaml":
            yaml.safe_load(f.read_text())
        elif f.suffix == ".csv":
            assert f.read_text().endswith("\n"), f
        elif f.suffix == ".png":
            with Image.open(f) as im:
                im.verify()


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def results(run_dir) -> dict:
    return json.loads((run_dir / "barrier.json").read_text())["results"]


def strict_json(path):
    """json.loads that refuses NaN / Infinity (not JSON): what any other reader would do."""
    def refuse(name):
        raise ValueError(f"{path}: non-JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny synthetic MLPs (conftest's SYNTHETIC_TRAIN, seeds 0 and 1), B weight-matched to A, and
    A-B interpolation (5 points, naive and wm) as references for the interrupted runs."""
    root = tmp_path_factory.mktemp("models")
    config = write_yaml(root / "train.yaml", SYNTHETIC_TRAIN)
    for seed in (0, 1):
        train(load_config(TrainJob, config, [{"seed": seed, "device": "cpu"}]), root / f"s{seed}")
    match_checkpoints(root / "s0", [root / "s1"], MatchConfig(), root / "match", "cpu")
    interpolate_checkpoints(root / "s0", [root / "s1", root / "match" / "permuted.safetensors"], ["naive", "wm"],
                            InterpolateConfig(points=5, train_eval_size=128), root / "curve", "cpu")
    return root


INTERPOLATE = ["--points", "5", "--set", "train_eval_size=128", "--label", "naive", "--label", "wm"]


def interpolate_args(models, out):
    return ["interpolate", "--a", models / "s0", "--b", models / "s1", "--b",
            models / "match" / "permuted.safetensors", *INTERPOLATE, "--out", out]


# ---------------------------------------------------------------------------------------------
# Interruptions

WRITES = re.compile(r"""open\([^)]*["'][wax]b?\+?["']|\.write_text\(|\.write_bytes\(|savefig\(|torch\.save\(|"""
                    r"""save_file\(|np\.save|\.to_csv\(|json\.dump\(|yaml\.(safe_)?dump\([^)]*,|shutil\.copy""")


def test_every_output_is_written_through_atomic_path():
    """Audit of the source: every call that writes a file sits in an `io.atomic_path` block (temporary file,
    fsync, rename), so no output can be seen half-written."""
    found = 0
    for path in sorted((REPO / "lmcx").rglob("*.py")):
        if path.name == "io.py":  # atomic_path itself and the helpers built on it
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if WRITES.search(line) and not line.lstrip().startswith(("#", '"', "'")):
                found += 1
                block = "\n".join(lines[max(0, i - 3): i + 1])
                assert "atomic_path(" in block, f"{path.relative_to(REPO)}:{i + 1} writes directly: {line.strip()}"
    assert found >= 5  # the audit sees the writers (checkpoints, training state, logits, figures, dataset cache)


def test_kill_while_renaming_train_state_keeps_previous_state_and_resume_is_identical(tmp_path, models,
                                                                                        synthetic_config, cli):
    run = tmp_path / "run"
    # SIGKILL with epoch 3's training state fully written to its temporary file, not yet renamed
    kill_at(tmp_path, "train_state.pt", "before", 3, "train", "-c", synthetic_config, "--out", run)
    assert temp_files(run) and temp_files(run)[0].startswith(".train_state.pt.")
    assert not (run / "metrics.json").exists() and not (run / "model.safetensors").exists()
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == 2  # the previous good state
    assert_whole(run)
    assert (run / ".lock").exists()  # the dead process's lock file is left behind ...
    result = cli("train", "-c", synthetic_config, "--out", run, "--resume")
    assert result.code == 0 and "resuming" in result.err and "another process" not in result.err  # ... and ignored
    assert same_weights(run / "model.safetensors", models / "s0" / "model.safetensors")
    assert temp_files(run) == []  # the dead writer's temporary file is cleared when the step restarts
    assert not (run / "train_state.pt").exists()


def test_kill_while_writing_final_model_then_rerun_without_resume_is_identical(tmp_path, models, synthetic_config,
                                                                                cli):
    run = tmp_path / "run"
    kill_at(tmp_path, "lmcx.checkpoint:save_file", "call", 1, "train", "-c", synthetic_config, "--out", run)
    assert temp_files(run)  # model.safetensors was being written to a temporary file
    assert not (run / "model.safetensors").exists() and not (run / "metrics.json").exists()
    assert_whole(run)
    assert_clean_error(cli("evaluate", run), "without model.safetensors")
    result = cli("train", "-c", synthetic_config, "--out", run)  # no --resume: resumes all the same
    assert result.code == 0 and "resuming" in result.err and "after epoch 3/3" in result.err
    assert same_weights(run / "model.safetensors", models / "s0" / "model.safetensors")
    assert temp_files(run) == []
    result = cli("train", "-c", synthetic_config, "--out", run, "--force")  # starts over: the same weights
    assert result.code == 0 and "resuming" not in result.err
    assert same_weights(run / "model.safetensors", models / "s0" / "model.safetensors")


def test_ctrl_c_during_a_checkpoint_write_leaves_no_partial_file(tmp_path, models, synthetic_config, cli,
                                                                 monkeypatch):
    import lmcx.checkpoint as checkpoint

    run, calls = tmp_path / "run", []
    real_save = checkpoint.torch.save

    def interrupted(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # Ctrl-C half-way through writing epoch 2's state
            open(f, "wb").write(b"partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    result = cli("train", "-c", synthetic_config, "--out", run)
    assert result.code == 130 and "interrupted" in result.err and "Traceback" not in result.err
    assert temp_files(run) == [] and not (run / "metrics.json").exists()
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert cli("train", "-c", synthetic_config, "--out", run, "--resume").code == 0
    assert same_weights(run / "model.safetensors", models / "s0" / "model.safetensors")


@pytest.mark.parametrize("target, mode", [
    ("lmcx.permutation:weight_matching", "call"),  # during the search
    ("permutation.json", "after"),  # after the first output, before permuted.safetensors and metrics.json
])
def test_kill_during_match_then_rerun_is_identical(tmp_path, models, cli, target, mode):
    out = tmp_path / "m"
    args = ["match", "--a", models / "s0", "--b", models / "s1", "--out", out]
    kill_at(tmp_path, target, mode, 1, *args)
    assert not (out / "metrics.json").exists() and not (out / "permuted.safetensors").exists()
    assert_whole(out)
    assert cli(*args).code == 0
    assert (out / "permutation.json").read_text() == (models / "match" / "permutation.json").read_text()
    assert same_weights(out / "permuted.safetensors", models / "match" / "permuted.safetensors")
    assert temp_files(out) == []


@pytest.mark.parametrize("target, mode, nth", [
    ("lmcx.interpolate.curves:predict", "call", 4),  # mid-curve
    ("logits.safetensors", "after", 1),  # logits cached, before curve.csv, curve.png and barrier.json
    ("barrier.json", "before", 1),  # the marker written to its temporary file, not yet renamed
])
def test_kill_during_interpolate_then_rerun_is_identical(tmp_path, models, cli, target, mode, nth):
    out = tmp_path / "i"
    kill_at(tmp_path, target, mode, nth, *interpolate_args(models, out))
    assert not (out / "barrier.json").exists()
    assert_whole(out)
    again = cli(*interpolate_args(models, out))
    assert again.code == 0 and "already complete" not in again.err
    assert results(out) == results(models / "curve")
    assert (out / "curve.csv").read_text() == (models / "curve" / "curve.csv").read_text()
    assert temp_files(out) == []


def test_kill_during_calibrate_keeps_the_uncalibrated_results_and_rerun_is_identical(tmp_path, models, cli):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(models / "curve", ref)
    shutil.copytree(models / "curve", killed)
    assert cli("calibrate", ref).code == 0
    kill_at(tmp_path, "barrier.json", "before", 1, "calibrate", killed)
    assert_whole(killed)
    assert results(killed) == results(models / "curve")  # still the complete uncalibrated barrier.json
    assert cli("calibrate", killed).code == 0
    assert results(killed) == results(ref)
    assert (killed / "curve.csv").read_text() == (ref / "curve.csv").read_text()


EXPERIMENT = """
name: tiny
data:
  name: synthetic
  calib_size: 64
  synthetic: {train_size: 384, test_size: 128, num_classes: 4, shape: [1, 8, 8]}
model: {arch: mlp, width: 0.125, norm: none}
train: {optimizer: adam, lr: 0.003, weight_decay: 0.0, epochs: 2, batch_size: 64, warmup_epochs: 0}
widths: [0.125]
seeds: [0, 1]
methods: [wm]
interpolate: {points: 3, calibrate: false, train_eval_size: 128}
analyses: []
"""


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_kill_lmcx_run_during_a_match_step_then_rerun_gives_the_same_report(tmp_path, cli):
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT)
    assert cli("run", exp, "--out", tmp_path / "full").code == 0
    killed = tmp_path / "killed"
    kill_at(tmp_path, "permuted.safetensors", "after", 1, "run", exp, "--out", killed)
    assert not (killed / "match" / "w0.125-s0-s1-wm" / "metrics.json").exists()
    assert not (killed / "report.md").exists()
    assert_whole(killed)
    again = cli("run", exp, "--out", killed)
    assert again.code == 0
    assert again.err.count(": skipped") == 2 and again.err.count(": done") == 2  # train x2 kept; match, curve
    assert _csv(killed / "summary.csv") == _csv(tmp_path / "full" / "summary.csv")


# ---------------------------------------------------------------------------------------------
# Bad configs (one clear line naming the key, exit code 2, nothing trained)


@pytest.mark.parametrize("args, fragments", [
    (["--width", "-1"], ["model.width", "> 0"]),
    (["--set", "train.lr=-0.1"], ["train.lr", "> 0"]),
    (["--set", "train.lr=.inf"], ["train.lr", "finite"]),
    (["--set", "train.lr=.nan"], ["train.lr", "finite"]),
    (["--set", "model.width=.inf"], ["model.width", "finite"]),
    (["--set", "model.width=1e400"], ["model.width", "finite"]),
    (["--epochs", "0"], ["train.epochs", "> 0"]),
    (["--set", "train.momentum=1.5"], ["train.momentum", "[0, 1)"]),
    (["--set", "train.optimizer=sgd", "--set", "train.nesterov=true", "--set", "train.momentum=0"],
     ["train.nesterov", "momentum > 0"]),
    (["--seed", "-1"], ["seed", "[0, 2**32)"]),
    (["--seed", str(2 ** 70)], ["seed", "[0, 2**32)"]),
    (["--set", "data.synthetic.seed=-3"], ["data.synthetic.seed", "[0, 2**32)"]),
    (["--set", "data.synthetic.shape=[1, 8]"], ["data.synthetic.shape"]),
    (["--set", "data.calib_size=100000"], ["calib_size", "leaves no training images"]),
    (["--set", "model.norm=bn", "--set", "data.train_size=129", "--set", "train.batch_size=64"],
     ["batch_size=64", "one image", "BatchNorm"]),
    (["--set", "data=5"], ["data", "mapping"]),
    (["--set", "train.schedule=exponential"], ["train.schedule", "'cosine'"]),
    (["--set", "train.grad_clip=0"], ["train.grad_clip"]),
])
def test_bad_train_settings(tmp_path, synthetic_config, cli, args, fragments):
    result = cli("train", "-c", synthetic_config, "--out", tmp_path / "run", *args)
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_batchnorm_conv_net_may_train_on_a_last_batch_of_one(tmp_path, synthetic_config, cli):
    """The check behind the BatchNorm refusal above is exact: a conv net normalises over the image's pixels,
    so one image is enough and the run is not refused."""
    result = cli("train", "-c", synthetic_config, "--out", tmp_path / "run", "--arch", "resnet20", "--epochs", "1",
                 "--set", "model.norm=bn", "--set", "data.train_size=65", "--set", "train.batch_size=64")
    assert result.code == 0, result.err


def _python_tag(tmp_path):
    marker = tmp_path / "MARKER"
    return (f"train: !!python/object/apply:builtins.exec [\"open('{marker}', 'w').write('ran')\"]\n"), marker


@pytest.mark.parametrize("make, fragments", [
    (lambda p: (p.mkdir(), p)[1], ["is a directory"]),
    (lambda p: (p.write_bytes(b"\xff\xfe\x00binary\x80"), p)[1], ["cannot read config"]),
    (lambda p: write_yaml(p, "model: {width: 1}\n\tbad indent: [\n"), ["not valid YAML"]),
    (lambda p: write_yaml(p, "just a string\n"), ["must be a mapping"]),
    (lambda p: write_yaml(p, "train: {lr: 1e-3, epochs: '3'}\n"), ["train.epochs", "integer"]),
    (lambda p: write_yaml(p, "model: {arch: mlp, width: [1]}\n"), ["model.width", "number"]),
    (lambda p: write_yaml(p, '"bad\\nkey": 1\n'), ["'bad\\nkey'", "unknown setting"]),  # printed on one line
])
def test_bad_config_files(tmp_path, cli, make, fragments):
    path = make(tmp_path / "c.yaml")
    assert_clean_error(cli("train", "-c", path, "--out", tmp_path / "run"), str(path), *fragments)
    assert not (tmp_path / "run").exists()


def test_yaml_python_tag_never_runs(tmp_path, cli):
    text, marker = _python_tag(tmp_path)
    path = write_yaml(tmp_path / "evil.yaml", text)
    assert_clean_error(cli("train", "-c", path, "--out", tmp_path / "run"), "not valid YAML")
    exp = write_yaml(tmp_path / "evil_exp.yaml", text.replace("train:", "name:"))
    assert_clean_error(cli("run", exp, "--dry-run"), "not valid YAML")
    assert not marker.exists()


def test_bad_interpolate_and_match_settings(tmp_path, models, cli):
    a, b = models / "s0", models / "s1"
    assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--set", "lambdas=[0, 2]", "--out", tmp_path / "o"),
                       "lambdas", "[0, 1]")
    assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--set", "lambdas=[0, .nan, 1]", "--out",
                           tmp_path / "o"), "lambdas", "nan")
    assert_clean_error(cli("match", "--a", a, "--b", b, "--seed", "-2", "--out", tmp_path / "o"), "seed")
    assert_clean_error(cli("analyze-svd", "--a", a, "--b", b, "--set", "wm_seed=99999999999999999999", "--out",
                           tmp_path / "o"), "wm_seed")
    assert not (tmp_path / "o" / "barrier.json").exists() and not (tmp_path / "o" / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------
# Bad files


@pytest.mark.parametrize("cut", [0, 7, 100, "header", "half", -1])
def test_truncated_checkpoint(tmp_path, models, cli, cut):
    data = (models / "s1" / "model.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    n = {"header": 8 + header // 2, "half": len(data) // 2}.get(cut, cut)
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(data[:n])
    fragment = "not a readable safetensors checkpoint"
    assert_clean_error(cli("evaluate", bad), fragment)
    assert_clean_error(cli("match", "--a", models / "s0", "--b", bad, "--out", tmp_path / "m"), fragment)
    assert_clean_error(cli("interpolate", "--a", bad, "--b", models / "s0", "--out", tmp_path / "i"), fragment)
    assert not (tmp_path / "m" / "metrics.json").exists() and not (tmp_path / "i" / "barrier.json").exists()


def test_corrupted_checkpoint_header_and_metadata(tmp_path, models, cli):
    data = (models / "s0" / "model.safetensors").read_bytes()
    (tmp_path / "flipped.safetensors").write_bytes(data[:8] + b"X" + data[9:])  # the header's JSON broken
    assert_clean_error(cli("evaluate", tmp_path / "flipped.safetensors"), "not a readable safetensors checkpoint")
    renamed = data.replace(b"classifier.bias", b"classifiXr.bias", 1)  # still valid JSON: a tensor renamed
    assert renamed != data
    (tmp_path / "renamed.safetensors").write_bytes(renamed)
    assert_clean_error(cli("evaluate", tmp_path / "renamed.safetensors"), "metadata and tensors disagree")
    state = load_file(str(models / "s0" / "model.safetensors"))
    save_file(state, str(tmp_path / "meta.safetensors"), metadata={"lmcx": json.dumps(
        {"model": {"arch": "__import__('os').system('true')"}, "data": {}, "in_shape": [1, 8, 8], "num_classes": 4})})
    assert_clean_error(cli("evaluate", tmp_path / "meta.safetensors"), "unreadable lmcx metadata")
    save_file(state, str(tmp_path / "notjson.safetensors"), metadata={"lmcx": "{not json"})
    assert_clean_error(cli("evaluate", tmp_path / "notjson.safetensors"), "unreadable lmcx metadata")


def test_checkpoint_whose_tensors_do_not_fit_its_metadata(tmp_path, models, cli):
    ckpt = load_checkpoint(models / "s0")
    ckpt.state = {k: v[..., :3] if v.ndim else v for k, v in ckpt.state.items()}
    save_checkpoint(tmp_path / "cut.safetensors", ckpt)
    assert_clean_error(cli("evaluate", tmp_path / "cut.safetensors"), "metadata and tensors disagree")
    assert_clean_error(cli("interpolate", "--a", models / "s0", "--b", tmp_path / "cut.safetensors", "--out",
                           tmp_path / "i"), "cut.safetensors")


def _perm(models):
    return json.loads((models / "match" / "permutation.json").read_text())


def _edit_perm(edit):
    def make(models, path):
        data = _perm(models)
        edit(data)
        path.write_text(json.dumps(data))
        return path
    return make


def _renamed(data):
    data["permutations"]["layers.9"] = data["permutations"].pop("layers.0")


def _duplicate(data):
    data["permutations"]["layers.0"][1] = data["permutations"]["layers.0"][0]


@pytest.mark.parametrize("make, fragments", [
    (_edit_perm(_renamed), ["permutation names do not fit", "layers.9"]),
    (_edit_perm(lambda d: d["permutations"]["layers.1"].pop()), ["'layers.1'", "not a permutation of 128"]),
    (_edit_perm(_duplicate), ["'layers.0'", "not a permutation of 128"]),
    (_edit_perm(lambda d: d["permutations"].__setitem__("layers.0", [i + 0.25 for i in range(128)])),
     ["'layers.0'", "list of integers"]),
    (_edit_perm(lambda d: d["permutations"].__setitem__("layers.0", [True] * 128)), ["list of integers"]),
    (_edit_perm(lambda d: d["permutations"]["layers.0"].__setitem__(0, 10 ** 30)), ["integers"]),
    (_edit_perm(lambda d: d["permutations"].__setitem__("layers.0", "0 1 2")), ["list of integers"]),
    (_edit_perm(lambda d: d.__setitem__("permutations", [list(range(128))])), ["not an lmcx permutation file"]),
    (lambda m, p: (p.write_text("[1, 2, 3]"), p)[1], ["not an lmcx permutation file"]),
    (lambda m, p: (p.write_text('{"format": "lmcx-permutation", "permutations": {'), p)[1], ["not valid JSON"]),
    (lambda m, p: (p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00"), p)[1], ["not valid JSON"]),
    (lambda m, p: (p.mkdir(), p)[1], ["is a directory"]),
    (lambda m, p: p, ["does not exist"]),
])
def test_bad_permutation_file(tmp_path, models, cli, make, fragments):
    perm = make(models, tmp_path / "perm.json")
    out = tmp_path / "i"
    result = cli("interpolate", "--a", models / "s0", "--b", models / "s1", "--perm", perm, "--out", out)
    assert_clean_error(result, *fragments)
    assert not (out / "barrier.json").exists()
    assert_clean_error(cli("lewc", "--a", models / "s0", "--b", models / "s1", "--perm", perm, "--out",
                           tmp_path / "l"), *fragments)


@pytest.mark.parametrize("command", ["train", "match", "interpolate"])
def test_unwritable_output_directory(tmp_path, models, synthetic_config, cli, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "sub"  # tests run as root, where chmod does not stop writes; a path under a file does
    args = {"train": ["train", "-c", synthetic_config],
            "match": ["match", "--a", models / "s0", "--b", models / "s1"],
            "interpolate": ["interpolate", "--a", models / "s0", "--b", models / "s1"]}[command]
    assert_clean_error(cli(*args, "--out", out), str(out), "--out")
    assert blocker.read_text() == "not a directory"


def _fsync_full(monkeypatch):
    import lmcx.io

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(lmcx.io.os, "fsync", full)


def _safetensors_full(monkeypatch):
    # what safetensors raises on a full disk (seen on a 64 KiB tmpfs): its own type, not OSError
    from safetensors import SafetensorError

    import lmcx.checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(lmcx.checkpoint, "save_file", full)


def _torch_save_full(monkeypatch):
    # what torch.save raises on a full disk (seen on a 64 KiB tmpfs): a RuntimeError from its zip writer
    import lmcx.checkpoint

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(lmcx.checkpoint.torch, "save", full)


@pytest.mark.parametrize("fill, fragments", [
    (_fsync_full, ["No space left on device", "free disk space"]),
    (_safetensors_full, ["model.safetensors", "No space left on device"]),
    (_torch_save_full, ["train_state.pt", "torch.save failed"]),
])
def test_full_disk_during_training(tmp_path, synthetic_config, cli, monkeypatch, fill, fragments):
    run = tmp_path / "run"
    fill(monkeypatch)
    assert_error_after_progress(cli("train", "-c", synthetic_config, "--out", run), *fragments)
    assert not (run / "metrics.json").exists() and temp_files(run) == []
    assert_whole(run)


def test_full_disk_while_caching_logits(tmp_path, models, cli, monkeypatch):
    from safetensors import SafetensorError

    import lmcx.checkpoint  # every safetensors file (checkpoints, logits caches) is written through it

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(lmcx.checkpoint, "save_file", full)
    out = tmp_path / "i"
    assert_clean_error(cli(*interpolate_args(models, out)), "logits.safetensors", "No space left on device")
    assert not (out / "barrier.json").exists() and temp_files(out) == []


def test_failed_rename_keeps_the_previous_file(tmp_path, models, cli, monkeypatch):
    """`lmcx calibrate` rewrites barrier.json in place: a rename that fails (EIO) leaves the old one whole."""
    import lmcx.io

    out = tmp_path / "i"
    shutil.copytree(models / "curve", out)
    before = (out / "barrier.json").read_text()
    real_replace = lmcx.io.os.replace

    def failing(src, dst):
        if os.path.basename(dst) == "barrier.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)
    monkeypatch.setattr(lmcx.io.os, "replace", failing)
    assert_clean_error(cli("calibrate", out), "barrier.json", "Input/output error")
    assert (out / "barrier.json").read_text() == before and temp_files(out) == []
    assert_whole(out)


def interrupted_run(run, synthetic_config):
    """A run directory as an interrupted `lmcx train -c synthetic_config` leaves it: its settings recorded."""
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(TrainJob, synthetic_config))))
    return run


def test_corrupt_or_foreign_training_state_on_resume(tmp_path, synthetic_config, cli):
    run = interrupted_run(tmp_path / "run", synthetic_config)
    (run / "train_state.pt").write_bytes(b"PK\x03\x04 truncated zip")
    assert_clean_error(cli("train", "-c", synthetic_config, "--out", run, "--resume"), "cannot resume",
                       "--force")
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [{}]},
               run / "train_state.pt")
    assert_clean_error(cli("train", "-c", synthetic_config, "--out", run, "--resume"), "does not fit this run")
    torch.save([1, 2, 3], run / "train_state.pt")
    assert_clean_error(cli("train", "-c", synthetic_config, "--out", run, "--resume"), "does not fit this run")
    assert not (run / "metrics.json").exists()


def test_resume_with_other_settings_is_refused(tmp_path, synthetic_config, cli):
    run = tmp_path / "run"
    diverge = ["--set", "train.lr=1e30", "--set", "train.optimizer=sgd"]
    assert cli("train", "-c", synthetic_config, "--out", run, *diverge).code == 1  # leaves a partial run
    assert_clean_error(cli("train", "-c", synthetic_config, "--out", run, "--resume"), "other settings", "train.lr")


def test_damaged_interpolation_and_experiment_folders(tmp_path, models, cli):
    out = tmp_path / "i"
    shutil.copytree(models / "curve", out)
    (out / "logits.safetensors").write_bytes(b"\x00" * 16)
    assert_clean_error(cli("calibrate", out), "not a readable logits cache")
    (out / "barrier.json").write_text("[1, 2]")
    assert_clean_error(cli("calibrate", out), "not a barrier file")
    (out / "barrier.json").write_text('{"calibration": ')
    assert_clean_error(cli("calibrate", out), "not valid JSON")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "experiment.yaml").write_text("")
    assert_clean_error(cli("report", tmp_path / "exp"), "experiment.yaml", "unreadable")
    assert_clean_error(cli("report", tmp_path / "nothing"), "no experiment.yaml")
    assert_clean_error(cli("calibrate", models / "s0" / "metrics.json"), "no barrier.json")


# ---------------------------------------------------------------------------------------------
# Untrusted files: loading never runs code


class Payload:
    """Unpickling this object runs `open(marker, 'w')` (through builtins.exec)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _malicious_files(tmp_path):
    marker = tmp_path / "MARKER"
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"model": Payload(marker)}))
    zipped = tmp_path / "zipped.pt"
    torch.save({"model": Payload(marker), "epoch": 1}, zipped)
    return marker, [raw, zipped]


def test_the_payload_is_real(tmp_path):
    """Control: plain pickle does run the payload, so the refusals below are meaningful."""
    marker, (raw, _) = _malicious_files(tmp_path)
    pickle.loads(raw.read_bytes())
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("kind", ["raw", "torch-zip"])
def test_malicious_pickle_as_training_state_is_refused(tmp_path, synthetic_config, cli, kind):
    marker, files = _malicious_files(tmp_path)
    run = interrupted_run(tmp_path / "run", synthetic_config)
    shutil.copy(files[kind == "torch-zip"], run / "train_state.pt")
    result = cli("train", "-c", synthetic_config, "--out", run, "--resume")
    assert_clean_error(result, "cannot resume", "refused")
    assert not marker.exists()
    assert not (run / "metrics.json").exists()


def test_malicious_pickle_as_a_model_or_permutation_is_refused(tmp_path, models, cli):
    marker, files = _malicious_files(tmp_path)
    for i, source in enumerate(files):
        evil = tmp_path / f"evil{i}.safetensors"
        shutil.copy(source, evil)
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        shutil.copy(source, run_dir / "model.safetensors")  # a run directory holding a pickle
        fragment = "not a readable safetensors checkpoint"
        assert_clean_error(cli("evaluate", evil), fragment)
        assert_clean_error(cli("evaluate", run_dir), fragment)
        assert_clean_error(cli("match", "--a", models / "s0", "--b", evil, "--out", tmp_path / "m"), fragment)
        assert_clean_error(cli("match", "--a", run_dir, "--b", models / "s1", "--out", tmp_path / "m"), fragment)
        assert_clean_error(cli("interpolate", "--a", models / "s0", "--b", evil, "--out", tmp_path / "i"), fragment)
        assert_clean_error(cli("analyze-svd", "--a", models / "s0", "--b", models / "s1", "--b-permuted", evil,
                               "--out", tmp_path / "s"), fragment)
        assert_clean_error(cli("interpolate", "--a", models / "s0", "--b", models / "s1", "--perm", source,
                               "--out", tmp_path / "i"), "not valid JSON")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Numerics


def _gradient_spike(monkeypatch):
    """Scale the loss of one training step by 1e20: an exploding gradient."""
    import lmcx.train as train_module

    real = train_module.F
    steps = []

    class Spiking:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def cross_entropy(*args, **kwargs):
            steps.append(1)
            loss = real.cross_entropy(*args, **kwargs)
            return loss * 1e20 if len(steps) == 3 else loss

    monkeypatch.setattr(train_module, "F", Spiking())


def test_exploding_gradient_is_contained_by_grad_clip(tmp_path, synthetic_config, monkeypatch):
    sgd = [{"train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}, "device": "cpu"}]
    _gradient_spike(monkeypatch)
    with pytest.raises(RunFailed, match="diverged in epoch 1"):
        train(load_config(TrainJob, synthetic_config, sgd), tmp_path / "unclipped")
    _gradient_spike(monkeypatch)
    metrics = train(load_config(TrainJob, synthetic_config, sgd + [{"train": {"grad_clip": 1.0}}]),
                    tmp_path / "clipped")
    assert metrics["test_accuracy"] > 0.5
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "clipped" / "model.safetensors")).values())


def test_curve_whose_loss_overflows(tmp_path, models, cli):
    """B's logits overflow (classifier scaled by 1e38): losses are inf/nan along the curve. barrier.json stays
    strict JSON with null for the non-finite barriers, calibration runs, re-runs and the report read it."""
    ckpt = load_checkpoint(models / "s1")
    ckpt.state["classifier.weight"] = ckpt.state["classifier.weight"] * 1e38
    save_checkpoint(tmp_path / "huge.safetensors", ckpt)
    out = tmp_path / "i"
    args = ["interpolate", "--a", models / "s0", "--b", tmp_path / "huge.safetensors", "--b", models / "s1",
            "--label", "huge", "--label", "naive", "--points", "5", "--set", "train_eval_size=128", "--calibrate",
            "--out", out]
    result = cli(*args)
    assert result.code == 0, result.err
    barrier = strict_json(out / "barrier.json")
    raw = barrier["results"]["huge"]["test"]["raw"]
    assert raw["loss_b"] is None and raw["loss_barrier"] is None and raw["loss_a"] > 0
    assert 0 <= raw["accuracy_barrier"] <= 1  # accuracy stays meaningful
    assert barrier["results"]["huge"]["temperatures"][-1] == 1.0  # non-finite logits: nothing to calibrate
    assert isinstance(barrier["results"]["naive"]["test"]["raw"]["loss_barrier"], float)  # the other curve is fine
    again = cli(*args)  # the skipped run prints the barriers it reads back (null -> nan)
    assert again.code == 0 and "already complete" in again.err and "huge: test loss barrier nan" in again.err
    evaluated = cli("evaluate", tmp_path / "huge.safetensors")
    assert evaluated.code == 0 and strict_json_text(evaluated.out)["loss"] is None


def strict_json_text(text):
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_failed_step_in_lmcx_run_is_recorded_and_the_rest_finishes(tmp_path, cli):
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.replace("seeds: [0, 1]", "seeds: [0, 1, 2]")
                     .replace("methods: [wm]", "methods: []"))
    out = tmp_path / "out"
    broken = out / "train" / "w0.125-s1"
    broken.mkdir(parents=True)
    (broken / "train_state.pt").write_bytes(b"not a training state")  # a state without its settings: refused
    result = cli("run", exp, "--out", out)
    assert result.code == 1 and "1 step(s) failed" in result.err and "Traceback" not in result.err
    steps = json.loads((out / "steps.json").read_text())
    assert steps["train w0.125-s1"]["status"] == "failed"
    assert "holds no usable record of its settings" in steps["train w0.125-s1"]["reason"]  # state, no config.yaml
    assert steps["interpolate w0.125-s0-s1"]["status"] == "blocked"
    assert steps["interpolate w0.125-s1-s2"]["status"] == "blocked"
    assert steps["interpolate w0.125-s0-s2"]["status"] == "done"
    assert (out / "interpolate" / "w0.125-s0-s2" / "barrier.json").is_file()
    report = (out / "report.md").read_text()
    assert "| train w0.125-s1 | failed |" in report and "holds no usable record" in report
    assert "3 of 6 steps finished" in report


# ---------------------------------------------------------------------------------------------
# Concurrency

HOLDER = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); "
          "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(300)")


@pytest.mark.parametrize("command", ["train", "match", "interpolate", "calibrate"])
def test_a_directory_locked_by_another_process_is_left_alone(tmp_path, models, synthetic_config, cli, command):
    out = tmp_path / "out"
    if command == "calibrate":
        shutil.copytree(models / "curve", out)
    out.mkdir(exist_ok=True)
    before = sorted(p.name for p in out.iterdir())
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = {"train": ["train", "-c", synthetic_config, "--out", out],
                "match": ["match", "--a", models / "s0", "--b", models / "s1", "--out", out],
                "interpolate": interpolate_args(models, out), "calibrate": ["calibrate", out]}[command]
        result = cli(*args)
        assert result.code == BUSY_EXIT_CODE and "another process is" in result.err
        assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [n for n in before if n != ".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_two_concurrent_interpolations_into_one_directory(tmp_path, models):
    out = tmp_path / "i"
    args = [sys.executable, "-m", "lmcx", *map(str, interpolate_args(models, out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert sorted(p.returncode for p in procs) in ([0, 0], [0, BUSY_EXIT_CODE]), logs
    skipped = [log for log in logs if "another process is working on it" in log or "already complete" in log]
    assert len(skipped) == 1, logs  # exactly one of the two computed the curve
    assert results(out) == results(models / "curve")
    assert temp_files(out) == []
    assert_whole(out)
