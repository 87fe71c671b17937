"""Default output directories (lmcx/names.py): short readable names, and a hash that differs whenever a
result-relevant setting differs, so runs with other settings never collide or get refused."""
import re

from conftest import SYNTHETIC_TRAIN, write_yaml
from lmcx.config import InterpolateConfig, TrainJob, to_dict
from lmcx.names import interpolate_dir, joined, run_name, settings_hash, train_dir

HASHED = re.compile(r"^(?P<readable>.+)-[0-9a-f]{6}$")


def test_run_names_and_their_shared_start():
    assert run_name("runs/s0") == "s0"
    assert run_name("runs/s0/model.safetensors") == "s0"
    assert run_name("outputs/match/s0-s1-wm-0a1b2c/permuted.safetensors") == "s0-s1-wm-0a1b2c"
    assert run_name("models/mine.safetensors") == "mine"
    assert joined(["outputs/train/digits-mlp-none-w1-s0-0a1b2c", "outputs/train/digits-mlp-none-w1-s1-0a1b2c"]) \
        == "digits-mlp-none-w1-s0-s1"
    assert joined(["runs/s0", "runs/s1", "runs/s2"]) == "s0-s1-s2"
    assert joined(["runs/a", "runs/a"]) == "a-a"


def test_hash_follows_result_settings_only():
    base = to_dict(TrainJob())
    assert settings_hash(base, base) == settings_hash({}, base)  # built-in defaults leave no trace
    same = {**base, "device": "cpu", "out": "x", "track": "tensorboard", "data": {**base["data"], "root": "/d"}}
    assert settings_hash(same, base) == settings_hash(base, base)
    other = {**base, "train": {**base["train"], "lr": 0.1}}
    assert settings_hash(other, base) != settings_hash(base, base)
    assert len(settings_hash(other, base)) == 6


def test_interpolate_names_tell_labels_and_norm_fix_apart():
    defaults = to_dict(InterpolateConfig())

    def resolved(labels, perms=None, norm_fix="auto"):
        return {"interpolate": {**defaults, "norm_fix": norm_fix}, "a": "runs/s0", "b": ["runs/s1"], "labels": labels,
                **({"perms": perms} if perms else {})}

    # the README's two examples: two curves from permuted checkpoints, then B permuted on the fly with REPAIR
    first = interpolate_dir("runs/s0", "runs/s1", ["naive", "wm"], "auto", resolved(["naive", "wm"]))
    second = interpolate_dir("runs/s0", "runs/s1", ["wm"], "repair",
                             resolved(["wm"], ["runs/wm/permutation.json"], "repair"))
    assert HASHED.match(first.name)["readable"] == "s0-s1-naive-wm"
    assert HASHED.match(second.name)["readable"] == "s0-s1-wm-repair"
    # same label, other permutation file: same readable part, other hash
    third = interpolate_dir("runs/s0", "runs/s1", ["wm"], "repair",
                            resolved(["wm"], ["runs/am/permutation.json"], "repair"))
    assert third != second and HASHED.match(third.name)["readable"] == "s0-s1-wm-repair"
    # calibrating later keeps the directory (it only adds to a finished curve)
    calibrated = resolved(["naive", "wm"])
    calibrated["interpolate"]["calibrate"] = True
    assert interpolate_dir("runs/s0", "runs/s1", ["naive", "wm"], "auto", calibrated,
                           ignore={"interpolate.calibrate"}) == first


def test_train_defaults_never_collide_and_skip_what_is_done(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "synthetic.yaml", SYNTHETIC_TRAIN)
    assert cli("train", "-c", config, "--device", "cpu").code == 0
    assert cli("train", "-c", config, "--device", "cpu", "--set", "train.lr=0.01").code == 0  # not refused
    runs = sorted(p.name for p in (tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 2 and {HASHED.match(r)["readable"] for r in runs} == {"synthetic-mlp-none-w0.25-s0"}
    again = cli("train", "-c", config, "--device", "auto", "--track", "none")  # no result setting changed
    assert again.code == 0 and "already complete" in again.err
    assert len(list((tmp_path / "outputs" / "train").iterdir())) == 2
    job = TrainJob()
    assert train_dir(job).parent.as_posix() == "outputs/train" and train_dir(job).name.startswith("digits-mlp-bn-w1-s0-")


def test_an_input_named_two_ways_is_one_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = {"svd": {}, "a": "runs/s0", "b": "runs/s1"}
    assert settings_hash(given) == settings_hash({**given, "a": "./runs/s0", "b": str(tmp_path / "runs/s1")})
    assert settings_hash(given) != settings_hash({**given, "b": "runs/s2"})
