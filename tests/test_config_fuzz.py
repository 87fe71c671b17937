"""Random configs fed to the CLI (hypothesis): the only outcomes allowed are success, or one `error:` line with
exit code 2 (1 for a run that diverged) — never a traceback.

A config is a nested dict drawn in one of three modes:
  valid          known keys (a random subset) with valid values: most of these runs train;
  one bad value  the same, with one key (or a whole section) set to a value that must be refused, or one
                 junk key added: the command must fail, with one error line;
  chaos          known keys with values of random types, junk keys, junk in place of whole sections.
It is written as YAML and passed to `lmcx train -c` (runs stay tiny: every size draws from a small range or
from values validation must refuse; keys the dict leaves out fall back to BASE, a tiny synthetic job) and to
`lmcx run --dry-run` (plans only). A third test feeds the configs of match, interpolate, analyze-svd and
lewc to `load_config`, the code path each of those subcommands starts with.
"""
from __future__ import annotations

import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st

from lmcx.config import InterpolateConfig, LewcConfig, MatchConfig, SvdConfig, load_config
from lmcx.errors import LmcxError

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# `lmcx train` examples cost ~0.1 s each (a third of them train): half as many, new ones on every run
FUZZ_TRAIN = settings(FUZZ, max_examples=100)

NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
NOT_NUMBER = st.one_of(st.none(), st.booleans(), st.text(max_size=6), st.lists(st.integers(-2, 3), max_size=3),
                       st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2))
NOT_INT = st.one_of(NOT_NUMBER, st.floats(allow_nan=True, allow_infinity=True))  # YAML keeps 3.0 a float: refused
NOT_LIST = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.integers(-3, 3),
                     st.dictionaries(st.text(max_size=3), st.integers(-2, 2), max_size=2))
NOT_DICT = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.integers(-3, 3),
                     st.lists(st.integers(-2, 2), max_size=2))
NOT_BOOL = st.one_of(st.none(), st.integers(-2, 2), st.text(max_size=4), st.lists(st.booleans(), max_size=2))
NOT_STR = st.one_of(st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.lists(st.text(max_size=2),
                                                                                           max_size=2))
ANY = st.one_of(NOT_NUMBER, st.integers(-10 ** 6, 10 ** 6), st.integers(), st.floats(allow_nan=True,
                                                                                  allow_infinity=True))
JUNK_KEY = st.text(string.ascii_lowercase + "_.\n\x1e", min_size=1, max_size=8).filter(lambda k: len(k) > 3)


def F(valid: st.SearchStrategy, bad: st.SearchStrategy) -> tuple:
    """One setting: values that must be accepted, values that must be refused."""
    return valid, bad


def ints(lo, hi, min_ok, max_ok=None) -> tuple:
    """An integer setting drawn from [lo, hi]; validation accepts [min_ok, max_ok]: below, above, or not an
    integer is refused."""
    bad = [st.integers(min_ok - 3, min_ok - 1), NOT_INT]
    if max_ok is not None:
        bad.append(st.integers(max_ok + 1, max_ok * 2 ** 40))
    return F(st.integers(lo, hi), st.one_of(*bad))


def floats(lo, hi, bad) -> tuple:
    return F(st.floats(lo, hi), st.one_of(bad, NON_FINITE, NOT_NUMBER))


def choice(*values, bad=("?",)) -> tuple:
    text = st.text(string.ascii_lowercase + "-", max_size=8).filter(lambda v: v not in values)
    return F(st.sampled_from(values), st.one_of(text, NOT_STR, st.sampled_from(bad)))


def flag() -> tuple:
    return F(st.booleans(), NOT_BOOL)


SEED = ints(0, 2 ** 32 - 1, 0, 2 ** 32 - 1)
DATA = {
    "name": F(st.sampled_from(["synthetic", "synthetic", "synthetic", "digits"]),
              st.one_of(st.sampled_from(["mnist", "cifar10", "cifar100", "fashion-mnist", "imagefolder", "imagenet"]),
                        NOT_STR)),  # torchvision sets and image folders are absent here: refused as missing
    "root": F(st.one_of(st.none(), st.sampled_from(["nowhere", "/nonexistent/data"])), NOT_STR),
    "path": F(st.none(), NOT_STR),
    "download": F(st.just(False), NOT_BOOL),  # never true: no network in tests
    "calib_size": F(st.one_of(st.none(), st.integers(0, 48)), st.one_of(  # null: the dataset's default
        st.integers(-3, -1), NOT_INT.filter(lambda v: v is not None))),
    "train_size": F(st.one_of(st.none(), st.integers(64, 400)), st.one_of(
        st.integers(-3, 0), NOT_INT.filter(lambda v: v is not None))),
    # `standard` is valid only for the torchvision sets (test_data checks that rule): neither drawn nor refused here
    "normalization": F(st.just("train"), st.one_of(
        st.text(string.ascii_lowercase, max_size=8).filter(lambda v: v not in ("train", "standard")), NOT_STR)),
    "augment": flag(), "crop_padding": ints(0, 4, 0),
    "synthetic": {"train_size": ints(128, 300, 1), "test_size": ints(1, 100, 1), "num_classes": ints(2, 8, 2),
                  "shape": F(st.tuples(st.integers(1, 3), st.integers(1, 10), st.integers(1, 10)).map(list),
                             st.one_of(st.lists(st.integers(-1, 0), min_size=3, max_size=3),
                                       st.lists(st.integers(1, 4), min_size=0, max_size=2), NOT_LIST)),
                  "seed": SEED},
}
MODEL = {"arch": choice("mlp", "mlp", "vgg11", "vgg16", "resnet20", bad=("transformer",)),
         "width": F(st.floats(0.01, 0.5), st.one_of(st.floats(-2, 0), NON_FINITE, st.just("1e400"), NOT_NUMBER)),
         "norm": choice("bn", "ln", "none"), "bias": flag()}
TRAIN = {"optimizer": choice("sgd", "adam", "adamw"),
         "lr": F(st.one_of(st.floats(1e-4, 0.1), st.sampled_from([1e3, 1e30])),  # these two may diverge: exit 1
                 st.one_of(st.floats(-1, 0), NON_FINITE, NOT_NUMBER)),
         "momentum": floats(0, 0.99, st.one_of(st.floats(1, 5), st.floats(-5, -1e-6))),
         "nesterov": flag(), "weight_decay": floats(0, 0.01, st.floats(-1, -1e-9)),
         "schedule": choice("linear", "cosine", "constant"),
         "warmup_epochs": floats(0, 2, st.floats(-5, -1e-6)), "epochs": ints(1, 2, 1),
         "batch_size": F(st.one_of(st.integers(16, 128), st.just(10 ** 7)), st.one_of(st.integers(-2, 0), NOT_INT)),
         "eval_batch_size": ints(1, 10 ** 6, 1), "eval_every": ints(1, 3, 1),
         "label_smoothing": floats(0, 0.5, st.one_of(st.floats(1, 3), st.floats(-1, -1e-6))),
         "grad_clip": F(st.one_of(st.none(), st.floats(0.1, 10)), st.one_of(st.floats(-1, 0), NON_FINITE,
                                                                             NOT_NUMBER.filter(lambda v: v is not None))),
         "precision": choice("auto", "fp32", "bf16"),
         "compile": F(st.just(False), NOT_BOOL)}  # never true: torch.compile takes minutes on CPU
TRAIN_JOB = {"data": DATA, "model": MODEL, "train": TRAIN, "seed": SEED,
             "device": F(st.sampled_from(["cpu", "auto"]), st.one_of(st.sampled_from(["tpu", "gpu", "cuda:x"]),
                                                                     NOT_STR))}  # refused with or without a GPU

# Small, valid, fast: what every key the random dict leaves out falls back to.
BASE = {"data": {"name": "synthetic", "calib_size": 32,
                 "synthetic": {"train_size": 192, "test_size": 64, "num_classes": 3, "shape": [1, 6, 6]}},
        "model": {"arch": "mlp", "width": 0.125, "norm": "none"},
        "train": {"optimizer": "adam", "lr": 0.01, "epochs": 1, "batch_size": 64, "warmup_epochs": 0},
        "device": "cpu"}


def valid_dicts(spec: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={k: valid_dicts(v) if isinstance(v, dict) else v[0]
                                               for k, v in spec.items()})


def chaos(spec: dict) -> st.SearchStrategy:
    """Any subset of the keys with values of any kind, sometimes junk keys, sometimes junk for the section."""
    known = st.fixed_dictionaries({}, optional={k: chaos(v) if isinstance(v, dict) else st.one_of(v[0], v[1], ANY)
                                                for k, v in spec.items()})
    junk = st.tuples(known, st.dictionaries(JUNK_KEY, ANY, min_size=1, max_size=2)).map(lambda t: {**t[0], **t[1]})
    return st.one_of(known, known, known, junk, NOT_NUMBER)


def paths(spec: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in spec.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += paths(v, prefix + (k,))
    return out


@st.composite
def configs(draw, spec: dict):
    """(mode, config dict): see the module docstring."""
    mode = draw(st.sampled_from(["valid", "one bad value", "chaos"]))
    if mode == "chaos":
        return mode, draw(chaos(spec))
    config = draw(valid_dicts(spec))
    if mode == "one bad value":
        path = draw(st.sampled_from(paths(spec)))
        node = spec
        for k in path:
            node = node[k]
        if isinstance(node, dict):  # a whole section: not a mapping, or a mapping with an unknown key
            bad = draw(st.one_of(NOT_DICT, st.dictionaries(JUNK_KEY, ANY, min_size=1, max_size=1)))
        else:
            bad = draw(node[1])
        target = config
        for k in path[:-1]:
            if not isinstance(target.get(k), dict):
                target[k] = {}
            target = target[k]
        target[path[-1]] = bad
    return mode, config


def merge(base, update):
    if not isinstance(update, dict):
        return update
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in update.items():
        out[k] = merge(out.get(k), v) if isinstance(v, dict) else v
    return out


def check_outcome(result, mode: str, allow_diverged: bool = False) -> None:
    event(f"{mode}: exit code {result.code}")  # pytest --hypothesis-show-statistics shows the mix
    assert "Traceback" not in result.err, result.err
    lines = [line for line in result.err.strip().split("\n") if line.strip()]
    if result.code == 0:
        assert mode != "one bad value", f"a value that must be refused was accepted:\n{result.err}"
        assert not any(line.startswith("error:") for line in lines), result.err
        return
    assert result.code == 2 or (allow_diverged and result.code == 1), (result.code, result.err)
    assert lines and lines[-1].startswith("error: "), result.err
    assert all(" epoch " in line for line in lines[:-1]), result.err  # before it, only per-epoch log lines
    if result.code == 1:
        assert "training diverged" in lines[-1], result.err


@FUZZ_TRAIN
@given(drawn=configs(TRAIN_JOB))
def test_random_train_configs(cli, drawn):
    mode, config = drawn
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(merge(BASE, config)))
        result = cli("train", "-c", path, "--out", Path(tmp) / "run")
        check_outcome(result, mode, allow_diverged=True)
        assert (result.code == 0) == (Path(tmp) / "run" / "metrics.json").is_file(), result.err


WIDTHS = F(st.lists(st.floats(0.1, 4), min_size=1, max_size=3, unique=True),
           st.one_of(st.just([]), st.lists(st.floats(-2, 0), min_size=1, max_size=2), st.lists(NON_FINITE, min_size=1,
                                                                                            max_size=1), NOT_LIST))
SEEDS = F(st.lists(st.integers(0, 6), min_size=2, max_size=4, unique=True),
          st.one_of(st.lists(st.integers(0, 6), max_size=1), st.just([1, 1]), st.just([0, -1]), st.just([0, 2 ** 40]),
                    NOT_LIST))
EXPERIMENT = {
    "name": F(st.text(string.ascii_lowercase, min_size=1, max_size=6), st.one_of(st.just(""), st.just("a/b"), NOT_STR)),
    # a dry run reads no data: a dataset missing from disk is not refused, only an unknown name
    "data": {**DATA, "name": F(st.sampled_from(["synthetic", "digits", "mnist", "cifar10", "imagefolder"]),
                               st.one_of(st.just("imagenet"), NOT_STR))},
    "model": MODEL, "train": TRAIN, "widths": WIDTHS, "seeds": SEEDS,
    "pairs": F(st.sampled_from(["all", "consecutive"]),
               st.one_of(st.text(max_size=4).filter(lambda v: v not in ("all", "consecutive")),
                         st.sampled_from([[], [[0, 0]], [[0, 99]], [[0]], [[0, 1, 2]], [0, 1], [["0", 1]]]),
                         NOT_LIST.filter(lambda v: not isinstance(v, str)))),
    "methods": F(st.lists(st.sampled_from(["wm", "am", "ste"]), max_size=3, unique=True),
                 st.one_of(st.lists(st.text(max_size=3).filter(lambda m: m not in ("wm", "am", "ste")), min_size=1,
                                    max_size=2), NOT_LIST, st.lists(st.integers(), min_size=1, max_size=2))),
    "analyses": F(st.lists(st.sampled_from(["svd", "lewc"]), max_size=2, unique=True),
                  st.lists(st.sampled_from(["pca", "cka", ""]), min_size=1, max_size=2)),
    "match": {"method": choice("wm", "am", "ste"), "seed": SEED, "max_iter": ints(1, 100, 1),
              "am_samples": ints(1, 5000, 1), "many": choice("anchor", "merge-many"),
              "ste": {"epochs": ints(1, 3, 1), "lr": floats(1e-4, 1, st.floats(-1, 0)), "batch_size": ints(1, 500, 1),
                      "eval_every": ints(0, 10, 0)}},
    "interpolate": {"points": ints(2, 50, 2), "norm_fix": choice("auto", "reset", "repair", "none"),
                    "lambdas": F(st.one_of(st.none(), st.lists(st.floats(0, 1), min_size=2, max_size=5)),
                                 st.one_of(st.lists(st.floats(1.001, 3), min_size=2, max_size=3),
                                           st.lists(st.floats(0, 1), max_size=1), st.lists(NON_FINITE, min_size=2,
                                                                                          max_size=2))),
                    "calibrate": flag(), "train_eval_size": ints(1, 5000, 1), "precision": choice("auto", "fp32", "bf16")},
    "svd": {"gammas": F(st.lists(st.floats(0, 1), min_size=1, max_size=3),
                        st.one_of(st.just([]), st.lists(st.floats(1.01, 5), min_size=1, max_size=2))),
            "weighted": flag(), "wm_seed": SEED},
    "lewc": {"lambdas": F(st.lists(st.floats(0, 1), min_size=1, max_size=3),
                          st.one_of(st.just([]), st.lists(st.floats(-3, -0.01), min_size=1, max_size=2))),
             "samples": ints(1, 1000, 1), "batch_size": ints(1, 500, 1)},
    "device": F(st.sampled_from(["cpu", "auto", "cuda"]), st.one_of(st.sampled_from(["tpu", "gpu"]), NOT_STR)),
}
EXPERIMENT_BASE = {"name": "fuzz", "widths": [0.25], "seeds": [0, 1], "data": BASE["data"], "model": BASE["model"],
                   "train": BASE["train"], "analyses": []}


@FUZZ
@given(drawn=configs(EXPERIMENT))
def test_random_experiment_configs_dry_run(cli, drawn):
    mode, config = drawn
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experiment.yaml"
        path.write_text(yaml.safe_dump(merge(EXPERIMENT_BASE, config)))
        result = cli("run", path, "--dry-run", "--out", Path(tmp) / "out")
        check_outcome(result, mode)
        assert not (Path(tmp) / "out").exists()  # a dry run writes nothing


SUBCOMMAND_CONFIGS = {MatchConfig: EXPERIMENT["match"], InterpolateConfig: EXPERIMENT["interpolate"],
                      SvdConfig: EXPERIMENT["svd"], LewcConfig: EXPERIMENT["lewc"]}


@FUZZ
@given(data=st.data())
def test_random_subcommand_configs_load_or_fail_cleanly(tmp_path, data):
    """match / interpolate / analyze-svd / lewc: `load_config` either validates or raises LmcxError, which the
    CLI prints as one line (their own tests check that with `assert_clean_error`)."""
    cls = data.draw(st.sampled_from(list(SUBCOMMAND_CONFIGS)))
    mode, config = data.draw(configs(SUBCOMMAND_CONFIGS[cls]))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        load_config(cls, path)
    except LmcxError as e:
        event(f"{mode}: refused")
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        event(f"{mode}: accepted")
        assert mode != "one bad value", config
