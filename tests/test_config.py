"""Typed YAML configs: defaults, overrides, and errors that name the key path and the file."""
import pytest

from lmcx.config import TrainJob, load_config, parse_override, to_dict
from lmcx.errors import LmcxError
from conftest import write_yaml


def test_yaml_then_overrides_in_order(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", "model: {width: 2}\ntrain: {lr: 0.1}\n")
    job = load_config(TrainJob, path, [parse_override("train.lr=1e-3"), parse_override("model.norm=ln")])
    assert job.model.width == 2.0 and isinstance(job.model.width, float)
    assert job.train.lr == 1e-3 and job.model.norm == "ln"
    assert job.train.epochs == TrainJob().train.epochs  # untouched default
    assert to_dict(job)["model"]["width"] == 2.0


@pytest.mark.parametrize("text, fragments", [
    ("model: {widht: 2}\n", ["model.widht", "unknown setting", "width"]),
    ("train: {lr: fast}\n", ["train.lr", "expected a number"]),
    ("train: {epochs: 2.5}\n", ["train.epochs", "integer"]),
    ("model: {width: 0}\n", ["model.width", "> 0"]),
    ("model: {arch: transformer}\n", ["model.arch", "resnet20", "torchvision.<name>", "module:callable"]),
    ("data: {name: imagenet}\n", ["data.name", "'cifar10'"]),
    ("train: {batch_size: -1}\n", ["train.batch_size"]),
    ("model: 3\n", ["model", "mapping"]),
    ("", ["empty"]),
    ("- a\n- b\n", ["mapping"]),
    ("model: {width: [\n", ["not valid YAML", "line"]),
])
def test_bad_config_names_key_and_file(tmp_path, text, fragments):
    path = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(LmcxError) as err:
        load_config(TrainJob, path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("cls_name", ["TrainJob", "ExperimentConfig"])
def test_device_is_checked_where_it_is_set(tmp_path, cls_name):
    """An unknown device stops the command before any work, a whole experiment's too (its dry run once
    planned every step for `device: tpu`; found by test_config_fuzz)."""
    import lmcx.config as config

    path = write_yaml(tmp_path / "bad.yaml", "widths: [1]\nseeds: [0, 1]\ndevice: tpu\n" if cls_name == "ExperimentConfig"
                      else "device: tpu\n")
    with pytest.raises(LmcxError, match="device: must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        load_config(getattr(config, cls_name), path)


def test_override_syntax():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("x=true") == {"x": True}
    with pytest.raises(LmcxError, match="KEY=VALUE"):
        parse_override("train.lr")
    with pytest.raises(LmcxError, match="dotted"):
        parse_override("a..b=1")


def test_missing_config_file(tmp_path):
    with pytest.raises(LmcxError, match="does not exist"):
        load_config(TrainJob, tmp_path / "nope.yaml")


def test_shipped_configs_validate():
    """Every YAML in configs/ loads: experiment files (they list widths) as experiments, others as train jobs."""
    from conftest import REPO
    from lmcx.config import ExperimentConfig, read_yaml

    paths = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        load_config(ExperimentConfig if "widths" in read_yaml(path) else TrainJob, path)
