"""LEWC ([B]) vs LLFC: a constructed pair that satisfies LEWC exactly, copies that satisfy LLFC, every
architecture on CPU, and outputs that name the λ convention and every setting."""
from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch

from conftest import SYNTHETIC_TRAIN, assert_clean_error
from lmcx.analysis.lewc import (LAMBDA_CONVENTION, cosine_similarity, fit_alpha_beta, lewc_coefficients,
                                lewc_prediction, llfc_prediction, reciprocal_orthogonality, relative_error,
                                weak_additivity_error)
from lmcx.analysis.lewc_run import lewc_analysis, lewc_checkpoints
from lmcx.checkpoint import Checkpoint, save_checkpoint
from lmcx.config import DataConfig, LewcConfig, ModelConfig, SyntheticConfig, TrainJob, load_config
from lmcx.data import load_dataset
from lmcx.models import build_model, feature_points

LAMBDAS = [0.25, 0.5, 0.75]


def synthetic_data(shape=(1, 8, 8)) -> DataConfig:
    return DataConfig(name="synthetic", calib_size=32,
                      synthetic=SyntheticConfig(train_size=256, test_size=64, num_classes=4, shape=list(shape)))


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory):
    from lmcx.train import train

    root = tmp_path_factory.mktemp("lewc-pair")
    (root / "train.yaml").write_text(SYNTHETIC_TRAIN)
    runs = []
    for seed in (0, 1):
        train(load_config(TrainJob, root / "train.yaml", [{"seed": seed}]), root / f"s{seed}")
        runs.append(root / f"s{seed}")
    return runs


def disjoint_pair() -> tuple[ModelConfig, torch.nn.Module, torch.nn.Module]:
    """Bias-free MLPs whose hidden units (and input pixels) are disjoint: A lives on units 0..15 and
    pixels 0..31, B on units 16..31 and pixels 32..63. Then W_B z_A = W_A z_B = 0 for every hidden
    layer (reciprocal orthogonality) and their preactivations never overlap (weak additivity), so
    f_ℓ(θ(λ)) = (1 − λ)^ℓ f_ℓ(A) + λ^ℓ f_ℓ(B) exactly."""
    cfg = ModelConfig(arch="mlp", width=32 / 512, norm="none", bias=False)
    gen = torch.Generator().manual_seed(0)

    def make(units: torch.Tensor, pixels: torch.Tensor) -> torch.nn.Module:
        model = build_model(cfg, (1, 8, 8), 4)
        with torch.no_grad():
            for i, layer in enumerate(model.layers):
                cols = pixels if i == 0 else units
                w = torch.zeros_like(layer.linear.weight)
                w[units[:, None], cols] = torch.randn(len(units), len(cols), generator=gen) * math.sqrt(2 / len(cols))
                layer.linear.weight.copy_(w)
            w = torch.zeros_like(model.classifier.weight)
            w[:, units] = torch.randn(4, len(units), generator=gen) / math.sqrt(len(units))
            model.classifier.weight.copy_(w)
        return model

    return cfg, make(torch.arange(0, 16), torch.arange(0, 32)), make(torch.arange(16, 32), torch.arange(32, 64))


def test_constructed_disjoint_pair_satisfies_lewc_exactly():
    cfg, a, b = disjoint_pair()
    ds = load_dataset(synthetic_data())
    layers = lewc_analysis(a, b, ds, ds.x_test, LAMBDAS, feature_points(cfg, (1, 8, 8), 4), norm_fix="none",
                           batch_size=24)
    assert [la["name"] for la in layers] == ["layers.0.relu", "layers.1.relu", "layers.2.relu", "classifier"]
    for layer in layers:
        ell = layer["index"]
        ro = layer["reciprocal_orthogonality"]
        if ell >= 2:
            assert ro["b_on_a"] < 1e-6 and ro["a_on_b"] < 1e-6, layer
        for e in layer["lambdas"]:
            assert e["cos_lewc"] > 0.999, (ell, e)
            assert e["rel_err_lewc"] < 1e-5, (ell, e)
            assert (e["lewc_alpha"], e["lewc_beta"]) == lewc_coefficients(e["lambda"], ell)
            assert e["fit_identifiable"]
            assert e["alpha"] == pytest.approx(e["lewc_alpha"], rel=1e-4, abs=1e-6)
            assert e["beta"] == pytest.approx(e["lewc_beta"], rel=1e-4, abs=1e-6)
            if ell < 4:
                assert e["weak_additivity_error"] < 1e-6
            else:
                assert e["weak_additivity_error"] is None and layer["weak_additivity_note"]
            if ell >= 2 and e["lambda"] != 0.5:
                assert e["rel_err_llfc"] > 0.1  # and LLFC does not describe it


def test_exact_copies_satisfy_llfc_not_lewc(trained_pair):
    from lmcx.checkpoint import build_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(trained_pair[0])
    a = build_from_checkpoint(ckpt)
    b = copy.deepcopy(a)
    ds = load_dataset(ckpt.data)
    layers = lewc_analysis(a, b, ds, ds.x_test[:100], LAMBDAS, feature_points(ckpt.model, ckpt.in_shape, ckpt.num_classes), norm_fix="none",
                           batch_size=64)
    for layer in layers:
        assert layer["reciprocal_orthogonality"]["b_on_a"] == pytest.approx(1.0)
        for e in layer["lambdas"]:
            assert e["rel_err_llfc"] < 1e-5 and e["cos_llfc"] > 0.99999, (layer["name"], e)
            assert not e["fit_identifiable"] and e["alpha"] is None and e["beta"] is None
            assert e["alpha_plus_beta"] == pytest.approx(1.0, abs=1e-5)  # LLFC: (1 − λ) + λ
            if layer["index"] >= 2:
                assert e["rel_err_lewc"] > 0.3  # LEWC shrinks by (1 − λ)^ℓ + λ^ℓ ≤ 0.625


def test_definitions_on_small_tensors():
    torch.manual_seed(0)
    fa, fb = torch.randn(50, 3, 4), torch.randn(50, 3, 4)
    f = 0.7 * fa - 0.2 * fb
    fit = fit_alpha_beta(f, fa, fb)
    assert fit.alpha == pytest.approx(0.7) and fit.beta == pytest.approx(-0.2) and fit.rel_residual < 1e-6
    assert torch.allclose(lewc_prediction(fa, fb, 0.25, 2), 0.5625 * fa + 0.0625 * fb)
    assert torch.allclose(llfc_prediction(fa, fb, 0.25), 0.75 * fa + 0.25 * fb)
    assert relative_error(f, f) == 0 and relative_error(f, 2 * f) == pytest.approx(1.0)
    cos = cosine_similarity(torch.stack([fa[0], torch.zeros(3, 4), fa[1]]), torch.stack([2 * fa[0], torch.zeros(3, 4),
                                                                                         torch.zeros(3, 4)]))
    assert cos.tolist() == pytest.approx([1.0, 1.0, 0.0])  # scale-free; both zero = agree; one zero = 0
    u = torch.tensor([[1.0, -2.0, 0.0, 0.0]])
    assert weak_additivity_error(u, torch.tensor([[0.0, 0.0, 3.0, -1.0]])) == 0  # disjoint supports
    assert weak_additivity_error(u, torch.tensor([[-0.5, 0.0, 0.0, 0.0]])) == pytest.approx(1.0)  # relu(.5)-relu(1)
    lin_a, lin_b = torch.nn.Linear(4, 3, bias=True), torch.nn.Linear(4, 3, bias=True)
    with torch.no_grad():
        lin_a.weight.copy_(torch.eye(3, 4))
        lin_b.weight.copy_(torch.eye(3, 4).roll(1, dims=1))
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert reciprocal_orthogonality(lin_a, lin_b, z) == 0  # W_B z_A = 0, bias ignored


@pytest.mark.parametrize("arch,width", [("mlp", 0.0625), ("vgg11", 0.0625), ("vgg16", 0.0625), ("resnet20", 0.25)])
def test_every_architecture_on_cpu(arch, width, tmp_path):
    cfg = ModelConfig(arch=arch, width=width, norm="bn", bias=arch != "resnet20")
    data = synthetic_data((3, 8, 8))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(cfg, (3, 8, 8), 4)
        paths.append(tmp_path / f"{seed}.safetensors")
        save_checkpoint(paths[-1], Checkpoint(cfg, data, (3, 8, 8), 4, model.state_dict()))
    lcfg = LewcConfig(lambdas=[0.25, 0.75], samples=20, batch_size=16, norm_fix_batches=2, norm_fix_batch_size=64)
    out = lewc_checkpoints(paths[0], paths[1], lcfg, tmp_path / "lewc", device="cpu")
    points = feature_points(cfg, (3, 8, 8), 4)
    assert [la["name"] for la in out["layers"]] == points
    assert out["settings"]["norm_fix"] == "reset" and out["settings"]["norm_fix_requested"] == "auto"
    # BN reset re-standardises θ(λ): the verdict uses the scale-free comparison, and ℓ's meaning is stated
    assert out["settings"]["comparison"] == "scale_free" and "BatchNorm" in out["settings"]["comparison_note"]
    assert all(row["comparison"] == "scale_free" for row in out["summary"])
    if arch == "resnet20":
        assert "each basic block +1" in out["settings"]["layer_index"] and "stem = 1" in out["settings"]["layer_index"]
    for layer in out["layers"]:
        is_block = ".relu2" in layer["name"]
        assert (layer["reciprocal_orthogonality"] is None) == is_block, layer["name"]
        if is_block:
            assert "residual block" in layer["reciprocal_orthogonality_note"]
        for e in layer["lambdas"]:
            assert -1 <= e["cos_lewc"] <= 1 and math.isfinite(e["rel_err_llfc"])
    assert (tmp_path / "lewc" / "lewc_cosine.png").is_file() and (tmp_path / "lewc" / "lewc_coefficients.png").is_file()


def test_lewc_cli_outputs_name_every_setting(trained_pair, cli, tmp_path):
    a, b = trained_pair
    out = tmp_path / "naive"
    r = cli("lewc", "--a", a, "--b", b, "--lambda", "0.25", "--lambda", "0.75", "--samples", "40",
            "--set", "batch_size=16", "--out", out)
    assert r.code == 0, r.err
    data = json.loads((out / "lewc.json").read_text())
    s = data["settings"]
    assert s["lambda_convention"] == LAMBDA_CONVENTION
    assert "lambda = 0 is A" in s["lambda_convention"] and "(1 - lambda) * theta_A" in s["lambda_convention"]
    assert s["lambdas"] == [0.25, 0.75] and s["samples"] == 40 and s["batch_size"] == 16
    assert "first 40" in s["sample_source"] and "test" in s["sample_source"]
    assert s["norm_fix"] == "none" and s["norm_fix_requested"] == "auto"  # norm none: auto -> none
    assert s["permuted"] is False and s["permutation"]["source"] == "none"
    assert "l = 1" in s["layer_index"]
    assert s["comparison"] == "raw" and all(row["comparison"] == "raw" for row in data["summary"])  # no norm
    assert {"lewc_prediction", "llfc_prediction", "cos", "rel_err", "alpha_beta", "reciprocal_orthogonality",
            "weak_additivity_error"} <= set(s["definitions"])
    assert [la["index"] for la in data["layers"]] == [1, 2, 3, 4]
    assert [x["lambda"] for x in data["summary"]] == [0.25, 0.75]
    with open(out / "lewc.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 2 and {"layer", "lambda", "cos_lewc", "cos_llfc", "alpha", "beta"} <= set(rows[0])
    assert "λ=0.25" in r.err

    # with a permutation file: permuted, and recorded as such
    from lmcx.checkpoint import load_checkpoint
    from lmcx.models import permutation_spec
    from lmcx.permutation.spec import save_permutation_file
    from lmcx.permutation.weight_matching import weight_matching

    ca, cb = load_checkpoint(a), load_checkpoint(b)
    save_permutation_file(tmp_path / "perm.json", weight_matching(permutation_spec(cb.model, cb.in_shape, cb.num_classes), ca.state, cb.state).perm)
    r = cli("lewc", "--a", a, "--b", b, "--perm", tmp_path / "perm.json", "--samples", "40", "--norm-fix", "repair",
            "--out", tmp_path / "wm")
    assert r.code == 0, r.err
    wm = json.loads((tmp_path / "wm" / "lewc.json").read_text())
    assert wm["settings"]["permuted"] is True and wm["settings"]["permutation"]["source"] == "file"
    assert wm["settings"]["norm_fix"] == "repair" and wm["settings"]["lambdas"] == [0.25, 0.5, 0.75]
    assert wm["settings"]["comparison"] == "scale_free" and "REPAIR" in wm["settings"]["comparison_note"]

    r = cli("lewc", "--a", a, "--b", b, "--lambda", "0.25", "--lambda", "0.75", "--samples", "40",
            "--set", "batch_size=16", "--out", out)
    assert r.code == 0 and "already complete" in r.err
    assert_clean_error(cli("lewc", "--a", a, "--b", b, "--norm-fix", "reset", "--out", tmp_path / "x"), "reset")
    assert_clean_error(cli("lewc", "--a", a, "--b", b, "--norm-fix", "bogus"), "--norm-fix")
    assert_clean_error(cli("lewc", "--a", a, "--b", b, "--lambda", "2", "--out", tmp_path / "y"), "lambdas")


def test_scale_free_error_fits_the_scale_and_sees_only_the_mixing():
    """min_c ‖f − c p‖ / ‖f‖ from the inner products equals a direct least-squares fit; it is 0 for a
    rescaled exact prediction (where the plain relative error is not), and the same for LEWC and LLFC
    at λ = ½, where the two predictions are parallel."""
    from lmcx.analysis.lewc import gram, scale_free_error_from_gram

    gen = torch.Generator().manual_seed(0)
    f_a, f_b, noise = (torch.randn(30, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    f = 0.3 * (0.9 * f_a + 0.1 * f_b) + 0.05 * noise  # LEWC-like mixing at a smaller scale
    g = gram(f, f_a, f_b)
    pred = 0.9 * f_a + 0.1 * f_b
    c = float((f * pred).sum() / (pred * pred).sum())
    direct = float(torch.linalg.vector_norm(f - c * pred) / torch.linalg.vector_norm(f))
    assert scale_free_error_from_gram(g, 0.9, 0.1) == pytest.approx(direct, rel=1e-10)
    exact = 0.2 * pred
    assert scale_free_error_from_gram(gram(exact, f_a, f_b), 0.9, 0.1) < 1e-7 < relative_error(exact, pred)
    ca, cb = lewc_coefficients(0.5, 3)
    assert scale_free_error_from_gram(g, ca, cb) == pytest.approx(scale_free_error_from_gram(g, 0.5, 0.5), rel=1e-12)
