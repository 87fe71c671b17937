"""Models: shapes and gradients at several widths, exact permutation invariance through each spec,
spec coverage of every state-dict entry, feature and activation points, config errors."""
from __future__ import annotations

import itertools

import pytest
import torch

from lmcx.config import ModelConfig
from lmcx.errors import LmcxError
from lmcx.models import ARCHITECTURES, build_model, feature_points, permutation_spec
from lmcx.permutation.spec import apply_permutation, perm_sizes, random_permutation

ARCHS = ["mlp", "vgg11", "vgg16", "resnet20"]
NORMS = ["bn", "ln", "none"]
SHAPE = (3, 16, 16)
CLASSES = 7


def _input(shape=SHAPE, n=4, seed=0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _randomise_per_unit_values(model: torch.nn.Module, seed: int) -> None:
    """Give every bias, norm parameter and running statistic distinct per-unit values: the defaults
    (zero conv biases, norm weight 1 and bias 0, running mean 0 and var 1) are the same for every unit,
    so a spec that permuted them wrongly would go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            if isinstance(m, norms + (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


def test_architectures_listed():
    assert set(ARCHITECTURES) == set(ARCHS)


# VGG at width 4 is large (VGG-16: ~235M parameters): a 1x8x8 input keeps its convolutions cheap (the
# widest layers then run on 1x1 maps), but building VGG-16 and allocating its gradients still takes ~5 s,
# so at width 4 it runs with BatchNorm only; its LayerNorm / no-norm code is VGG-11's, tested at width 4.
FORWARD_CASES = [(a, w, n) for a, w, n in itertools.product(ARCHS, [1.0, 4.0], NORMS)
                 if not (a == "vgg16" and w == 4.0 and n != "bn")]


@pytest.mark.parametrize("arch,width,norm", FORWARD_CASES)
def test_forward_backward(arch, width, norm):
    shape = (1, 8, 8) if (arch.startswith("vgg") and width > 1) else SHAPE
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, width=width, norm=norm), shape, CLASSES)
    x, y = _input(shape), torch.arange(4) % CLASSES
    out = model(x)
    assert out.shape == (4, CLASSES)
    torch.nn.functional.cross_entropy(out, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.classifier.weight.grad.abs().sum() > 0
    last_units = {"mlp": 512, "vgg11": 512, "vgg16": 512, "resnet20": 64}[arch]
    assert model.classifier.in_features == round(last_units * width)


def test_width_scales_units_and_keeps_names():
    cfg1, cfg2 = ModelConfig(arch="resnet20", width=1.0), ModelConfig(arch="resnet20", width=2.5)
    sd1, sd2 = build_model(cfg1, SHAPE, 10).state_dict(), build_model(cfg2, SHAPE, 10).state_dict()
    assert list(sd1) == list(sd2)
    assert sd1["stem.conv.weight"].shape[0] == 16 and sd2["stem.conv.weight"].shape[0] == 40
    assert sd2["stages.2.2.conv2.weight"].shape[0] == 160
    mlp = build_model(ModelConfig(arch="mlp", width=0.001), (1, 8, 8), 10).state_dict()
    assert mlp["layers.0.linear.weight"].shape == (1, 64)  # at least one unit, however small the width


def test_deterministic_under_seed():
    cfg = ModelConfig(arch="vgg11", width=0.25)
    torch.manual_seed(3)
    a = build_model(cfg, SHAPE, 10).state_dict()
    torch.manual_seed(3)
    b = build_model(cfg, SHAPE, 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vgg_any_input_size():
    for shape in [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 9, 13)]:
        model = build_model(ModelConfig(arch="vgg16", width=0.125), shape, 10)
        assert model(_input(shape, n=2)).shape == (2, 10)


@pytest.mark.parametrize("arch,norm,bias,width",
                         list(itertools.product(ARCHS, NORMS, [True, False], [1.0, 2.0])))
def test_permutation_invariance(arch, norm, bias, width):
    cfg = ModelConfig(arch=arch, width=width, norm=norm, bias=bias)
    torch.manual_seed(0)
    model = build_model(cfg, SHAPE, CLASSES)
    _randomise_per_unit_values(model, seed=1)
    model.eval()
    spec = permutation_spec(cfg, SHAPE, CLASSES)
    sd = model.state_dict()

    # The spec names every state-dict entry (num_batches_tracked carries no units), with one axis
    # entry per tensor dimension; the logits are never permuted; bias=False leaves no bias anywhere.
    assert set(spec.axes_to_perm) == {k for k in sd if not k.endswith("num_batches_tracked")}
    for key, axes in spec.axes_to_perm.items():
        assert len(axes) == sd[key].ndim, key
    assert spec.axes_to_perm["classifier.weight"][0] is None
    if not bias:
        assert not [k for k, m in model.named_modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None]
    # Every axis a permutation acts on has that permutation's size.
    sizes = perm_sizes(spec, sd)
    for p, axes in spec.perm_to_axes.items():
        assert all(sd[k].shape[a] == sizes[p] for k, a in axes), p

    perm = random_permutation(spec, sd, seed=2)
    permuted = apply_permutation(spec, perm, sd)
    assert any(not torch.equal(sd[k], permuted[k]) for k in sd)  # not vacuous

    # Run the model, load the permuted state dict into it (every entry is overwritten), run it again;
    # hooks on every activation point check that the units move as the spec says.
    acts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name in itertools.chain.from_iterable(spec.activation_points.values()):
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: acts.__setitem__(name, out))
    x = _input()
    with torch.no_grad():
        out_a = model(x)
        acts_a = dict(acts)
        model.load_state_dict(permuted)
        out_b = model(x)
    assert (out_a - out_b).abs().max().item() < 1e-4
    assert out_a.abs().max().item() > 1e-3  # the outputs compared are not all zero

    for p, names in spec.activation_points.items():
        assert names, p
        for name in names:
            a, b = acts_a[name], acts[name]
            assert a.shape[1] == sizes[p], (p, name)
            # float32 sums over permuted channels round differently: compare relative to the scale.
            err = (b - a.index_select(1, perm[p])).abs().max().item()
            assert err <= 1e-5 * (1 + a.abs().max().item()), (p, name, err)
    # Every permutation appears at some activation point (activation matching needs all of them).
    assert set(spec.activation_points) == set(spec.perm_to_axes)


@pytest.mark.parametrize("arch,norm", list(itertools.product(ARCHS, NORMS)))
def test_feature_points(arch, norm):
    cfg = ModelConfig(arch=arch, width=0.5, norm=norm)
    model = build_model(cfg, SHAPE, CLASSES).eval()
    points = feature_points(cfg, SHAPE, CLASSES)
    expected_len = {"mlp": 4, "vgg11": 9, "vgg16": 14, "resnet20": 11}[arch]  # hidden layers + logits
    assert len(points) == expected_len and len(set(points)) == len(points)
    modules = dict(model.named_modules())
    assert all(name in modules for name in points)
    assert all(name in modules for names in permutation_spec(cfg, SHAPE, CLASSES).activation_points.values() for name in names)
    outs: dict[str, torch.Tensor] = {}
    for name in points:
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: outs.__setitem__(name, out))
    with torch.no_grad():
        logits = model(_input())
    assert list(outs) == points  # hooks fire in input-to-output order
    assert torch.equal(outs[points[-1]], logits)
    for name in points[:-1]:
        assert (outs[name] >= 0).all(), f"{name} is not a post-ReLU output"


def test_errors():
    with pytest.raises(LmcxError, match="mlp, vgg11, vgg16, resnet20"):
        build_model(ModelConfig(arch="vgg19"), SHAPE, 10)
    with pytest.raises(LmcxError, match="unknown architecture"):
        permutation_spec(ModelConfig(arch="resnet18"), SHAPE, 10)
    with pytest.raises(LmcxError, match="unknown architecture"):
        feature_points(ModelConfig(arch="transformer"), SHAPE, 10)
    for width in (0, 0.0, -1.0):
        with pytest.raises(LmcxError, match="width"):
            build_model(ModelConfig(arch="mlp", width=width), SHAPE, 10)
        with pytest.raises(LmcxError, match="width"):
            permutation_spec(ModelConfig(arch="resnet20", width=width), SHAPE, 10)
