"""Straight-through estimator on two tiny trained MLPs: a valid permutation, honest bookkeeping of the
midpoint loss, and an improvement over its own starting point (weight matching) that a broken
gradient path could not produce."""
import pytest
import torch
import torch.nn.functional as F

from lmcx.checkpoint import build_from_checkpoint, load_checkpoint
from lmcx.config import DataConfig, ModelConfig, SteConfig, SyntheticConfig, TrainConfig, TrainJob
from lmcx.data import load_dataset
from lmcx.errors import LmcxError
from lmcx.models import build_model, permutation_spec
from lmcx.permutation import apply_permutation, check_permutation, straight_through_estimator, weight_matching
from lmcx.permutation.ste import midpoint_loss
from lmcx.train import train

DATA = DataConfig(name="synthetic", calib_size=64, synthetic=SyntheticConfig(
    train_size=512, test_size=128, num_classes=4, shape=[1, 8, 8]))


def _pair(root, norm):
    for seed in (0, 1):
        train(TrainJob(data=DATA, model=ModelConfig(arch="mlp", width=0.125, norm=norm),
                       train=TrainConfig(optimizer="adam", lr=0.003, weight_decay=0.0, epochs=3, batch_size=64,
                                         warmup_epochs=0), seed=seed, device="cpu"), root / f"s{seed}")
    a, b = load_checkpoint(root / "s0"), load_checkpoint(root / "s1")
    return a, b, load_dataset(a.data), permutation_spec(a.model, a.in_shape, a.num_classes)


@pytest.fixture(scope="module")
def mlps(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("ste"), "none")


CFG = SteConfig(epochs=3, lr=1e-2, batch_size=64, eval_samples=448)


def _midpoint_state(a, b_state):
    return {k: 0.5 * (v + b_state[k]) if v.is_floating_point() else v for k, v in a.state.items()}


def test_ste_valid_permutation_honest_losses_and_improves_on_its_start(mlps):
    a, b, ds, spec = mlps
    r = straight_through_estimator(spec, build_from_checkpoint(a), build_from_checkpoint(b), ds, CFG, seed=0)
    check_permutation(spec, r.perm, b.state)
    # the default cadence checks the candidate at step 0 and after every step; each distinct permutation
    # is scored once, so there are fewer evaluations (history rows) than checks
    assert r.steps == 3 * 7 and r.eval_samples == 448 and r.eval_every == 1
    assert r.checks == r.steps + 1 and len(r.history) == r.evaluations < r.checks
    assert all(h["changed_units"] for h in r.history[1:])  # a row is a permutation not scored before
    assert r.wm_calls == r.steps + 1  # a check reuses the projection the next step needs: no extra matching

    # the reported losses are what an ordinary model with the merged weights gives on the subset
    x, y = ds.x_train[:448], ds.y_train[:448]

    def merged_loss(b_state):
        net = build_model(a.model, a.in_shape, a.num_classes)
        net.load_state_dict(_midpoint_state(a, b_state))
        with torch.no_grad():
            return F.cross_entropy(net(ds.normalize(x)), y).item()

    assert r.best_loss == pytest.approx(merged_loss(apply_permutation(spec, r.perm, b.state)), rel=1e-6)
    assert r.naive_loss == pytest.approx(merged_loss(b.state), rel=1e-6)
    wm = weight_matching(spec, a.state, b.state, seed=0)  # STE's first candidate: the projection of θ_A
    assert r.initial_loss == pytest.approx(merged_loss(apply_permutation(spec, wm.perm, b.state)), rel=1e-6)

    # it learned: STE's own best beats its starting point (WM) and the naive midpoint, and the
    # straight-through training loss fell from the first epoch to the last
    assert r.best_loss < 0.9 * r.initial_loss < 0.9 * r.naive_loss
    assert r.best_step > 0 and r.best_loss == min(h["eval_loss"] for h in r.history)
    assert r.history[-1]["train_loss"] < r.history[1]["train_loss"]
    assert any(h["changed_units"] for h in r.history[1:])


def test_ste_is_seeded(mlps):
    a, b, ds, spec = mlps
    cfg = SteConfig(epochs=1, lr=1e-2, batch_size=64, eval_samples=256, eval_every=4)
    runs = [straight_through_estimator(spec, build_from_checkpoint(a), build_from_checkpoint(b), ds, cfg, seed=3)
            for _ in range(2)]
    assert all(torch.equal(runs[0].perm[p], runs[1].perm[p]) for p in spec.names)
    assert [h["eval_loss"] for h in runs[0].history] == [h["eval_loss"] for h in runs[1].history]
    assert [h["step"] for h in runs[0].history] == [0, 4, 7]  # every 4 steps and at the end of the epoch (448 images, 7 batches)


def test_ste_bn_uses_batch_statistics_and_leaves_models_untouched(tmp_path):
    a, b, ds, spec = _pair(tmp_path, "bn")
    model_a, model_b = build_from_checkpoint(a), build_from_checkpoint(b)
    before = {k: v.clone() for k, v in {**model_a.state_dict(), **{"b." + k: v for k, v in model_b.state_dict().items()}}.items()}
    r = straight_through_estimator(spec, model_a, model_b, ds, SteConfig(epochs=1, lr=1e-2, batch_size=128,
                                                                         eval_samples=256), seed=0)
    check_permutation(spec, r.perm, b.state)
    after = {**model_a.state_dict(), **{"b." + k: v for k, v in model_b.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats and counters unchanged
    # the midpoint is scored in train mode: BN normalises with the batch's own statistics
    net = build_model(a.model, a.in_shape, a.num_classes)
    state = _midpoint_state(a, apply_permutation(spec, r.perm, b.state))
    net.load_state_dict(state)
    net.train()
    with torch.no_grad():
        expected = sum(F.cross_entropy(net(ds.normalize(ds.x_train[i:i + 128])), ds.y_train[i:i + 128], reduction="sum")
                       .item() for i in (0, 128)) / 256
    assert r.best_loss == pytest.approx(expected, rel=1e-6)
    assert midpoint_loss(net, state, ds, ds.x_train[:256], ds.y_train[:256], 128) == pytest.approx(expected, rel=1e-6)


def test_ste_rejects_bad_settings(mlps):
    a, b, ds, spec = mlps
    with pytest.raises(LmcxError, match="ste"):
        straight_through_estimator(spec, build_from_checkpoint(a), build_from_checkpoint(b), ds,
                                   SteConfig(epochs=0), seed=0)
