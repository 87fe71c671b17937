"""Progress output: plain lines on a non-terminal at a fixed cadence, nothing with --quiet, lazy fields."""
from __future__ import annotations

import pytest

from lmcx import progress
from lmcx.console import QUIET_ENV, set_quiet


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress, "clock", fake)
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    monkeypatch.delenv(QUIET_ENV, raising=False)
    set_quiet(False)
    return fake


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_plain_lines_first_within_5s_then_every_10s(clock, capsys):
    shown = []
    with progress.task("match wm", total=100, unit="sweep") as t:
        for i in range(100):
            clock.now += 0.5  # one step every half second: 50 s in all
            t.advance(1, objective=lambda i=i: shown.append(i) or 0.25 * i)
    captured = capsys.readouterr()
    assert captured.out == ""  # progress never goes to stdout
    out = lines(captured.err)
    # first line at 5 s (step 10), then at 15, 25, 35, 45 s, and a closing line
    assert len(out) == 6, out
    assert out[0].startswith("match wm: 10/100 sweep (10%), 2 sweep/s, eta 0:45, objective 2.25")
    assert out[1].startswith("match wm: 30/100 sweep (30%)") and out[4].startswith("match wm: 90/100")
    assert out[-1].startswith("match wm: 100/100 sweep (100%)") and out[-1].endswith("[0:50] done")
    assert all("\x1b" not in line for line in out)  # plain text, no terminal escapes
    assert shown == [9, 29, 49, 69, 89, 99]  # fields are evaluated only when a line is printed


def test_short_tasks_print_nothing(clock, capsys):
    with progress.task("interpolate", total=3) as t:
        for _ in range(3):
            clock.now += 1
            t.advance()
    assert capsys.readouterr().err == ""


def test_interval_from_the_environment(clock, capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "2")
    with progress.task("svd layers") as t:  # no total: count and rate, no percentage or eta
        for _ in range(7):
            clock.now += 1
            t.advance()
    out = lines(capsys.readouterr().err)
    assert [line.split(":")[1].split()[0] for line in out] == ["2", "4", "6", "7"], out
    assert "%" not in out[0] and "eta" not in out[0]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_quiet_silences_lines_and_logs(clock, capsys, monkeypatch, how):
    if how == "flag":
        set_quiet(True)
    else:
        monkeypatch.setenv(QUIET_ENV, "1")
    try:
        with progress.task("train", total=10) as t:
            for _ in range(10):
                clock.now += 10
                t.advance(loss=lambda: pytest.fail("a quiet task evaluates no field"))
            t.log("epoch 1/1")
    finally:
        set_quiet(False)
    assert capsys.readouterr().err == ""


def test_training_progress_in_a_log_and_quiet(cli, synthetic_config, tmp_path, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # a line at every batch
    result = cli("train", "-c", synthetic_config, "--out", tmp_path / "a")
    assert result.code == 0 and result.out == "", result.err
    batch_lines = [line for line in lines(result.err) if line.startswith("train a: ")]
    # 3 epochs x 7 batches (448 images after the calibration split), one line while each epoch's test set is
    # evaluated (progress.tick in the evaluation batches), and the closing line
    assert len(batch_lines) == 21 + 3 + 1
    assert all(f in batch_lines[0] for f in ("1/21 batch", "epoch 1/3", "batch 1/7", "loss ", "acc ", "img/s "))
    assert any(line.startswith("a epoch 3/3: loss ") for line in lines(result.err))
    for f in (tmp_path / "a").iterdir():
        if f.suffix in (".json", ".csv", ".yaml"):
            assert "batch/s" not in f.read_text()  # progress never goes into result files
    quiet = cli("--quiet", "train", "-c", synthetic_config, "--out", tmp_path / "b")
    assert quiet.code == 0 and len(lines(quiet.err)) == 1  # the result line alone
    assert lines(quiet.err)[0].startswith(f"{tmp_path / 'b'}: test accuracy")


def test_interpolation_shows_a_line_within_5s_then_at_most_every_15s(clock, capsys):
    """A λ of a curve takes 16 s here (a REPAIR pass and the evaluation, 2 s per forward pass of the fake
    clock): the lines must still come from inside it, from the norm fix and the evaluation batches."""
    import re

    from lmcx.config import DataConfig, ModelConfig, SyntheticConfig
    from lmcx.data import load_dataset
    from lmcx.interpolate import evaluate_curves
    from lmcx.models import build_model

    ds = load_dataset(DataConfig(name="synthetic", calib_size=16, synthetic=SyntheticConfig(
        train_size=256, test_size=64, num_classes=4, shape=[1, 8, 8])))
    cfg = ModelConfig(arch="mlp", width=0.125, norm="none")
    a, b = (build_model(cfg, ds.in_shape, 4).eval() for _ in range(2))

    def work(*_):
        clock.now += 2.0

    a.register_forward_hook(work)
    b.register_forward_hook(work)
    evaluate_curves(a, {"wm": b}, ds, [0.0, 0.25, 0.5, 0.75, 1.0], "repair", {"test": (ds.x_test, ds.y_test)},
                    norm_fix_batches=4, norm_fix_batch_size=32, eval_batch_size=16)
    captured = capsys.readouterr()
    out = [line for line in lines(captured.err) if line.startswith("interpolate: ")]
    assert captured.out == "" and out and out[-1].endswith(" done") and "5/5 λ (100%)" in out[-1]
    seconds = [60 * int(m) + int(s) for m, s in (re.search(r"\[(\d+):(\d\d)\]", line).groups() for line in out)]
    assert 5 <= seconds[0] <= 7  # the first line once 5 s have passed (at the next forward pass)
    assert all(later - earlier <= 15 for earlier, later in zip(seconds, seconds[1:])), seconds
    assert any("stage norm fix (repair)" in line for line in out) and any("stage evaluate" in line for line in out)


@pytest.mark.parametrize("shown", [True, False])
def test_ste_steps_on_the_progress_display(clock, capsys, monkeypatch, shown):
    from lmcx.config import DataConfig, ModelConfig, SteConfig, SyntheticConfig
    from lmcx.data import load_dataset
    from lmcx.models import build_model, permutation_spec
    from lmcx.permutation import straight_through_estimator

    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    ds = load_dataset(DataConfig(name="synthetic", calib_size=16, synthetic=SyntheticConfig(
        train_size=144, test_size=16, num_classes=4, shape=[1, 6, 6])))
    cfg = ModelConfig(arch="mlp", width=0.0625, norm="none")
    a, b = (build_model(cfg, ds.in_shape, 4) for _ in range(2))
    r = straight_through_estimator(permutation_spec(cfg, ds.in_shape, 4), a, b, ds,
                                   SteConfig(epochs=1, batch_size=64, eval_samples=64), progress=shown)
    out = [line for line in lines(capsys.readouterr().err) if line.startswith("ste: ")]
    if not shown:
        assert out == []
        return
    assert f"{r.steps}/{r.steps} step (100%)" in out[-1] and out[-1].endswith(" done")
    assert any("epoch 1/1" in line and "loss " in line and "best " in line for line in out)
