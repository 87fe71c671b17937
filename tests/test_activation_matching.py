"""Activation matching: exact recovery of a permuted copy (MLP, VGG-11, ResNet-20 streams), the one-pass
float64 correlations against a direct computation, and degenerate (dead) units."""
import numpy as np
import pytest
import torch

from lmcx.config import DataConfig, ModelConfig, SyntheticConfig
from lmcx.data import load_dataset
from lmcx.errors import LmcxError
from lmcx.models import build_model, permutation_spec
from lmcx.permutation import (activation_correlations, activation_matching, apply_permutation, check_permutation,
                              invert_permutation, l2_distance, permutation_spec_from_axes, random_permutation)


def _data(shape, n=256):
    return load_dataset(DataConfig(name="synthetic", calib_size=16, synthetic=SyntheticConfig(
        train_size=n, test_size=16, num_classes=4, shape=list(shape))))


def _model(arch, width, norm, shape, seed=0):
    cfg = ModelConfig(arch=arch, width=width, norm=norm)
    torch.manual_seed(seed)
    model = build_model(cfg, tuple(shape), 4)
    with torch.no_grad():  # non-trivial BN parameters and running statistics, so permuting them matters
        for name, t in model.state_dict().items():
            if ".norm" in name and t.is_floating_point():
                t.copy_(t + 0.3 * torch.rand_like(t) if "var" in name or name.endswith("weight")
                        else 0.2 * torch.randn_like(t))
    return cfg, model.eval()


def _permuted_copy(cfg, model, seed=1):
    spec = permutation_spec(cfg, tuple(model_in_shape[cfg.arch]), 4)
    state = model.state_dict()
    pi = random_permutation(spec, state, seed)
    other = build_model(cfg, tuple(model_in_shape[cfg.arch]), 4)
    other.load_state_dict(apply_permutation(spec, pi, state))
    return spec, pi, other.eval()


model_in_shape = {"mlp": (1, 8, 8), "vgg11": (3, 8, 8), "resnet20": (3, 8, 8)}


@pytest.mark.parametrize("arch, width, norm", [("mlp", 0.125, "none"), ("mlp", 0.125, "bn"),
                                               ("resnet20", 0.5, "bn"), ("vgg11", 0.0625, "ln")])
def test_recovers_random_permutation_of_itself(arch, width, norm):
    shape = model_in_shape[arch]
    cfg, a = _model(arch, width, norm, shape)
    spec, pi, b = _permuted_copy(cfg, a)
    ds = _data(shape)
    before = l2_distance(a.state_dict(), b.state_dict())[0]
    perm = activation_matching(spec, a, b, ds, samples=200, batch_size=64)
    check_permutation(spec, perm, b.state_dict())
    inv = invert_permutation(pi)
    assert all(torch.equal(perm[p], inv[p]) for p in spec.names)
    after = l2_distance(a.state_dict(), apply_permutation(spec, perm, b.state_dict()))[0]
    assert before > 1.0 and after == 0.0
    if (arch, norm) == ("mlp", "none"):  # this case has dead ReLUs: only the pre-activation tie-break finds them
        dead = (activation_correlations(spec, a, b, ds, samples=200).corr["layers.2"] == 0).all(1)
        assert dead.sum() >= 2
    if arch == "resnet20":  # residual streams: several points summed per permutation
        assert max(len(v) for v in spec.activation_points.values()) == 4


def _direct_corr(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    n = xa.shape[1]
    return np.corrcoef(xa.T, xb.T)[:n, n:]


def test_one_pass_float64_correlations_match_direct_computation():
    """Stream.0 of ResNet-20: 4 conv points, every spatial position a sample, summed; any batch size."""
    shape = (3, 8, 8)
    cfg, a = _model("resnet20", 0.5, "bn", shape, seed=0)
    _, b = _model("resnet20", 0.5, "bn", shape, seed=5)
    spec, ds = permutation_spec(cfg, shape, 4), _data(shape, n=96)
    stats = activation_correlations(spec, a, b, ds, samples=80, batch_size=80)
    again = activation_correlations(spec, a, b, ds, samples=80, batch_size=7)
    assert stats.samples == 80 and stats.points["stream.0"] == 4 and stats.rows["stream.0"] == 80 * 8 * 8
    for p in spec.names:
        assert torch.allclose(stats.corr[p], again.corr[p], atol=1e-10, rtol=0)
    acts = {}
    hooks = [m.get_submodule(n).register_forward_hook(lambda _m, _i, o, key=(tag, n): acts.__setitem__(key, o))
             for tag, m in (("a", a), ("b", b)) for n in spec.activation_points["stream.0"]]
    with torch.no_grad():
        x = ds.normalize(ds.x_train[:80])
        a(x), b(x)
    for h in hooks:
        h.remove()
    expected = sum(_direct_corr(*(acts[(t, n)].double().movedim(1, -1).reshape(-1, acts[(t, n)].shape[1]).numpy()
                                  for t in "ab")) for n in spec.activation_points["stream.0"])
    assert np.allclose(stats.corr["stream.0"].numpy(), expected, atol=1e-9)


def test_dead_units_have_zero_correlation_and_mlp_spec_by_hand():
    """A hand-built two-layer net with one dead hidden unit: finite correlations, 0 for the dead unit."""
    class Net(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.flatten = torch.nn.Flatten()
            self.fc = torch.nn.Linear(64, 6)
            self.relu = torch.nn.ReLU()
            self.out = torch.nn.Linear(6, 4)
            with torch.no_grad():
                self.fc.weight[2] = 0
                self.fc.bias[2] = -1.0  # unit 2 is dead on every input

        def forward(self, x):
            return self.out(self.relu(self.fc(self.flatten(x))))

    spec = permutation_spec_from_axes({"fc.weight": ("h", None), "fc.bias": ("h",), "out.weight": (None, "h"),
                                       "out.bias": (None,)}, {"h": ["relu"]})
    ds = _data((1, 8, 8), n=64)
    stats = activation_correlations(spec, Net(0), Net(1), ds, samples=64)
    c = stats.corr["h"]
    assert torch.isfinite(c).all() and c.abs().max() <= 1
    assert (c[2] == 0).all() and (c[:, 2] == 0).all()


def test_spec_without_activation_points_is_refused():
    spec = permutation_spec_from_axes({"fc.weight": ("h", None)})
    with pytest.raises(LmcxError, match="no activation points"):
        activation_correlations(spec, torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), None, samples=4)
