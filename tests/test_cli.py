"""CLI surface: version, help, and bad input -> one clear line, exit code 2, no traceback."""
import pytest

from conftest import assert_clean_error, write_yaml


def test_version_and_help(cli):
    result = cli("--version")
    assert result.code == 0 and result.out.startswith("lmcx ")
    result = cli("--help")
    assert result.code == 0
    for command in ("train", "match", "interpolate", "calibrate", "analyze-svd", "lewc", "evaluate"):
        assert command in result.out


@pytest.mark.parametrize("args, fragments", [
    (["--set", "model.depth=3"], ["model.depth", "unknown setting"]),
    (["--set", "train.epochs=many"], ["train.epochs", "integer"]),
    (["--width", "0"], ["model.width", "> 0"]),
    (["--width", "abc"], ["--width"]),
    (["--dataset", "imagenet"], ["data.name", "imagenet"]),
    (["--arch", "transformer"], ["model.arch", "transformer"]),
    (["--dataset", "mnist"], ["mnist not found", "download=true"]),
    (["--set", "train.batch_size=100000"], ["batch_size", "larger than the training set"]),
    (["--device", "tpu"], ["device"]),
    (["--nonsense"], ["--nonsense"]),
])
def test_train_bad_input(tmp_path, cli, args, fragments):
    result = cli("train", "--out", tmp_path / "run", "--set", "data.calib_size=10", *args)
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_config_file_names_file_and_key(tmp_path, cli):
    path = write_yaml(tmp_path / "bad.yaml", "train:\n  lr: 0.1\n  optimiser: sgd\n")
    assert_clean_error(cli("train", "-c", path), str(path), "train.optimiser")


def _empty_dir(p):
    (p / "empty_dir").mkdir()
    return p / "empty_dir"


def _junk_file(p):
    (p / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    return p / "junk.safetensors"


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing.safetensors", "does not exist"),
    (_empty_dir, "directory without model.safetensors"),
    (_junk_file, "not a readable safetensors checkpoint"),
])
def test_unreadable_checkpoint(tmp_path, cli, make, fragment):
    assert_clean_error(cli("evaluate", make(tmp_path)), fragment)


def test_evaluate_prints_metrics(tmp_path, synthetic_config, cli):
    import json

    assert cli("train", "-c", synthetic_config, "--out", tmp_path / "run").code == 0
    result = cli("evaluate", tmp_path / "run", "--split", "calib")
    assert result.code == 0
    assert 0 <= json.loads(result.out)["accuracy"] <= 1
