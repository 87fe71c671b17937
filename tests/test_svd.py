"""SVD analysis ([A]): permutation-invariant spectra, alignment R(γ), WM raising R, outputs."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import SYNTHETIC_TRAIN, assert_clean_error
from lmcx.analysis.svd import (Factors, alignment_R, alignment_from_factors, max_relative_sv_difference, num_top,
                               singular_values, svd_analysis, svd_factors, weight_layers)
from lmcx.config import ModelConfig, SvdConfig, TrainJob, load_config
from lmcx.models import build_model, permutation_spec
from lmcx.permutation.spec import apply_permutation, random_permutation, save_permutation_file

ARCHS = [("mlp", 0.0625), ("vgg11", 0.0625), ("vgg16", 0.0625), ("resnet20", 0.25)]


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    """Two tiny MLPs trained on synthetic blobs with different seeds."""
    from lmcx.train import train

    root = tmp_path_factory.mktemp("svd-pair")
    (root / "train.yaml").write_text(SYNTHETIC_TRAIN)
    runs = []
    for seed in (0, 1):
        job = load_config(TrainJob, root / "train.yaml", [{"seed": seed}])
        train(job, root / f"s{seed}")
        runs.append(root / f"s{seed}")
    return runs


@pytest.mark.parametrize("arch,width", ARCHS)
def test_singular_values_survive_a_random_permutation(arch, width):
    cfg = ModelConfig(arch=arch, width=width, norm="bn", bias=True)
    torch.manual_seed(0)
    params = build_model(cfg, (3, 8, 8), 5).state_dict()
    spec = permutation_spec(cfg, (3, 8, 8), 5)
    permuted = apply_permutation(spec, random_permutation(spec, params, seed=1), params)
    layers = weight_layers(params)
    assert layers and all(params[k].ndim >= 2 for k in layers)
    changed = 0
    for k in layers:
        s, t = singular_values(params[k]), singular_values(permuted[k])
        assert max_relative_sv_difference(s, t) < 1e-5, k
        assert torch.allclose(s, t, rtol=1e-5, atol=0), k
        changed += not torch.equal(params[k], permuted[k])
    assert changed >= len(layers) - 1  # the permutation really moved the weights (classifier rows stay)
    result = svd_analysis(params, params, permuted, [0.0, 0.3])
    assert result["totals"]["max_rel_sv_diff"] < 1e-5
    assert all(r["max_rel_sv_diff"] < 1e-5 for r in result["layers"])


def test_alignment_is_one_for_identical_layers():
    torch.manual_seed(0)
    for w in (torch.randn(40, 24), torch.randn(8, 4, 3, 3)):
        for gamma in (0.0, 0.3, 0.9):
            assert alignment_R(w, w.clone(), gamma) == pytest.approx(1.0, abs=1e-9)
            assert alignment_R(w, w.clone(), gamma, weighted=True) == pytest.approx(1.0, abs=1e-9)


def test_alignment_near_zero_for_independent_gaussian_layers():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    fa, fb = svd_factors(a), svd_factors(b)
    for gamma in (0.0, 0.3):
        for weighted in (False, True):
            r, ka, kb = alignment_from_factors(fa, fb, gamma, weighted)
            assert abs(r) < 0.1, (gamma, weighted, r)
    assert num_top(fa.s, 0.0) == 512 and 0 < num_top(fa.s, 0.3) < 512


def test_alignment_ignores_the_sign_of_singular_pairs_and_k():
    torch.manual_seed(0)
    a, b = torch.randn(30, 20), torch.randn(30, 20)
    fa, fb = svd_factors(a), svd_factors(a + 0.3 * b)
    signs = torch.where(torch.rand(20) < 0.5, -1.0, 1.0).double()
    flipped = Factors(fb.u * signs, fb.s, fb.v * signs)  # (u_i, v_i) -> (-u_i, -v_i): the same matrix
    for gamma in (0.0, 0.3):
        assert alignment_from_factors(fa, flipped, gamma)[0] == pytest.approx(alignment_from_factors(fa, fb, gamma)[0])
    s = torch.tensor([4.0, 2.0, 1.2, 1.0, 0.1])
    assert [num_top(s, g) for g in (0.0, 0.3, 0.5, 1.0)] == [5, 3, 2, 1]


def test_k_rule_min_keeps_one_k_own_divides_by_the_geometric_mean():
    """A = diag(3, 2, 1) keeps k_A = 3 singular vectors at γ = 0.3, B = diag(3, 0.5, 0.1) keeps k_B = 1;
    both share their top singular pair. `min`: k = 1 for both, R = 1. `own`: ⟨U_Aᵀ U_B, V_Aᵀ V_B⟩ = 1 over
    the 3 × 1 block, divided by √3."""
    fa, fb = svd_factors(torch.diag(torch.tensor([3.0, 2.0, 1.0]))), svd_factors(torch.diag(torch.tensor([3.0, 0.5, 0.1])))
    assert alignment_from_factors(fa, fb, 0.3, k_rule="min") == (pytest.approx(1.0), 3, 1)
    assert alignment_from_factors(fa, fb, 0.3, k_rule="own")[0] == pytest.approx(3 ** -0.5)
    for rule in ("min", "own"):  # the rules agree when k_A = k_B
        assert alignment_from_factors(fa, fa, 0.3, k_rule=rule)[0] == pytest.approx(1.0)
        assert alignment_from_factors(fb, fb, 0.0, k_rule=rule)[0] == pytest.approx(1.0)


def test_wm_raises_alignment_of_trained_mlps(trained_pair, cli, tmp_path):
    a, b = trained_pair
    out = tmp_path / "svd"
    r = cli("analyze-svd", "--a", a, "--b", b, "--weighted", "--out", out)
    assert r.code == 0, r.err
    data = json.loads((out / "svd.json").read_text())
    perm = data["settings"]["permutation"]
    assert perm["source"] == "weight_matching" and perm["seed"] == 0 and "computed here" in perm["note"]
    mean = {e["gamma"]: e for e in data["totals"]["mean_alignment"]}
    assert set(mean) == {0.0, 0.3}
    assert mean[0.3]["permuted"] > mean[0.3]["naive"] + 0.1, mean
    assert mean[0.3]["permuted_weighted"] > mean[0.3]["naive_weighted"]
    l2 = data["totals"]["l2"]
    assert l2["layers"]["a_permuted_b"] <= l2["layers"]["a_b"] and 0 <= l2["parameters"]["relative_reduction"] < 1
    assert data["totals"]["max_rel_sv_diff"] < 1e-5
    assert "mean R(γ=0.3)" in r.err
    # every setting and definition is named
    s = data["settings"]
    assert s["gammas"] == [0.0, 0.3] and s["weighted"] is True and s["wm_max_iter"] == 100
    assert s["k_rule"] == "min" and "min(k_A, k_B)" in s["definitions"]["k"] and perm["wm_objective"] == "params"
    assert all(e["k_kept"] == [min(e["k_a"], e["k_b"])] * 2 for la in data["layers"] for e in la["alignment"])
    assert {"R", "R_weighted", "k", "layer_matrix", "l2"} <= set(s["definitions"])
    layer = data["layers"][0]
    assert layer["name"] == "layers.0.linear.weight" and layer["matrix_shape"] == [128, 64]
    assert len(layer["singular_values"]["a"]) == 64 and layer["alignment"][1]["k_a"] <= 64
    with open(out / "svd.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["layer"] for row in rows] == [la["name"] for la in data["layers"]]
    assert {"R_naive_g0.3", "R_permuted_g0.3", "Rw_permuted_g0", "l2_relative_reduction", "k_kept_a_g0.3"} <= set(rows[0])
    assert (out / "svd_spectra.png").stat().st_size > 0 and (out / "svd_alignment.png").stat().st_size > 0

    # the same permutation from a file, and as a permuted checkpoint, gives the same numbers
    from lmcx.analysis.svd import analyze_svd_checkpoints
    from lmcx.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from lmcx.permutation.weight_matching import weight_matching

    ca, cb = load_checkpoint(a), load_checkpoint(b)
    spec = permutation_spec(cb.model, cb.in_shape, cb.num_classes)
    wm = weight_matching(spec, ca.state, cb.state, seed=0)
    save_permutation_file(tmp_path / "perm.json", wm.perm)
    save_checkpoint(tmp_path / "pb.safetensors", Checkpoint(cb.model, cb.data, cb.in_shape, cb.num_classes,
                                                            apply_permutation(spec, wm.perm, cb.state)))
    r = cli("analyze-svd", "--a", a, "--b", b, "--perm", tmp_path / "perm.json", "--gamma", "0.3",
            "--out", tmp_path / "svd-file")
    assert r.code == 0, r.err
    from_file = json.loads((tmp_path / "svd-file" / "svd.json").read_text())
    assert from_file["settings"]["permutation"]["source"] == "file" and from_file["settings"]["gammas"] == [0.3]
    assert from_file["totals"]["mean_alignment"][0]["permuted"] == pytest.approx(mean[0.3]["permuted"], abs=1e-12)
    from_ckpt = analyze_svd_checkpoints(a, b, SvdConfig(gammas=[0.3]), tmp_path / "svd-ckpt",
                                        b_permuted_path=tmp_path / "pb.safetensors", device="cpu")
    assert from_ckpt["settings"]["permutation"]["source"] == "checkpoint"
    assert from_ckpt["totals"]["mean_alignment"][0]["permuted"] == pytest.approx(mean[0.3]["permuted"], abs=1e-12)

    # complete: skipped on a re-run; changed settings refused without --force
    r = cli("analyze-svd", "--a", a, "--b", b, "--weighted", "--out", out)
    assert r.code == 0 and "already complete" in r.err
    assert_clean_error(cli("analyze-svd", "--a", a, "--b", b, "--out", out), "other settings", "weighted")


def test_analyze_svd_clean_errors(trained_pair, cli, tmp_path):
    a, b = trained_pair
    assert_clean_error(cli("analyze-svd", "--a", a, "--b", b, "--perm", tmp_path / "p.json", "--b-permuted", b),
                       "either --perm or --b-permuted")
    assert_clean_error(cli("analyze-svd", "--a", a, "--b", tmp_path / "nope", "--out", tmp_path / "o"),
                       "does not exist")
    assert_clean_error(cli("analyze-svd", "--a", a, "--b", b, "--gamma", "1.5", "--out", tmp_path / "o"), "gammas")
    assert_clean_error(cli("analyze-svd", "--b", b), "--a")
