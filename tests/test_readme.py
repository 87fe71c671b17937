"""The README's Python API snippet runs as written (on two small digits MLPs in runs/s0 and runs/s1), and
every README example either runs as written or is listed with its reason in scripts/readme_examples.py
(which runs them all: see README, Development)."""
import importlib.util
import re

import pytest

from conftest import REPO
from lmcx.config import TrainJob, load_config
from lmcx.train import train

README = (REPO / "README.md").read_text()


def _examples_script():
    spec = importlib.util.spec_from_file_location("readme_examples", REPO / "scripts" / "readme_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        train(load_config(TrainJob, REPO / "configs" / "digits_mlp.yaml",
                          [{"train": {"epochs": 3}, "model": {"width": 0.25}, "seed": seed, "device": "cpu"}]),
              f"runs/s{seed}")
    section = README[README.index("## Python API"):README.index("## Outputs")]
    [snippet] = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)
    exec(compile(snippet, "README.md (Python API)", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert re.search(r"^L2 to A: [\d.]+ -> [\d.]+$", out, re.M)
    assert re.search(r"^naive -?[\d.e-]+ -?[\d.e-]+$", out, re.M) and re.search(r"^wm ", out, re.M)
    for made in ("api/wm/permuted.safetensors", "api/curve/barrier.json", "api/curve/curve.png", "api/calibrated.png"):
        assert (tmp_path / "runs" / made).is_file(), made


def test_every_substitution_names_a_readme_line():
    script = _examples_script()
    commands = {command for _, command in script.readme_examples(README)}
    assert set(script.SUBSTITUTES) <= commands, set(script.SUBSTITUTES) - commands
    assert any(kind == "python" for kind, _ in script.readme_examples(README))
