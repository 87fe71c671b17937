"""Models from outside lmcx: `torchvision.<name>` and the user's `module:callable` factories (tests/user_models.py)
through every subcommand, the trust rule for factories named by checkpoints, and `lmcx import`."""
import json

import pytest
import torch
import torchvision

import lmcx.arch
from conftest import assert_clean_error, write_yaml
from lmcx.checkpoint import build_from_checkpoint, load_checkpoint
from lmcx.config import DataConfig, ModelConfig, SyntheticConfig, TrainJob, load_config
from lmcx.data import load_dataset
from lmcx.errors import LmcxError
from lmcx.models import build_model, feature_points, permutation_coverage, permutation_spec

SYNTHETIC = "data: {{name: synthetic, calib_size: 16, synthetic: {{train_size: {n}, test_size: 32, num_classes: 4, " \
            "shape: {shape}}}}}\n"
TRAIN = "train: {optimizer: adam, lr: 0.001, weight_decay: 0.0, epochs: 1, batch_size: 16, warmup_epochs: 0}\n"
TORCHVISION = SYNTHETIC.format(n=64, shape=[3, 32, 32]) + "model: {arch: torchvision.resnet18}\n" + TRAIN
FACTORY = SYNTHETIC.format(n=96, shape=[3, 8, 8]) + "model: {arch: 'user_models:small_net', width: 0.5}\n" + TRAIN


@pytest.fixture(autouse=True)
def nothing_trusted(monkeypatch):
    """Each test starts with no module trusted (the CLI's --trust-code adds to this set)."""
    monkeypatch.setattr(lmcx.arch, "_trusted", set())
    monkeypatch.delenv(lmcx.arch.TRUST_ENV, raising=False)


def _ok(result):
    assert result.code == 0, result.err
    return result


def _max_logit_diff(path_b, path_pb):
    """Largest |logit| change between B and π(B) in eval mode on B's test images, and the logits' scale."""
    b, pb = load_checkpoint(path_b), load_checkpoint(path_pb)
    ds = load_dataset(b.data)
    x = ds.normalize(ds.x_test)
    with torch.no_grad():
        out_b, out_pb = build_from_checkpoint(b).eval()(x), build_from_checkpoint(pb).eval()(x)
    return (out_b - out_pb).abs().max().item(), out_b.abs().max().item()


def _match_and_check(cli, tmp_path, a, b, *extra):
    _ok(cli("match", "--method", "wm", "--a", a, "--b", b, "--out", tmp_path / "wm", *extra))
    m = json.loads((tmp_path / "wm" / "metrics.json").read_text())
    assert m["l2_after"]["total"] < m["l2_before"]["total"]
    diff, scale = _max_logit_diff(b, tmp_path / "wm" / "permuted.safetensors")
    assert diff <= 1e-5 * (1 + scale), diff  # float32 rounding only: B's function is kept in eval mode
    return m


# ---------------------------------------------------------------------------------------------
# Naming an architecture


@pytest.mark.parametrize("arch, fragments", [
    ("torchvision.resnet1", ["model.arch", "not a torchvision classification model", "torchvision.resnet18"]),
    ("torchvision.fasterrcnn_resnet50_fpn", ["not a torchvision classification model"]),
    ("my model", ["model.arch", "unknown architecture", "torchvision.<name>", "module:callable"]),
    ("pkg.mod:", ["unknown architecture"]),
])
def test_unknown_architectures_are_refused_when_the_config_loads(arch, fragments):
    with pytest.raises(LmcxError) as err:
        load_config(TrainJob, None, [{"model": {"arch": arch}}])
    assert all(f in str(err.value) for f in fragments), str(err.value)


def test_settings_that_do_not_apply_to_outside_models():
    with pytest.raises(LmcxError, match="model.width: torchvision models have no width multiplier"):
        load_config(TrainJob, None, [{"model": {"arch": "torchvision.resnet18", "width": 2}}])
    with pytest.raises(LmcxError, match="model.bias: false applies to the built-in architectures only"):
        load_config(TrainJob, None, [{"model": {"arch": "user_models:small_net", "bias": False}}])
    with pytest.raises(LmcxError, match="set model.norm: ln"):
        build_model(ModelConfig(arch="torchvision.vit_b_32", norm="bn"), (3, 32, 32), 10)
    with pytest.raises(LmcxError, match="set model.norm: none"):
        build_model(ModelConfig(arch="user_models:fixed_net", norm="bn"), (3, 8, 8), 4)
    with pytest.raises(LmcxError, match="model.width: user_models:fixed_net takes no width parameter"):
        build_model(ModelConfig(arch="user_models:fixed_net", norm="none", width=2), (3, 8, 8), 4)


def test_torchvision_models_take_the_datasets_shape_and_classes():
    model = build_model(ModelConfig(arch="torchvision.resnet18"), (3, 16, 16), 7)
    assert model.fc.out_features == 7
    vit = build_model(ModelConfig(arch="torchvision.vit_b_32", norm="ln"), (3, 32, 32), 5)
    assert vit.image_size == 32 and vit(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(LmcxError, match="3-channel .* 1 channel"):
        build_model(ModelConfig(arch="torchvision.resnet18"), (1, 28, 28), 10)
    with pytest.raises(LmcxError, match="multiple of its patch size 32"):
        build_model(ModelConfig(arch="torchvision.vit_b_32", norm="ln"), (3, 48, 48), 10)
    with pytest.raises(LmcxError, match="fails on 3x32x32 images .*larger images"):
        build_model(ModelConfig(arch="torchvision.alexnet", norm="none"), (3, 32, 32), 10)


@pytest.mark.parametrize("arch, fragment", [
    ("no_such_module_xyz:build", "there is no module 'no_such_module_xyz' on the Python path"),
    ("user_models:missing", "has no 'missing'"),
    ("user_models:wrong_output", "returns (2, 5) for a batch of 2 images; lmcx needs logits of shape [N, 4]"),
    ("user_models:not_a_model", "returned a str, not a torch.nn.Module"),
])
def test_broken_factories_are_clear_errors(arch, fragment):
    with pytest.raises(LmcxError) as err:
        build_model(ModelConfig(arch=arch, norm="none"), (3, 8, 8), 4)
    assert fragment in str(err.value)


def test_factory_spec_coverage_and_feature_points():
    cfg = ModelConfig(arch="user_models:small_net", width=0.5)
    coverage = permutation_coverage(cfg, (3, 8, 8), 4)
    assert coverage.full and coverage.permutations == 3  # the stream (with the gate's scale), SE hidden, Linear
    spec = permutation_spec(cfg, (3, 8, 8), 4)
    assert spec.axes_to_perm["gate.scale"] == (spec.axes_to_perm["conv.weight"][0],)
    assert spec.block_sizes == {("hidden.weight", 1): 4}  # 2x2 pooled map flattened into the Linear
    # activation points in execution order (conv -> BN -> ReLU counts once), then the logits' module
    assert feature_points(cfg, (3, 8, 8), 4) == ["stem.2", "gate.squeeze", "act", "hidden_act", "head"]


# ---------------------------------------------------------------------------------------------
# Every subcommand


@pytest.mark.slow  # two ResNet-18s (11M parameters each) through every subcommand: ~33 s of CPU, half of it
# the float64 SVDs of 3 x 21 weights and a fifth their spectra plot (16x16 images instead of 32x32 saved ~1 s)
def test_torchvision_resnet18_through_every_subcommand(tmp_path, cli):
    cfg = write_yaml(tmp_path / "tv.yaml", TORCHVISION)
    for seed in (0, 1):
        _ok(cli("train", "-c", cfg, "--seed", seed, "--device", "cpu", "--out", tmp_path / f"s{seed}"))
    a, b = tmp_path / "s0", tmp_path / "s1"
    assert json.loads((a / "meta.json").read_text())["architecture"] == "torchvision.resnet18"
    m = _match_and_check(cli, tmp_path, a, b)
    assert m["permutation_spec"]["permutations"] == 12 and set(m["permutation_spec"]["pinned"]) == {
        "model input", "model output", "convolution kernel window"}  # every hidden axis permuted
    _ok(cli("interpolate", "--a", a, "--b", b, "--b", tmp_path / "wm" / "permuted.safetensors", "--label", "naive",
            "--label", "wm", "--points", "3", "--norm-fix", "reset", "--calibrate", "--out", tmp_path / "reset"))
    barrier = json.loads((tmp_path / "reset" / "barrier.json").read_text())
    assert barrier["norm_fix"] == "reset" and set(barrier["results"]) == {"naive", "wm"}
    _ok(cli("calibrate", tmp_path / "reset", "--force"))
    _ok(cli("interpolate", "--a", a, "--b", b, "--perm", tmp_path / "wm" / "permutation.json", "--points", "3",
            "--norm-fix", "repair", "--out", tmp_path / "repair"))
    assert json.loads((tmp_path / "repair" / "barrier.json").read_text())["norm_fix"] == "repair"
    _ok(cli("analyze-svd", "--a", a, "--b", b, "--b-permuted", tmp_path / "wm" / "permuted.safetensors",
            "--out", tmp_path / "svd"))
    svd = json.loads((tmp_path / "svd" / "svd.json").read_text())
    assert len(svd["layers"]) == 21 and svd["totals"]["max_rel_sv_diff"] < 1e-10  # 20 convs and fc


@pytest.mark.slow
def test_user_factory_through_every_subcommand(tmp_path, cli):
    cfg = write_yaml(tmp_path / "user.yaml", FACTORY)
    for seed in (0, 1, 2):  # lmcx train builds the factory it is given: the user named it
        _ok(cli("train", "-c", cfg, "--seed", seed, "--device", "cpu", "--out", tmp_path / f"s{seed}"))
    a, b, c = (tmp_path / f"s{s}" for s in (0, 1, 2))
    # a checkpoint naming a factory does not make lmcx import it ...
    assert_clean_error(cli("match", "--a", a, "--b", b, "--out", tmp_path / "refused"),
                       "user_models:small_net", "--trust-code user_models")
    assert not (tmp_path / "refused" / "metrics.json").exists()
    # ... the user's word does (the flag, before or after the subcommand, or the environment variable)
    _match_and_check(cli, tmp_path, a, b, "--trust-code", "user_models")
    trust = ("--trust-code", "user_models")
    for method in ("am", "ste"):
        _ok(cli(*trust, "match", "--method", method, "--a", a, "--b", b, "--out", tmp_path / method,
                "--set", "ste.epochs=1", "--set", "ste.batch_size=32", "--set", "am_samples=64"))
        diff, scale = _max_logit_diff(b, tmp_path / method / "permuted.safetensors")
        assert diff <= 1e-5 * (1 + scale), (method, diff)
    _ok(cli(*trust, "match", "--a", a, "--b", b, "--b", c, "--many", "merge-many", "--out", tmp_path / "many"))
    assert (tmp_path / "many" / "b2" / "permuted.safetensors").is_file()
    for fix in ("reset", "repair"):
        _ok(cli(*trust, "interpolate", "--a", a, "--b", b, "--perm", tmp_path / "wm" / "permutation.json",
                "--points", "3", "--norm-fix", fix, "--calibrate", "--out", tmp_path / fix))
    _ok(cli(*trust, "calibrate", tmp_path / "reset", "--force"))
    _ok(cli(*trust, "analyze-svd", "--a", a, "--b", b, "--perm", tmp_path / "wm" / "permutation.json",
            "--out", tmp_path / "svd"))
    svd = json.loads((tmp_path / "svd" / "svd.json").read_text())
    assert [r["name"] for r in svd["layers"]] == ["stem.0.weight", "conv.weight", "gate.squeeze.weight",
                                                  "gate.excite.weight", "hidden.weight", "head.weight"]
    _ok(cli(*trust, "lewc", "--a", a, "--b", tmp_path / "wm" / "permuted.safetensors", "--set", "samples=32",
            "--out", tmp_path / "lewc"))
    lewc = json.loads((tmp_path / "lewc" / "lewc.json").read_text())
    assert [la["name"] for la in lewc["layers"]] == ["stem.2", "gate.squeeze", "act", "hidden_act", "head"]


def test_trust_from_the_environment(tmp_path, cli, monkeypatch):
    cfg = write_yaml(tmp_path / "user.yaml", FACTORY)
    _ok(cli("train", "-c", cfg, "--out", tmp_path / "s0", "--device", "cpu"))
    assert_clean_error(cli("evaluate", tmp_path / "s0"), "--trust-code user_models")
    monkeypatch.setenv(lmcx.arch.TRUST_ENV, "other,user_models:small_net")
    assert json.loads(_ok(cli("evaluate", tmp_path / "s0")).out)["accuracy"] >= 0


EXPERIMENT = """
name: outside
{data}model: {model}
train: {{optimizer: adam, lr: 0.001, weight_decay: 0.0, epochs: 1, batch_size: 16, warmup_epochs: 0}}
widths: [1]
seeds: [0, 1]
methods: [wm]
interpolate: {{points: 3, calibrate: true, train_eval_size: 32}}
analyses: {analyses}
lewc: {{lambdas: [0.5], samples: 32}}
device: cpu
"""


@pytest.mark.slow
@pytest.mark.parametrize("data, model, analyses", [
    (SYNTHETIC.format(n=64, shape=[3, 32, 32]), "{arch: torchvision.resnet18}", "[]"),
    (SYNTHETIC.format(n=96, shape=[3, 8, 8]), "{arch: 'user_models:small_net'}", "[svd, lewc]"),
])
def test_lmcx_run_with_an_outside_architecture(tmp_path, cli, data, model, analyses):
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.format(data=data, model=model, analyses=analyses))
    _ok(cli("run", exp, "--out", tmp_path / "out"))  # a factory named by the experiment YAML is trusted for it
    steps = json.loads((tmp_path / "out" / "steps.json").read_text())
    assert {s["status"] for s in steps.values()} == {"done"}, steps
    m = json.loads((tmp_path / "out" / "match" / "w1-s0-s1-wm" / "metrics.json").read_text())
    assert m["l2_after"]["total"] < m["l2_before"]["total"]
    diff, scale = _max_logit_diff(tmp_path / "out" / "train" / "w1-s1",
                                  tmp_path / "out" / "match" / "w1-s0-s1-wm" / "permuted.safetensors")
    assert diff <= 1e-5 * (1 + scale)
    assert "| wm | test |" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# lmcx import


def test_import_round_trips_a_plain_pytorch_state_dict(tmp_path, cli):
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=4)
    with torch.no_grad():  # BN statistics that are not the defaults, as after training
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(plain.state_dict(), tmp_path / "resnet18.pt")
    cfg = write_yaml(tmp_path / "data.yaml", SYNTHETIC.format(n=64, shape=[3, 32, 32]))
    _ok(cli("import", "--arch", "torchvision.resnet18", "--weights", tmp_path / "resnet18.pt", "-c", cfg,
            "--device", "cpu", "--out", tmp_path / "imported"))
    for name in ("model.safetensors", "meta.json", "config.yaml", "metrics.json"):
        assert (tmp_path / "imported" / name).is_file(), name
    evaluated = json.loads(_ok(cli("evaluate", tmp_path / "imported")).out)

    ds = load_dataset(DataConfig(name="synthetic", calib_size=16, synthetic=SyntheticConfig(
        train_size=64, test_size=32, num_classes=4, shape=[3, 32, 32])))
    x = ds.normalize(ds.x_test)
    with torch.no_grad():
        expected = plain.eval()(x)
        logits = build_from_checkpoint(load_checkpoint(tmp_path / "imported")).eval()(x)
    assert torch.equal(logits, expected)
    loss = torch.nn.functional.cross_entropy(expected, ds.y_test).item()
    accuracy = (expected.argmax(1) == ds.y_test).float().mean().item()
    assert evaluated["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert evaluated["loss"] == pytest.approx(loss, rel=1e-6)
    metrics = json.loads((tmp_path / "imported" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == evaluated["accuracy"]


def _mlp_state():
    return build_model(ModelConfig(arch="mlp", width=1 / 64, norm="bn"), (1, 8, 8), 10).state_dict()


def _import(cli, tmp_path, weights, *extra):
    return cli("import", "--arch", "mlp", "--width", 1 / 64, "--set", "model.norm=bn", "--weights", weights,
               "--data", "digits", "--out", tmp_path / "out", *extra)


@pytest.mark.parametrize("edit, fragments", [
    (lambda s: {k: v for k, v in s.items() if not k.startswith("layers.1.")},
     ["does not fit mlp", "6 missing: layers.1.linear.weight, layers.1.linear.bias, layers.1.norm.weight and 3 more"]),
    (lambda s: {**s, "extra.weight": torch.zeros(2)}, ["1 unexpected: extra.weight"]),
    (lambda s: {**s, "classifier.weight": torch.zeros(3, 8)},
     ["1 of another shape: classifier.weight (3, 8) (the model has (10, 8))"]),
    (lambda s: {**s, "classifier.bias": torch.full((10,), float("nan"))}, ["non-finite", "classifier.bias"]),
    (lambda s: {"module." + k: v for k, v in s.items()}, ["missing", "unexpected: module.", "--strip-prefix"]),
])
def test_import_refuses_weights_that_do_not_fit(tmp_path, cli, edit, fragments):
    torch.save(edit(_mlp_state()), tmp_path / "w.pt")
    assert_clean_error(_import(cli, tmp_path, tmp_path / "w.pt"), *fragments)
    assert not (tmp_path / "out" / "metrics.json").exists()


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_import_reads_state_dicts_only(tmp_path, cli):
    state = _mlp_state()
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    assert_clean_error(_import(cli, tmp_path, tmp_path / "ckpt.pt"), "--key state_dict")
    _ok(_import(cli, tmp_path, tmp_path / "ckpt.pt", "--key", "state_dict", "--strip-prefix", "module."))
    assert torch.equal(load_checkpoint(tmp_path / "out").state["classifier.weight"], state["classifier.weight"])
    torch.save({**state, "payload": Payload()}, tmp_path / "evil.pt")
    refused = _import(cli, tmp_path, tmp_path / "evil.pt", "--force")
    assert_clean_error(refused, "refused to load", "could run code")
    assert "must never run" not in refused.out + refused.err
    assert_clean_error(_import(cli, tmp_path, tmp_path / "w.onnx", "--force"), "does not exist")
    (tmp_path / "w.onnx").write_bytes(b"x")
    assert_clean_error(_import(cli, tmp_path, tmp_path / "w.onnx", "--force"), ".safetensors or a PyTorch state dict")
