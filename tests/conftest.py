"""Shared fixtures. Tests run on tiny synthetic or bundled data, one thread per process (small ops are
faster that way, and it keeps parallel test processes from oversubscribing a 2-core CI machine)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's cache or data folders."""
    monkeypatch.setenv("LMCX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("LMCX_DATA_ROOT", str(tmp_path_factory.getbasetemp() / "data"))


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `lmcx ARGS...` in-process; returns exit code and captured output."""
    from lmcx.cli import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["lmcx", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def assert_clean_error(result: CliResult, *fragments: str) -> None:
    """One error line, exit code 2, no traceback, naming what is wrong."""
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SYNTHETIC_TRAIN = """
data:
  name: synthetic
  calib_size: 64
  synthetic: {train_size: 512, test_size: 128, num_classes: 4, shape: [1, 8, 8]}
model: {arch: mlp, width: 0.25, norm: none}
train: {optimizer: adam, lr: 0.003, weight_decay: 0.0, epochs: 3, batch_size: 64, warmup_epochs: 0}
seed: 0
"""


@pytest.fixture
def synthetic_config(tmp_path) -> Path:
    return write_yaml(tmp_path / "synthetic.yaml", SYNTHETIC_TRAIN)
