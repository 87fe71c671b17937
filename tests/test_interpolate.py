"""Interpolation curves, barriers, norm fixes (BN reset, REPAIR), calibration end to end, CLI errors."""
import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, assert_clean_error
from lmcx.checkpoint import Checkpoint, build_from_checkpoint, load_checkpoint, save_checkpoint
from lmcx.config import DataConfig, InterpolateConfig, ModelConfig, SyntheticConfig, TrainJob, load_config
from lmcx.data import load_dataset
from lmcx.errors import LmcxError
from lmcx.interpolate import (Interpolator, activation_stats, barrier_metrics, evaluate_curves, interpolate_checkpoints,
                              interpolated_model, lambda_grid, lerp_state, load_curves, loss_gaps,
                              norm_fix_inputs, repair_points, reset_bn_stats, resolve_norm_fix)
from lmcx.models import build_model, permutation_spec
from lmcx.permutation import random_permutation, weight_matching
from lmcx.permutation.spec import save_permutation_file
from lmcx.train import evaluate, loss_and_accuracy, predict, train

RESNET_YAML = """
data:
  name: synthetic
  calib_size: 64
  synthetic: {train_size: 512, test_size: 256, num_classes: 10, shape: [3, 16, 16]}
model: {arch: resnet20, width: 1, norm: bn}
train: {optimizer: sgd, lr: 0.1, weight_decay: 0.0005, epochs: 2, batch_size: 32, warmup_epochs: 0}
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Two MLPs on the bundled digits (configs/digits_mlp.yaml, a few epochs) and B's WM permutation."""
    root = tmp_path_factory.mktemp("digits")
    for seed in (0, 1):
        job = load_config(TrainJob, REPO / "configs" / "digits_mlp.yaml",
                          [{"train": {"epochs": 6}, "seed": seed, "device": "cpu"}])
        train(job, root / f"s{seed}")
    a, b = load_checkpoint(root / "s0"), load_checkpoint(root / "s1")
    result = weight_matching(permutation_spec(a.model, a.in_shape, a.num_classes), a.state, b.state, seed=0)
    save_permutation_file(root / "wm.json", result.perm, {"method": "wm"})
    return root / "s0", root / "s1", root / "wm.json"


@pytest.fixture(scope="module")
def resnets(tmp_path_factory):
    """Two BatchNorm ResNet-20 (width 1) trained briefly on small synthetic 3x16x16 images."""
    root = tmp_path_factory.mktemp("resnet")
    (root / "rn.yaml").write_text(RESNET_YAML)
    for seed in (0, 1):
        train(load_config(TrainJob, root / "rn.yaml", [{"seed": seed, "device": "cpu"}]), root / f"s{seed}")
    return root / "s0", root / "s1"


def _models(*paths):
    ckpts = [load_checkpoint(p) for p in paths]
    return ckpts, [build_from_checkpoint(c).eval() for c in ckpts], load_dataset(ckpts[0].data)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_lerp_state_endpoints_exact_integer_buffers_from_a():
    torch.manual_seed(0)
    a = {"w": torch.randn(5, 3), "n": torch.tensor(7)}
    b = {"w": torch.randn(5, 3), "n": torch.tensor(9)}
    assert torch.equal(lerp_state(a, b, 0.0)["w"], a["w"]) and torch.equal(lerp_state(a, b, 1.0)["w"], b["w"])
    mid = lerp_state(a, b, 0.25)
    assert torch.allclose(mid["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert mid["n"].item() == 7 and lerp_state(a, b, 1.0)["n"].item() == 7
    with pytest.raises(LmcxError, match="shape"):
        lerp_state(a, {"w": torch.randn(4, 3), "n": torch.tensor(1)}, 0.5)
    # the curve's in-place interpolation is lerp_state bit for bit
    cfg = ModelConfig(arch="mlp", width=0.125, norm="bn")
    ma, mb = build_model(cfg, (1, 8, 8), 4), build_model(cfg, (1, 8, 8), 4)
    mb.layers[0].norm.num_batches_tracked += 5
    for lam in (0.0, 0.3, 1.0):
        got = Interpolator(ma, mb, [], "none").at(lam).state_dict()
        want = lerp_state(ma.state_dict(), mb.state_dict(), lam)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_barriers_exactly_as_science_md():
    lam = [0.0, 0.25, 0.5, 0.75, 1.0]
    # linear reference: 1 + 2λ -> [1, 1.5, 2, 2.5, 3]; gaps [0, 0.5, 2, -0.5, 0]
    loss = [1.0, 2.0, 4.0, 2.0, 3.0]
    # linear reference: 0.9 - 0.1λ -> [0.9, 0.875, 0.85, 0.825, 0.8]; gaps [0, 0.075, 0.05, 0.225, 0]
    acc = [0.9, 0.8, 0.8, 0.6, 0.8]
    m = barrier_metrics(lam, loss, acc)
    assert m["loss_barrier"] == pytest.approx(2.0) and m["loss_barrier_lambda"] == 0.5
    assert m["accuracy_barrier"] == pytest.approx(0.225) and m["accuracy_barrier_lambda"] == 0.75
    assert m["midpoint_loss"] == 4.0 and m["midpoint_accuracy"] == 0.8
    assert m["midpoint_loss_barrier"] == pytest.approx(2.0) and m["midpoint_accuracy_barrier"] == pytest.approx(0.05)
    assert (m["loss_a"], m["loss_b"], m["accuracy_a"], m["accuracy_b"]) == (1.0, 3.0, 0.9, 0.8)
    np.testing.assert_allclose(loss_gaps(lam, loss), [0, 0.5, 2, -0.5, 0])
    # a convex curve below the chord has zero barrier (the endpoints' gap), never a negative one
    flat = barrier_metrics(lam, [1.0, 0.5, 0.4, 0.5, 1.0], [0.5, 0.9, 0.9, 0.9, 0.5])
    assert flat["loss_barrier"] == 0.0 and flat["accuracy_barrier"] == 0.0
    with pytest.raises(ValueError, match="must contain 0.0"):
        barrier_metrics([0.25, 1.0], [1, 1], [1, 1])


def test_lambda_grid_and_norm_fix_resolution():
    assert lambda_grid(InterpolateConfig(points=25))[12] == 0.5 and len(lambda_grid(InterpolateConfig())) == 25
    assert lambda_grid(InterpolateConfig(points=4)) == [0.0, 1 / 3, 0.5, 2 / 3, 1.0]  # ½ added
    assert lambda_grid(InterpolateConfig(lambdas=[0.7, 0.2, 0.7])) == [0.0, 0.2, 0.5, 0.7, 1.0]
    with pytest.raises(LmcxError, match=r"lambdas: every λ must be in \[0, 1\]"):
        lambda_grid(InterpolateConfig(lambdas=[0.0, 1.2]))
    assert resolve_norm_fix("auto", "bn") == "reset" and resolve_norm_fix("auto", "none") == "none"
    assert resolve_norm_fix("auto", "ln") == "none" and resolve_norm_fix("repair", "none") == "repair"
    with pytest.raises(LmcxError, match="not defined for LayerNorm"):
        resolve_norm_fix("repair", "ln")
    with pytest.raises(LmcxError, match="BatchNorm"):
        resolve_norm_fix("reset", "none")


# ---------------------------------------------------------------------------------------------
# Curves on trained models


def test_endpoints_reproduce_models_exactly(tmp_path, digits):
    a, b, _ = digits
    cfg = InterpolateConfig(points=3, train_eval_size=300)
    barrier = interpolate_checkpoints(a, [b], ["naive"], cfg, tmp_path / "out", device="cpu")
    (_, _), (model_a, model_b), ds = _models(a, b)
    for split in ("test", "train"):
        x, y = ds.split(split)
        own_a = loss_and_accuracy(predict(model_a, ds, x[:300] if split == "train" else x), y[:300] if split == "train" else y)
        own_b = loss_and_accuracy(predict(model_b, ds, x[:300] if split == "train" else x), y[:300] if split == "train" else y)
        raw = barrier["results"]["naive"][split]["raw"]
        assert (raw["loss_a"], raw["accuracy_a"]) == own_a  # bit for bit
        assert (raw["loss_b"], raw["accuracy_b"]) == own_b
    assert barrier["results"]["naive"]["test"]["raw"]["loss_a"] == evaluate(model_a, ds, "test")["loss"]
    assert barrier["norm_fix"] == "none" and barrier["train_eval_size"] == 300


def test_bn_endpoints_with_reset_are_a_with_reset_statistics(tmp_path, resnets):
    a, b = resnets
    cfg = InterpolateConfig(points=3, norm_fix="reset", norm_fix_batches=2, norm_fix_batch_size=128,
                            train_eval_size=64)
    barrier = interpolate_checkpoints(a, [b], ["naive"], cfg, tmp_path / "out", device="cpu")
    assert barrier["norm_fix"] == "reset"
    _, (model_a, model_b), ds = _models(a, b)
    inputs = norm_fix_inputs(ds, 2, 128)
    for model, end in ((model_a, "a"), (model_b, "b")):
        reset_bn_stats(model, inputs)  # the same norm fix, applied to the endpoint itself
        loss, acc = loss_and_accuracy(predict(model, ds, ds.x_test), ds.y_test)
        raw = barrier["results"]["naive"]["test"]["raw"]
        assert (raw[f"loss_{end}"], raw[f"accuracy_{end}"]) == (loss, acc)


def test_self_interpolation_has_zero_barriers(tmp_path, digits):
    a, _, _ = digits
    barrier = interpolate_checkpoints(a, [a], ["self"], InterpolateConfig(points=5, train_eval_size=300),
                                      tmp_path / "out", device="cpu")
    for split in ("test", "train"):
        raw = barrier["results"]["self"][split]["raw"]
        assert abs(raw["loss_barrier"]) < 1e-6 and raw["accuracy_barrier"] == 0.0


def test_one_forward_pass_per_lambda_and_split(digits, monkeypatch):
    import lmcx.interpolate.curves as interp

    calls = []
    real = interp.predict
    monkeypatch.setattr(interp, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, (model_a, model_b), ds = _models(digits[0], digits[1])
    splits = {"test": (ds.x_test, ds.y_test), "train": (ds.x_train[:100], ds.y_train[:100]),
              "calib": (ds.x_calib, ds.y_calib)}
    lambdas = [0.0, 0.5, 1.0]
    curves = evaluate_curves(model_a, {"naive": model_b, "again": model_b}, ds, lambdas, "none", splits)
    # θ(0) = A for every B: evaluated once and shared
    assert len(calls) == len(splits) * (1 + 2 * (len(lambdas) - 1))
    assert curves.logits["naive"]["test"].shape == (3, len(ds.y_test), 10)
    assert torch.equal(curves.logits["naive"]["calib"][0], curves.logits["again"]["calib"][0])


def test_wm_below_naive_and_calibration(tmp_path, digits, cli):
    """Issue 4, acceptance 4 on digits: WM's test loss barrier below naive's; calibrated barrier <= raw."""
    a, b, wm = digits
    out = tmp_path / "curves"
    result = cli("interpolate", "--a", a, "--b", b, "--b", b, "--perm", "none", "--perm", wm,
                 "--label", "naive", "--label", "wm", "--calibrate", "--set", "train_eval_size=500", "--out", out)
    assert result.code == 0, result.err
    assert {p.name for p in out.iterdir()} >= {"barrier.json", "curve.csv", "curve.png", "config.yaml",
                                               "logits.safetensors"}
    barrier = json.loads((out / "barrier.json").read_text())
    res = barrier["results"]
    assert res["wm"]["test"]["raw"]["loss_barrier"] < res["naive"]["test"]["raw"]["loss_barrier"]
    assert res["wm"]["test"]["raw"]["accuracy_barrier"] <= res["naive"]["test"]["raw"]["accuracy_barrier"]
    assert barrier["lambda_convention"].startswith("theta(lambda) = (1 - lambda) * theta_A")
    assert barrier["calibration"]["calibrated"] and barrier["calibration"]["size"] == 200
    assert len(barrier["grid"]) == 25 and barrier["checkpoints"]["b"][1]["permutation"].endswith("wm.json")
    rows = _rows(out / "curve.csv")
    assert set(rows[0]) == {"label", "lambda", "split", "loss", "accuracy", "temperature", "calibrated_loss"}
    grid = barrier["grid"]
    for label in ("naive", "wm"):
        for split in ("test", "train"):
            raw = [float(r["loss"]) for r in rows if r["label"] == label and r["split"] == split]
            cal = [float(r["calibrated_loss"]) for r in rows if r["label"] == label and r["split"] == split]
            # the calibrated barrier is at most the raw one at every λ
            assert np.all(loss_gaps(grid, cal) <= loss_gaps(grid, raw) + 1e-9), (label, split)
            assert res[label][split]["calibrated"]["loss_barrier"] <= res[label][split]["raw"]["loss_barrier"]
        # and calibration never makes the NLL worse where T is fitted
        calib = [r for r in rows if r["label"] == label and r["split"] == "calib"]
        assert len(calib) == 25 and all(float(r["calibrated_loss"]) <= float(r["loss"]) + 1e-6 for r in calib)
    cached = load_curves(out / "logits.safetensors")
    assert cached.labels == ["naive", "wm"] and set(cached.targets) == {"test", "train", "calib"}
    assert cached.logits["wm"]["train"].shape == (25, 500, 10)
    assert "already calibrated" in cli("calibrate", out).err


def test_calibrate_later_matches_calibrate_at_once(tmp_path, digits, cli):
    a, b, _ = digits
    common = ["--a", a, "--b", b, "--points", "5", "--set", "train_eval_size=200"]
    assert cli("interpolate", *common, "--calibrate", "--out", tmp_path / "once").code == 0
    assert cli("interpolate", *common, "--out", tmp_path / "later").code == 0
    uncalibrated = json.loads((tmp_path / "later" / "barrier.json").read_text())
    assert uncalibrated["results"]["naive"]["test"]["calibrated"] is None
    assert "calib" not in load_curves(tmp_path / "later" / "logits.safetensors").targets
    result = cli("calibrate", tmp_path / "later")
    assert result.code == 0, result.err
    once = json.loads((tmp_path / "once" / "barrier.json").read_text())
    later = json.loads((tmp_path / "later" / "barrier.json").read_text())
    assert later["results"]["naive"]["temperatures"] == once["results"]["naive"]["temperatures"]
    assert later["results"]["naive"]["test"] == once["results"]["naive"]["test"]
    # `interpolate --calibrate` on a finished uncalibrated directory calibrates it in place
    assert cli("interpolate", *common, "--out", tmp_path / "third").code == 0
    before = [r for r in _rows(tmp_path / "third" / "curve.csv")]
    assert cli("interpolate", *common, "--calibrate", "--out", tmp_path / "third").code == 0
    after = [r for r in _rows(tmp_path / "third" / "curve.csv") if r["split"] != "calib"]
    assert [(r["loss"], r["accuracy"]) for r in after] == [(r["loss"], r["accuracy"]) for r in before]
    assert json.loads((tmp_path / "third" / "barrier.json").read_text())["calibration"]["calibrated"]
    assert "already complete" in cli("interpolate", *common, "--calibrate", "--out", tmp_path / "third").err
    assert "already complete" in cli("interpolate", *common, "--out", tmp_path / "third").err  # raw is included
    assert_clean_error(cli("interpolate", *common, "--points", "7", "--out", tmp_path / "third"),
                       "other settings", "points")


def test_bn_resnet_reset_and_repair_lower_naive_midpoint_loss(resnets):
    (_, _), (model_a, model_b), ds = _models(*resnets)
    losses = {}
    for fix in ("none", "reset", "repair"):
        model = interpolated_model(model_a, model_b, 0.5, ds, fix, batches=2, batch_size=256)
        assert not model.training and model is not model_a
        losses[fix] = loss_and_accuracy(predict(model, ds, ds.x_test), ds.y_test)[0]
    assert losses["reset"] < losses["none"] and losses["repair"] < losses["none"], losses


def test_repair_matches_interpolated_endpoint_statistics(digits):
    """REPAIR on a norm-free MLP: every hidden unit's mean and std in θ(½) match ½(stat_A + stat_B)."""
    (_, _), (model_a, model_b), ds = _models(digits[0], digits[1])
    inputs = norm_fix_inputs(ds, 10, 500)
    names = [n for n, _ in repair_points(model_a)]
    assert names == ["layers.0.linear", "layers.1.linear", "layers.2.linear"]
    sa, sb = activation_stats(model_a, names, inputs), activation_stats(model_b, names, inputs)
    repaired = interpolated_model(model_a, model_b, 0.5, ds, "repair")
    plain = interpolated_model(model_a, model_b, 0.5, ds, "none")
    got, before = activation_stats(repaired, names, inputs), activation_stats(plain, names, inputs)
    for n in names:
        t_mean, t_std = 0.5 * (sa[n][0] + sb[n][0]), 0.5 * (sa[n][1] + sb[n][1])
        scale = t_std.mean()
        assert (got[n][0] - t_mean).abs().max() < 0.05 * scale
        assert (got[n][1] - t_std).abs().max() < 0.05 * scale
        assert (before[n][1] - t_std).abs().mean() > 5 * (got[n][1] - t_std).abs().mean()  # it did something


def test_repair_is_refused_for_layernorm():
    cfg = ModelConfig(arch="mlp", width=0.125, norm="ln")
    torch.manual_seed(0)
    ds = load_dataset(DataConfig(name="synthetic", calib_size=8,
                                 synthetic=SyntheticConfig(train_size=64, test_size=16, num_classes=4)))
    a, b = build_model(cfg, ds.in_shape, 4), build_model(cfg, ds.in_shape, 4)
    with pytest.raises(LmcxError, match="not defined for LayerNorm"):
        interpolated_model(a, b, 0.5, ds, "repair")
    assert isinstance(interpolated_model(a, b, 0.5, ds, "auto"), nn.Module)  # auto -> none for ln


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2


def _untrained(path, arch="mlp", width=0.25, seed=0):
    data = DataConfig(name="synthetic", calib_size=16,
                      synthetic=SyntheticConfig(train_size=128, test_size=32, num_classes=4, shape=[1, 8, 8]))
    model_cfg = ModelConfig(arch=arch, width=width, norm="none")
    torch.manual_seed(seed)
    model = build_model(model_cfg, (1, 8, 8), 4)
    save_checkpoint(path, Checkpoint(model_cfg, data, (1, 8, 8), 4, model.state_dict()))
    return path


@pytest.fixture
def tiny(tmp_path):
    return _untrained(tmp_path / "a.safetensors"), _untrained(tmp_path / "b.safetensors", seed=1)


def test_library_entry_point_under_run_once(tmp_path, tiny):
    """As `lmcx run` calls it: run_once holds the directory and records the settings; the step keeps them."""
    import yaml

    from lmcx.config import to_dict
    from lmcx.interpolate import OUTPUTS
    from lmcx.rundir import run_once

    a, b = tiny
    cfg = InterpolateConfig(points=3, calibrate=True)
    settings = {"interpolate": to_dict(cfg), "a": str(a), "b": [str(b)], "labels": ["naive"]}
    out = tmp_path / "step"
    step = lambda: interpolate_checkpoints(a, [b], ["naive"], cfg, out, "cpu")  # noqa: E731
    assert run_once(out, settings, OUTPUTS, step, marker="barrier.json") == "done"
    assert yaml.safe_load((out / "config.yaml").read_text()) == settings
    assert json.loads((out / "barrier.json").read_text())["calibration"]["calibrated"]
    assert run_once(out, settings, OUTPUTS, step, marker="barrier.json") == "skipped"


def test_bad_lambda_grid(tmp_path, tiny, cli):
    a, b = tiny
    for value in ("[0,0.5,1.5]", "[-0.1,1]"):
        assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--set", f"lambdas={value}", "--out",
                               tmp_path / "o"), "lambdas", "[0, 1]")
    assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--points", "1", "--out", tmp_path / "o"), "points")
    assert not (tmp_path / "o" / "barrier.json").exists()


def test_permutation_file_that_does_not_fit(tmp_path, tiny, cli):
    a, b = tiny
    wide = ModelConfig(arch="mlp", width=0.5, norm="none")
    wrong = random_permutation(permutation_spec(wide, (1, 8, 8), 4), build_model(wide, (1, 8, 8), 4).state_dict(), 0)
    save_permutation_file(tmp_path / "wrong.json", wrong)
    assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--perm", tmp_path / "wrong.json", "--out",
                           tmp_path / "o"), "wrong.json", "not a permutation of 128 units")
    (tmp_path / "junk.json").write_text("{\"format\": \"something else\"}")
    assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--perm", tmp_path / "junk.json", "--out",
                           tmp_path / "o"), "not an lmcx permutation file")
    assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--b", b, "--perm", tmp_path / "wrong.json",
                           "--out", tmp_path / "o"), "one --perm per --b")
    assert not (tmp_path / "o" / "barrier.json").exists()


def test_models_of_different_architectures_or_widths(tmp_path, tiny, cli):
    a, _ = tiny
    resnet = _untrained(tmp_path / "r.safetensors", arch="resnet20")
    assert_clean_error(cli("interpolate", "--a", a, "--b", resnet, "--out", tmp_path / "o"),
                       "differ in architecture")
    wider = _untrained(tmp_path / "w.safetensors", width=0.5)
    assert_clean_error(cli("interpolate", "--a", a, "--b", wider, "--out", tmp_path / "o"), "differ in width")


def test_unreadable_inputs(tmp_path, tiny, cli):
    a, b = tiny
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_clean_error(cli("interpolate", "--a", a, "--b", tmp_path / "junk.safetensors", "--out", tmp_path / "o"),
                       "not a readable safetensors checkpoint")
    assert_clean_error(cli("interpolate", "--a", tmp_path / "missing", "--b", b, "--out", tmp_path / "o"),
                       "does not exist")
    assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--norm-fix", "reset", "--out", tmp_path / "o"),
                       "norm_fix=reset", "use none")
    assert_clean_error(cli("interpolate", "--a", a, "--b", b, "--norm-fix", "magic", "--out", tmp_path / "o"),
                       "norm_fix")
    assert_clean_error(cli("calibrate", tmp_path), "no barrier.json")
