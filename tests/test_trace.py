"""Traced permutation specs (permutation/trace.py) and their check (permutation/check.py): equal to the
hand-written specs of the built-in models (tests/reference_specs.py, names included), full coverage of
torchvision ResNets and MobileNetV2, clear pins or refusals elsewhere, wrong specs caught, and weight
matching with block axes (flatten -> Linear).

"Fully permuted" is verified two ways: `Coverage.full` (every unpermuted axis of size > 1 is pinned
as a model input, model output or convolution kernel axis: no axis is pinned for any other reason),
and the number of permutations equals the architecture's independent hidden spaces (one per
residual stream, one per inner layer), so no two spaces that could move separately were merged.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lmcx.config import ModelConfig
from lmcx.errors import LmcxError
from lmcx.models import build_model, permutation_spec
from lmcx.permutation import (apply_permutation, check_spec, l2_distance, permutation_spec_from_axes,
                              random_permutation, spec_coverage, trace_spec, weight_matching)
from reference_specs import reference_spec


def _groups(spec):
    return {frozenset(axes) for axes in spec.perm_to_axes.values()}


def _batch(*shape, seed=0):
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,norm,bias", list(itertools.product(["mlp", "vgg11", "vgg16", "resnet20"],
                                                                  ["bn", "ln", "none"], [True, False])))
def test_traced_spec_equals_hand_written(arch, norm, bias):
    cfg = ModelConfig(arch=arch, width=1 / 64 if arch == "mlp" else 0.25 if arch == "resnet20" else 0.125,
                      norm=norm, bias=bias)
    model = build_model(cfg, (3, 8, 8), 10)
    hand, traced = reference_spec(cfg), trace_spec(model, _batch(3, 8, 8))
    assert set(traced.axes_to_perm) == set(hand.axes_to_perm)
    assert _groups(traced) == _groups(hand)
    assert not traced.block_sizes
    # the activation points agree too (post-ReLU outputs), permutation by permutation
    by_axes = {frozenset(axes): name for name, axes in hand.perm_to_axes.items()}
    for name, axes in traced.perm_to_axes.items():
        assert sorted(traced.activation_points[name]) == sorted(hand.activation_points[by_axes[frozenset(axes)]])
    # what lmcx uses (lmcx.models.permutation_spec) is the traced spec under the names permutation files
    # have always stored: identical to the hand-written spec, names included
    used = permutation_spec(cfg, (3, 8, 8), 10)
    assert used.perm_to_axes.keys() == hand.perm_to_axes.keys()
    assert {p: set(axes) for p, axes in used.perm_to_axes.items()} == {p: set(axes) for p, axes in hand.perm_to_axes.items()}
    assert used.activation_points == hand.activation_points


def test_wide_built_ins_are_traced_at_width_one():
    """Their structure does not depend on the width: the spec traced at width 1 fits a 4x model."""
    cfg = ModelConfig(arch="resnet20", width=4, norm="bn")
    spec = permutation_spec(cfg, (3, 8, 8), 10)
    assert spec is permutation_spec(ModelConfig(arch="resnet20", width=2, norm="bn"), (3, 8, 8), 10)  # one trace
    check_spec(build_model(cfg, (3, 8, 8), 10), spec, _batch(3, 8, 8))


@pytest.mark.parametrize("name,permutations", [("resnet18", 12), ("resnet50", 37), ("mobilenet_v2", 25)])
def test_torchvision_models_are_fully_permuted(name, permutations):
    # resnet18: 4 streams + 2 inner per block x 4; resnet50: 5 streams + 2 inner x 16 bottlenecks;
    # mobilenet_v2: stem, 7 stage streams, 16 expanded (pointwise + depthwise) layers, last conv
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = trace_spec(model, _batch(3, 32, 32))  # checked inside: eval and train mode
    coverage = spec_coverage(spec, model.state_dict())
    assert coverage.full, coverage.summary()
    assert coverage.permutations == permutations
    assert coverage.tensors_permuted == coverage.tensors - 1  # all but the classifier bias (output axis only)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model was not touched
    assert model.training


@pytest.mark.slow  # 130M parameters: the float64 check alone copies and permutes 1 GB several times
def test_vgg11_bn_flatten_into_linear_is_a_block_axis():
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    spec = trace_spec(model, _batch(3, 32, 32))
    coverage = spec_coverage(spec, model.state_dict())
    assert coverage.full and coverage.permutations == 10  # 8 convs, 2 hidden Linear layers
    # 512 channels of a 7x7 map flattened into classifier.0's 25088 inputs: 49 columns per channel
    assert spec.block_sizes == {("classifier.0.weight", 1): 49}
    assert spec.axes_to_perm["classifier.0.weight"][1] == spec.axes_to_perm["features.25.weight"][0]


def test_densenet121_pins_concatenated_channels_and_permutes_bottlenecks():
    model = torchvision.models.densenet121(weights=None, num_classes=10)
    spec = trace_spec(model, _batch(3, 32, 32))
    coverage = spec_coverage(spec, model.state_dict())
    assert coverage.permutations == 58  # one bottleneck (conv1 -> norm2 -> conv2) per dense layer
    assert "concatenated along this axis (torch.cat)" in coverage.pinned
    assert spec.axes_to_perm["features.denseblock1.denselayer1.conv1.weight"][0] == \
        spec.axes_to_perm["features.denseblock1.denselayer1.conv2.weight"][1]


def test_vision_transformer_permutes_stream_and_mlps_not_heads():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    spec = trace_spec(model, _batch(3, 32, 32))
    stream = spec.axes_to_perm["conv_proj.weight"][0]
    for key, axis in [("class_token", 2), ("encoder.pos_embedding", 2), ("encoder.ln.weight", 0),
                      ("encoder.layers.encoder_layer_1.self_attention.in_proj_weight", 1),
                      ("encoder.layers.encoder_layer_1.self_attention.out_proj.weight", 0),
                      ("heads.head.weight", 1)]:
        assert spec.axes_to_perm[key][axis] == stream, key
    assert len(spec.names) == 3  # the stream and one MLP hidden layer per encoder layer
    assert spec.pinned[("encoder.layers.encoder_layer_0.self_attention.in_proj_weight", 0)] == \
        "attention heads (inside nn.MultiheadAttention)"


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class ScaledBlock(nn.Module):
    """Depthwise conv, BN, hardswish, SE, and a layer-scale parameter on the residual branch."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.se = SqueezeExcite(c)
        self.gamma = nn.Parameter(torch.full((c,), 0.1))

    def forward(self, x):
        return x + self.gamma.view(1, -1, 1, 1) * self.se(F.hardswish(self.bn(self.dw(x))))


class Custom(nn.Module):
    """conv -> block -> pool -> Conv1d over positions -> BatchNorm1d -> flatten -> Linear -> BN1d -> Linear."""

    def __init__(self, c=8, side=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = ScaledBlock(c)
        self.mix = nn.Conv1d(c, 6, 1)
        self.mix_bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6 * side * side, 16)
        self.fc_bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        x = self.mix_bn(self.mix(F.adaptive_avg_pool2d(x, 4).flatten(2))).relu()
        return self.head(F.gelu(self.fc_bn(self.fc(torch.flatten(x, 1)))))


def test_custom_model_with_se_layer_scale_conv1d_and_flatten():
    model = Custom()
    spec = trace_spec(model, _batch(3, 8, 8))
    coverage = spec_coverage(spec, model.state_dict())
    assert coverage.full and coverage.permutations == 4  # stream, SE hidden, Conv1d channels, fc units
    stream = spec.axes_to_perm["stem.weight"][0]
    for key, axis in [("block.gamma", 0), ("block.dw.weight", 0), ("block.bn.running_var", 0),
                      ("block.se.reduce.weight", 1), ("block.se.expand.weight", 0), ("mix.weight", 1)]:
        assert spec.axes_to_perm[key][axis] == stream, key
    assert spec.axes_to_perm["fc.weight"][1] == spec.axes_to_perm["mix_bn.running_mean"][0]
    assert spec.block_sizes == {("fc.weight", 1): 16}


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.norm = nn.GroupNorm(2, 16)
        self.out = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(self.out(F.relu(self.norm(self.grouped(x)))).amax((2, 3)))


def test_concatenation_grouped_conv_and_group_norm_are_pinned_with_reasons():
    model = Mixed()
    spec = trace_spec(model, _batch(3, 8, 8))
    assert _groups(spec) == {frozenset({("out.weight", 0), ("out.bias", 0), ("head.weight", 1)})}
    assert spec.pinned[("a.weight", 0)] == "concatenated along this axis (torch.cat)"
    assert spec.pinned[("grouped.weight", 0)] == "grouped convolution (4 groups): a permutation would cross groups"
    assert spec.pinned[("norm.weight", 0)].startswith("GroupNorm with 2 groups")


class Attention(nn.Module):
    """Multi-head self-attention written out: fused qkv, heads split by view/permute/unbind."""

    def __init__(self, d=16, heads=2, sdpa=False):
        super().__init__()
        self.qkv, self.proj, self.heads, self.sdpa = nn.Linear(d, 3 * d), nn.Linear(d, d), heads, sdpa

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class GatedMLP(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc, self.out = nn.Linear(d, 64), nn.Linear(32, d)

    def forward(self, x):
        a, g = self.fc(x).chunk(2, dim=-1)
        return self.out(a * torch.sigmoid(g))


class TinyLM(nn.Module):
    """Token ids -> tied embedding, learned positions, pre-norm attention and gated MLP, RMSNorm."""

    def __init__(self, sdpa):
        super().__init__()
        self.emb, self.pos = nn.Embedding(20, 16), nn.Parameter(torch.randn(1, 5, 16))
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(16), Attention(sdpa=sdpa), nn.LayerNorm(16), GatedMLP()
        self.final = nn.RMSNorm(16)

    def forward(self, ids):
        x = self.emb(ids) + self.pos
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return F.linear(self.final(x), self.emb.weight)


@pytest.mark.parametrize("sdpa", [False, True])
def test_token_model_permutes_its_residual_stream_through_attention(sdpa):
    model = TinyLM(sdpa)
    spec = trace_spec(model, torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0)))
    assert _groups(spec) == {frozenset({
        ("emb.weight", 1), ("pos", 2), ("ln1.weight", 0), ("ln1.bias", 0), ("attn.qkv.weight", 1),
        ("attn.proj.weight", 0), ("attn.proj.bias", 0), ("ln2.weight", 0), ("ln2.bias", 0), ("mlp.fc.weight", 1),
        ("mlp.out.weight", 0), ("mlp.out.bias", 0), ("final.weight", 0)})}
    # the fused q/k/v rows and the gated halves would need per-segment permutations: pinned
    assert {spec.pinned[("attn.qkv.weight", 0)], spec.pinned[("mlp.fc.weight", 0)]} == {"split along this axis"}
    assert spec.pinned[("emb.weight", 0)] == "embedding rows (token ids)"


class Assorted(nn.Module):
    """PReLU, InstanceNorm, GroupNorm with one channel per group, a transposed conv, resampling, a conv
    used twice, stack, indexing, expand, transpose."""

    def __init__(self):
        super().__init__()
        self.conv, self.prelu = nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8)
        self.inorm, self.gnorm = nn.InstanceNorm2d(8, affine=True), nn.GroupNorm(8, 8)
        self.up, self.down = nn.ConvTranspose2d(8, 6, 2, stride=2), nn.Upsample(scale_factor=0.5)
        self.shared, self.fc = nn.Conv2d(6, 6, 1), nn.Linear(6, 4)

    def forward(self, x):
        x = self.down(self.up(self.gnorm(self.inorm(self.prelu(self.conv(x))))))
        x = self.shared(F.silu(self.shared(F.interpolate(x, scale_factor=1.0))))
        y = torch.stack([x, x * 2], dim=1).sum(1)[:, :, 0][..., None].expand(-1, -1, -1, 3).mean(-1)
        return self.fc(y.transpose(1, 2)).amax(1)


def test_assorted_layers_and_a_module_called_twice():
    model = Assorted()
    spec = trace_spec(model, _batch(3, 8, 8))
    coverage = spec_coverage(spec, model.state_dict())
    assert coverage.full and coverage.permutations == 2
    assert spec.axes_to_perm["shared.weight"][:2] == (spec.axes_to_perm["up.weight"][1],) * 2
    assert spec.axes_to_perm["prelu.weight"][0] == spec.axes_to_perm["gnorm.bias"][0] == \
        spec.axes_to_perm["up.weight"][0]


class NormalizedLinear(nn.Linear):
    def forward(self, x):  # a subclass with its own forward is traced into, not taken for a Linear
        return F.linear(x, self.weight / self.weight.norm(dim=1, keepdim=True), self.bias)


class TrainOnlyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head, self.aux = NormalizedLinear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc(x))
        return (self.head(h), self.aux(h)) if self.training else self.head(h)


def test_train_only_branch_and_a_subclass_with_its_own_forward():
    spec = trace_spec(TrainOnlyHead(), _batch(4))  # traced in eval and in train mode
    assert _groups(spec) == {frozenset({("fc.weight", 0), ("fc.bias", 0), ("head.weight", 1), ("aux.weight", 1)})}


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -x


def test_data_dependent_control_flow_is_a_clear_error():
    with pytest.raises(LmcxError, match=r"cannot trace Branching .*test_trace.py:\d+ \(forward\).*control flow"):
        trace_spec(Branching(), _batch(4))


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc3(torch.cumsum(self.fc2(self.fc1(x).relu()), dim=1))  # cumsum: order matters


def test_an_operation_the_tracer_does_not_know_pins_what_it_touches():
    spec = trace_spec(Opaque(), _batch(4))
    assert list(spec.perm_to_axes.values()) == [[("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)]]
    assert "torch.cumsum is not followed by the tracer" in spec.pinned[("fc2.weight", 0)]


def test_check_spec_catches_unpermuted_batchnorm_statistics():
    """The bug of a traced spec that leaves BN running statistics out: eval mode changes."""
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    spec = trace_spec(model, _batch(3, 32, 32))
    axes = {k: (None,) * len(v) if "running" in k else v for k, v in spec.axes_to_perm.items()}
    broken = permutation_spec_from_axes(axes, spec.activation_points)
    with pytest.raises(LmcxError, match=r"outputs differ by .* in eval mode under permutation 'conv1'"):
        check_spec(model, broken, _batch(3, 32, 32))


def test_check_spec_names_a_wrong_permutation_of_a_built_in_spec():
    cfg = ModelConfig(arch="resnet20", width=0.25, norm="bn")
    spec = permutation_spec(cfg, (3, 8, 8), 10)
    axes = dict(spec.axes_to_perm, **{"stages.1.0.conv2.weight": ("stages.1.0.conv1", "stages.1.0.conv1", None, None)})
    with pytest.raises(LmcxError, match=r"permutation 'stages\.1\.0\.conv1'"):
        check_spec(build_model(cfg, (3, 8, 8), 10), permutation_spec_from_axes(axes, spec.activation_points),
                   _batch(3, 8, 8))


def test_check_spec_catches_an_activation_point_of_another_permutation():
    cfg = ModelConfig(arch="mlp", width=1 / 64, norm="bn")
    spec = permutation_spec(cfg, (3, 8, 8), 10)
    points = dict(spec.activation_points, **{"layers.0": ["layers.1.relu"]})
    broken = permutation_spec_from_axes(spec.axes_to_perm, points)
    with pytest.raises(LmcxError, match=r"activation point 'layers\.1\.relu' does not carry permutation 'layers\.0'"):
        check_spec(build_model(cfg, (3, 8, 8), 10), broken, _batch(3, 8, 8))


def _wm_pair(spec, a, b, x):
    """Weight matching of b to a: L2 before/after and the max logit change of b (eval mode)."""
    sa, sb = a.state_dict(), b.state_dict()
    result = weight_matching(spec, sa, sb)
    permuted = apply_permutation(spec, result.perm, sb)
    keys = list(spec.axes_to_perm)
    moved = Custom().eval()
    moved.load_state_dict(permuted)
    with torch.no_grad():
        change = (moved(x) - b.eval()(x)).abs().max().item()
    return l2_distance(sa, sb, keys)[0], l2_distance(sa, permuted, keys)[0], change, result


def test_weight_matching_with_a_block_axis_lowers_l2_and_keeps_b():
    x = _batch(3, 8, 8)
    torch.manual_seed(0)
    a, b = Custom(), Custom()
    spec = trace_spec(a, x)
    before, after, change, _ = _wm_pair(spec, a, b, x)
    assert after < before and change < 1e-5


def test_weight_matching_undoes_a_permutation_through_a_block_axis():
    x = _batch(3, 8, 8)
    a = Custom()
    spec = trace_spec(a, x)
    b = Custom()
    b.load_state_dict(apply_permutation(spec, random_permutation(spec, a.state_dict(), seed=3), a.state_dict()))
    _, after, change, result = _wm_pair(spec, a, b, x)
    assert after == 0.0 and change < 1e-5 and result.objective[-1] > result.objective[0]
