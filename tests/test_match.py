"""`lmcx match` and `match_checkpoints`: outputs, function preserved, reproducibility, self-matching,
several B's (anchor, MergeMany), and bad input as one clear line with exit code 2."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO, assert_clean_error
from lmcx.checkpoint import Checkpoint, build_from_checkpoint, load_checkpoint, save_checkpoint
from lmcx.config import DataConfig, MatchConfig, ModelConfig, SteConfig, SyntheticConfig, TrainJob, load_config
from lmcx.data import load_dataset
from lmcx.errors import LmcxError
from lmcx.match import match_checkpoints
from lmcx.models import build_model, permutation_spec
from lmcx.permutation import apply_permutation, load_permutation_file, random_permutation
from lmcx.train import predict, train


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Three small MLPs (width 0.25) trained a few epochs on the bundled digits with seeds 0, 1, 2."""
    root = tmp_path_factory.mktemp("digits")
    for seed in (0, 1, 2):
        job = load_config(TrainJob, REPO / "configs" / "digits_mlp.yaml",
                          [{"train": {"epochs": 4}, "model": {"width": 0.25}, "seed": seed, "device": "cpu"}])
        train(job, root / f"s{seed}")
    return root


def _evaluate(cli, path):
    result = cli("evaluate", path)
    assert result.code == 0, result.err
    return json.loads(result.out)


def _perms(path):
    return json.loads(path.read_text())["permutations"]


def test_wm_cli_keeps_test_accuracy_and_is_reproducible(tmp_path, digits, cli):
    a, b = digits / "s0", digits / "s1"
    result = cli("match", "--method", "wm", "--a", a, "--b", b, "--seed", "3", "--out", tmp_path / "m1")
    assert result.code == 0, result.err
    summary = [line for line in result.err.splitlines() if line.strip()]
    assert len(summary) == 1 and "L2 to A" in summary[0] and "→" in summary[0] and "sweeps" in summary[0]
    out = tmp_path / "m1"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "config.yaml", "metrics.json", "permutation.json", "permuted.safetensors"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "wm" and m["seed"] == 3 and m["iterations"] == len(m["objective"]) - 1 >= 2
    assert m["l2_after"]["total"] < m["l2_before"]["total"]
    assert set(m["l2_after"]["per_param"]) == set(load_checkpoint(b).state)  # an MLP without norm: all are parameters
    assert m["wm_objective"] == m["settings"]["wm_objective"] == "params" and "trainable" in m["l2_definition"]
    assert m["lap_seconds"] <= m["match_seconds"] <= m["seconds"]
    assert m["outputs"] == [{"source": str(b / "model.safetensors"), "permutation": "permutation.json",
                             "permuted": "permuted.safetensors"}]

    # the permuted model is the same function: same test accuracy to the last digit
    before, after = _evaluate(cli, b), _evaluate(cli, out / "permuted.safetensors")
    assert after["accuracy"] == before["accuracy"]
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)
    ckpt = load_checkpoint(out / "permuted.safetensors")
    assert ckpt.info["method"] == "wm" and ckpt.info["permuted_from"] == str(b / "model.safetensors")
    assert ckpt.info["seed"] == 1  # B's own provenance is kept
    info = json.loads((out / "permutation.json").read_text())["info"]
    assert info["method"] == "wm" and info["seed"] == 3 and info["b"] == str(b / "model.safetensors")

    # same seed, new directory: the same permutation and objective
    assert cli("match", "--method", "wm", "--a", a, "--b", b, "--seed", "3", "--out", tmp_path / "m2").code == 0
    assert _perms(tmp_path / "m2" / "permutation.json") == _perms(out / "permutation.json")
    assert json.loads((tmp_path / "m2" / "metrics.json").read_text())["objective"] == m["objective"]

    # complete: skipped; other settings in the same directory: refused
    again = cli("match", "--method", "wm", "--a", a, "--b", b, "--seed", "3", "--out", out)
    assert again.code == 0 and "already complete" in again.err
    assert_clean_error(cli("match", "--method", "wm", "--a", a, "--b", b, "--seed", "4", "--out", out),
                       "other settings", "seed")


@pytest.mark.parametrize("method", ["am", "ste"])
def test_am_and_ste_cli_keep_accuracy(tmp_path, digits, cli, method):
    b = digits / "s1"
    result = cli("match", "--method", method, "--a", digits / "s0", "--b", b, "--set", "ste.epochs=1",
                 "--set", "ste.batch_size=128", "--out", tmp_path / method)
    assert result.code == 0, result.err
    m = json.loads((tmp_path / method / "metrics.json").read_text())
    assert m["method"] == method and m["l2_after"]["total"] < m["l2_before"]["total"]
    if method == "am":
        assert m["am"]["samples"] == len(load_dataset(load_checkpoint(b).data).y_train)
        for stats in m["am"]["permutations"].values():
            assert stats["mean_corr_after"] > stats["mean_corr_before"]
    else:
        s = m["ste"]
        assert s["best_midpoint_train_loss"] <= s["initial_midpoint_train_loss"] < s["naive_midpoint_train_loss"]
        assert s["eval_every"] == 1 and s["checks"] == s["steps"] + 1 and m["iterations"] == s["steps"] > 0
        assert len(s["history"]) == s["evaluations"] <= s["checks"] and 0 <= s["best_step"] <= s["steps"]
    assert _evaluate(cli, tmp_path / method / "permuted.safetensors")["accuracy"] == _evaluate(cli, b)["accuracy"]


def _permuted_copy(src, dst, seed=7):
    """A checkpoint of the same function as `src` with randomly permuted hidden units."""
    ckpt = load_checkpoint(src)
    spec = permutation_spec(ckpt.model, ckpt.in_shape, ckpt.num_classes)
    state = apply_permutation(spec, random_permutation(spec, ckpt.state, seed), ckpt.state)
    save_checkpoint(dst, Checkpoint(ckpt.model, ckpt.data, ckpt.in_shape, ckpt.num_classes, state, {"seed": 99}))
    return dst


@pytest.mark.parametrize("method", ["wm", "am"])
def test_library_self_match_is_exact_and_writes_no_config(tmp_path, digits, method):
    a = digits / "s0" / "model.safetensors"
    b = _permuted_copy(a, tmp_path / "b.safetensors")
    out = tmp_path / "out"
    m = match_checkpoints(a, [b], MatchConfig(method=method), out, device="cpu")
    assert m["l2_before"]["total"] > 1 and m["l2_after"]["total"] == 0.0
    assert not (out / "config.yaml").exists() and (out / "metrics.json").is_file()
    pa, pb = load_checkpoint(a), load_checkpoint(out / "permuted.safetensors")
    assert all(torch.equal(pa.state[k], pb.state[k]) for k in pa.state)
    perm = load_permutation_file(out / "permutation.json", permutation_spec(pa.model, pa.in_shape, pa.num_classes), pa.state)
    assert set(perm) == set(permutation_spec(pa.model, pa.in_shape, pa.num_classes).names)


def test_permuted_checkpoint_computes_the_same_logits(tmp_path, digits):
    a, b = digits / "s0", digits / "s1"
    match_checkpoints(a, [b], MatchConfig(), tmp_path / "o", device="cpu")
    ckb, ckp = load_checkpoint(b), load_checkpoint(tmp_path / "o" / "permuted.safetensors")
    ds = load_dataset(ckb.data)
    x = ds.x_test
    assert torch.allclose(predict(build_from_checkpoint(ckb), ds, x), predict(build_from_checkpoint(ckp), ds, x),
                          atol=1e-5, rtol=1e-5)


def test_default_output_directory(tmp_path, digits, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("match", "--a", digits / "s0", "--b", digits / "s1" / "model.safetensors").code == 0
    [run] = (tmp_path / "outputs" / "match").iterdir()  # <A-B>-<method>-<hash of the settings> (lmcx/names.py)
    assert re.fullmatch(r"s0-s1-wm-[0-9a-f]{6}", run.name) and (run / "metrics.json").is_file()


@pytest.mark.parametrize("many", ["anchor", "merge-many"])
def test_several_b(tmp_path, digits, cli, many):
    a, bs = digits / "s0", [digits / "s1", digits / "s2", _permuted_copy(digits / "s0", tmp_path / "a_perm.safetensors")]
    out = tmp_path / many
    args = [x for b in bs for x in ("--b", b)]
    result = cli("match", "--a", a, *args, "--many", many, "--out", out)
    assert result.code == 0, result.err
    m = json.loads((out / "metrics.json").read_text())
    assert m["many"] == many and m["method"] == "wm" and len(m["outputs"]) == 3
    for i, (b, o) in enumerate(zip(bs, m["outputs"]), 1):
        assert o["permutation"] == f"b{i}/permutation.json" and o["permuted"] == f"b{i}/permuted.safetensors"
        assert o["source"] == str(b / "model.safetensors" if b.is_dir() else b)
        assert (out / o["permutation"]).is_file() and (out / o["permuted"]).is_file()
        assert o["l2_after"]["total"] < o["l2_before"]["total"]
        ckpt = load_checkpoint(out / o["permuted"])
        assert ckpt.info["method"] == "wm" and ckpt.info["many"] == many
    assert o["l2_after"]["total"] < 1e-6  # the permuted copy of A lands exactly on A
    assert [p["pair"] for p in m["l2_between_b"]] == [["b1", "b2"], ["b1", "b3"], ["b2", "b3"]]
    if many == "merge-many":  # MergeMany aligns the B's with each other too, not only with A
        assert m["l2_between_b"][0]["l2_after"] < m["l2_between_b"][0]["l2_before"]
    assert len([line for line in result.err.splitlines() if line.strip()]) == 4


def _untrained(path, arch="mlp", width=0.25, norm="none", data=None, shape=(1, 8, 8), classes=4):
    data = data or DataConfig(name="synthetic", calib_size=16, synthetic=SyntheticConfig(
        train_size=128, test_size=32, num_classes=classes, shape=list(shape)))
    model_cfg = ModelConfig(arch=arch, width=width, norm=norm)
    torch.manual_seed(0)
    model = build_model(model_cfg, shape, classes)
    save_checkpoint(path, Checkpoint(model_cfg, data, shape, classes, model.state_dict()))
    return path


@pytest.mark.parametrize("make_b, fragments", [
    (lambda p: _untrained(p, arch="resnet20"), ["differ in architecture"]),
    (lambda p: _untrained(p, width=0.5), ["differ in width"]),
    (lambda p: _untrained(p, norm="bn"), ["differ in norm"]),
    (lambda p: _untrained(p, data=DataConfig(name="digits"), classes=10), ["differ in dataset"]),
    (lambda p: (p.write_bytes(b"\x00not a model" * 8), p)[1], ["not a readable safetensors checkpoint"]),
    (lambda p: (save_file({"w": torch.zeros(2)}, str(p)), p)[1], ["no lmcx metadata"]),
    (lambda p: p.parent / "missing.safetensors", ["does not exist"]),
])
def test_mismatched_or_unreadable_inputs(tmp_path, cli, make_b, fragments):
    a = _untrained(tmp_path / "a.safetensors")
    b = make_b(tmp_path / "b.safetensors")
    assert_clean_error(cli("match", "--a", a, "--b", b, "--out", tmp_path / "o"), *fragments)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_metadata_that_does_not_fit_the_tensors(tmp_path, cli):
    a = _untrained(tmp_path / "a.safetensors")
    wide = load_checkpoint(_untrained(tmp_path / "w.safetensors", width=0.5))
    save_checkpoint(tmp_path / "b.safetensors", Checkpoint(load_checkpoint(a).model, wide.data, wide.in_shape,
                                                           wide.num_classes, wide.state))
    assert_clean_error(cli("match", "--a", a, "--b", tmp_path / "b.safetensors", "--out", tmp_path / "o"),
                       "metadata and tensors disagree")


@pytest.mark.parametrize("args, fragments", [
    (["--method", "xx"], ["method", "'xx'"]),
    (["--many", "all"], ["many"]),
    (["--set", "ste.epochs=0"], ["ste.epochs", "> 0"]),
    (["--max-iter", "0"], ["max_iter"]),
])
def test_bad_settings(tmp_path, cli, args, fragments):
    a = _untrained(tmp_path / "a.safetensors")
    assert_clean_error(cli("match", "--a", a, "--b", a, "--out", tmp_path / "o", *args), *fragments)


def test_merge_many_is_wm_only(tmp_path, cli):
    a = _untrained(tmp_path / "a.safetensors")
    assert_clean_error(cli("match", "--a", a, "--b", a, "--b", a, "--many", "merge-many", "--method", "am",
                           "--out", tmp_path / "o"), "merge-many", "weight matching")


@pytest.mark.parametrize("method", ["am", "ste"])
def test_am_ste_need_the_dataset_wm_does_not(tmp_path, cli, method):
    mnist = DataConfig(name="mnist", calib_size=100)
    a = _untrained(tmp_path / "a.safetensors", data=mnist, shape=(1, 28, 28), classes=10)
    b = _untrained(tmp_path / "b.safetensors", data=mnist, shape=(1, 28, 28), classes=10)
    assert_clean_error(cli("match", "--method", method, "--a", a, "--b", b, "--out", tmp_path / "o"),
                       "mnist not found", "--data-root")
    assert cli("match", "--method", "wm", "--a", a, "--b", b, "--out", tmp_path / "wm").code == 0


def test_library_refuses_am_for_merge_many_and_empty_b(tmp_path):
    with pytest.raises(LmcxError, match="at least one model B"):
        match_checkpoints("a", [], MatchConfig(), tmp_path)
    with pytest.raises(LmcxError, match="merge-many"):
        match_checkpoints("a", ["b", "c"], MatchConfig(method="ste", many="merge-many"), tmp_path)
    with pytest.raises(LmcxError, match="ste.lr"):
        match_checkpoints("a", ["b"], MatchConfig(ste=SteConfig(lr=0)), tmp_path)


def test_bn_match_objective_and_l2_over_parameters(tmp_path, cli):
    """BN models: L2 to A in metrics.json is over the trainable parameters (as in svd.json), whichever
    objective weight matching used; `wm_objective: all` is recorded and lets the running statistics count."""
    from lmcx.match import parameter_names

    runs = []
    for seed in (0, 1):
        job = load_config(TrainJob, REPO / "configs" / "digits_mlp.yaml",
                          [{"train": {"epochs": 2}, "model": {"width": 0.125, "norm": "bn"}, "seed": seed,
                            "device": "cpu"}])
        train(job, tmp_path / f"s{seed}")
        runs.append(tmp_path / f"s{seed}")
    names = parameter_names(load_checkpoint(runs[0]))
    assert not any("running" in n for n in names)
    metrics = {}
    for objective in ("params", "all"):
        out = tmp_path / objective
        assert cli("match", "--a", runs[0], "--b", runs[1], "--set", f"wm_objective={objective}", "--out", out).code == 0
        metrics[objective] = m = json.loads((out / "metrics.json").read_text())
        assert m["wm_objective"] == objective and set(m["l2_before"]["per_param"]) == set(names)
        assert json.loads((out / "permutation.json").read_text())["info"]["wm_objective"] == objective
        assert load_checkpoint(out / "permuted.safetensors").info["wm_objective"] == objective
    assert metrics["params"]["l2_before"] == metrics["all"]["l2_before"]
    # minimising over the parameters alone reaches at least as small a parameter distance
    assert metrics["params"]["l2_after"]["total"] <= metrics["all"]["l2_after"]["total"] + 1e-9
