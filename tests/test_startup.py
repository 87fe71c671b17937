"""Start-up: help and bad configs answer without importing torch (the time it takes is measured by
scripts/bench_startup.py, not here); every subcommand's help shows each option's default and has an
example, and every --set example names a key of that command's own config."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from lmcx.cli import app
from lmcx.config import ExperimentConfig, InterpolateConfig, LewcConfig, MatchConfig, SvdConfig, TrainJob, load_config, \
    parse_override

PROBE = """
import sys
sys.argv = ["lmcx", *sys.argv[1:]]
try:
    from lmcx.cli import main
    main()
except SystemExit as e:
    print("exit", e.code, file=sys.stderr)
print("torch loaded:", "torch" in sys.modules, file=sys.stderr)
"""
CONFIGS = {"train": TrainJob, "match": MatchConfig, "interpolate": InterpolateConfig, "analyze-svd": SvdConfig,
           "lewc": LewcConfig, "run": ExperimentConfig}


def _probe(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    return done.stderr


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["run", "--help"]])
def test_help_does_not_import_torch(args):
    err = _probe(*args)
    assert "exit 0" in err and "torch loaded: False" in err, err


def test_config_errors_do_not_import_torch(tmp_path):
    (tmp_path / "broken.yaml").write_text("train: {lr: [\n")
    (tmp_path / "unknown.yaml").write_text("train: {nope: 1}\n")
    for args in (["train", "-c", str(tmp_path / "broken.yaml")], ["run", str(tmp_path / "unknown.yaml")],
                 ["interpolate", "--a", "x", "--b", "y", "--set", "points=0"],
                 ["import", "--weights", "w.pt", "--set", "model.width=0"]):
        err = _probe(*args)
        assert "error: " in err and "exit 2" in err and "torch loaded: False" in err, (args, err)


def _commands():
    import typer.main

    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in group.commands}


def test_every_option_shows_a_default_and_every_command_an_example():
    for name, command in _commands().items():
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help" or param.required:
                continue
            shown = param.show_default if isinstance(param.show_default, str) else param.default
            assert shown not in (None, ""), f"lmcx {name} {param.opts[0]} shows no default"
        examples = [line.strip() for line in (command.help or "").splitlines() if line.strip().startswith("lmcx ")]
        assert examples and all(e.split()[1] == name for e in examples), f"lmcx {name}: no example of itself"
        assert all(len(e) <= 78 for e in examples), f"lmcx {name}: an example wider than a terminal"


def test_set_examples_are_keys_of_the_commands_config():
    for name, cls in CONFIGS.items():
        option = next(p for p in _commands()[name].params if p.name == "set_")
        example = re.search(r"--set (\S+?)\.?$", option.help)[1]
        overrides = [parse_override(example)]
        if cls is ExperimentConfig:
            overrides.append({"widths": [1], "seeds": [0, 1]})
        load_config(cls, None, overrides)  # raises for a key the command does not have
