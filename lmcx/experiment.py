"""`lmcx run`: one experiment from one YAML, as a plan of ordinary steps.

Each step (train, match, interpolate, svd, lewc) is the library call behind a subcommand, writing its
own run directory in the experiment's folder (layout.py describes it). A step whose directory is
complete is skipped, so re-running an experiment, or adding a width or seed to its YAML, runs only what
is new; an interrupted run continues where it stopped (training resumes from its last epoch). A failed
step is recorded with its reason and the steps that need it are skipped; the rest of the sweep goes on.
"""
from __future__ import annotations

import itertools
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from . import progress
from .config import ExperimentConfig, TrainJob, to_dict
from .console import console
from .errors import LmcxError
from .io import write_json, write_yaml
from .layout import (EXPERIMENT_FILE, STEPS_FILE, experiment_dir, pair_dir, seed_pairs, three_dir,
                     train_dir, width_tag)
from .rundir import INPUT_PATH_KEYS, check_settings, claim, is_complete, run_once
from .threads import thread_info


@dataclass
class Step:
    kind: str
    name: str  # unique, also the directory name below `kind`'s folder
    out: Path
    marker: str
    settings: dict[str, Any]
    action: Callable[[], Any]
    needs: list["Step"] = field(default_factory=list)
    keep: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


def plan(cfg: ExperimentConfig) -> list[Step]:
    """Every step of the experiment, in an order that respects what each needs."""
    from .arch import trust_named
    from .train import STATE_FILE, train

    trust_named(cfg.model.arch)  # the YAML names the model: its later steps read checkpoints of it
    root = experiment_dir(cfg)
    steps: dict[str, Step] = {}

    def add(step: Step) -> Step:
        return steps.setdefault(str(step.out), step)

    def model_path(step: Step) -> Path:
        return step.out / "model.safetensors"

    def permuted_path(step: Step) -> Path:
        return step.out / "permuted.safetensors"

    for width in cfg.widths:
        w = width_tag(width)
        trained: dict[int, Step] = {}
        for seed in cfg.seeds:
            job = TrainJob(data=cfg.data, model=replace(cfg.model, width=width), train=cfg.train, seed=seed,
                           device=cfg.device, out=str(train_dir(root, width, seed)), track=cfg.track)
            trained[seed] = add(Step("train", f"{w}-s{seed}", Path(job.out), "metrics.json", to_dict(job),
                                     (lambda job=job: train(job, job.out, resume=True)), keep=(STATE_FILE,)))

        def match_step(a: int, b: int, method: str) -> Step:
            from .match import match_checkpoints

            mcfg = replace(cfg.match, method=method)
            out = pair_dir(root, "match", width, a, b, method)
            ta, tb = trained[a], trained[b]
            return add(Step("match", out.name, out, "metrics.json", {"match": to_dict(mcfg), "a": str(ta.out),
                                                                       "b": str(tb.out)},
                            lambda: match_checkpoints(model_path(ta), [model_path(tb)], mcfg, out, cfg.device),
                            needs=[ta, tb]))

        def interpolate_step(out: Path, a: Step, a_file: Path, bs: list[tuple[str, Step, Path]]) -> Step:
            from .interpolate import interpolate_checkpoints

            labels = [label for label, _, _ in bs]
            files = [file for _, _, file in bs]
            settings = {"interpolate": to_dict(cfg.interpolate), "a": str(a_file), "b": [str(f) for f in files],
                        "labels": labels}
            return add(Step("interpolate", out.name, out, "barrier.json", settings,
                            lambda: interpolate_checkpoints(a_file, files, labels, cfg.interpolate, out, cfg.device,
                                                           track=cfg.track),
                            needs=[a] + [s for _, s, _ in bs]))

        for a, b in seed_pairs(cfg):
            ta, tb = trained[a], trained[b]
            matches = {m: match_step(a, b, m) for m in cfg.methods}
            curves = [("naive", tb, model_path(tb))] + [(m, s, permuted_path(s)) for m, s in matches.items()]
            interpolate_step(pair_dir(root, "interpolate", width, a, b), ta, model_path(ta), curves)
            permuted = next(iter(matches.items()), None)
            if "svd" in cfg.analyses:
                from .analysis.svd import analyze_svd_checkpoints

                out = pair_dir(root, "svd", width, a, b)
                via = [permuted[1]] if permuted else []
                b_perm = permuted_path(permuted[1]) if permuted else None
                add(Step("svd", out.name, out, "svd.json",
                         {"svd": to_dict(cfg.svd), "a": str(ta.out), "b": str(tb.out), "b_permuted": str(b_perm)},
                         (lambda out=out, b_perm=b_perm, ta=ta, tb=tb: analyze_svd_checkpoints(
                             model_path(ta), model_path(tb), cfg.svd, out, b_permuted_path=b_perm,
                             device=cfg.device)),
                         needs=[ta, tb] + via))
            if "lewc" in cfg.analyses:
                from .analysis.lewc_run import lewc_checkpoints

                variants = [("naive", tb, model_path(tb))]
                if permuted:
                    variants.append((permuted[0], permuted[1], permuted_path(permuted[1])))
                for label, source, b_file in variants:
                    out = pair_dir(root, "lewc", width, a, b, label)
                    add(Step("lewc", out.name, out, "lewc.json",
                             {"lewc": to_dict(cfg.lewc), "norm_fix": cfg.interpolate.norm_fix, "a": str(ta.out),
                              "b": str(b_file)},
                             (lambda out=out, b_file=b_file, ta=ta: lewc_checkpoints(
                                 model_path(ta), b_file, cfg.lewc, out, norm_fix=cfg.interpolate.norm_fix,
                                 device=cfg.device)),
                             needs=[ta, source]))

        if cfg.three_models is not None:
            t = cfg.three_models
            for b, c in itertools.combinations(t.others, 2):
                for method in t.methods:
                    mb, mc = match_step(t.anchor, b, method), match_step(t.anchor, c, method)
                    out = three_dir(root, width, t.anchor, b, c, method)
                    interpolate_step(out, mb, permuted_path(mb), [(method, mc, permuted_path(mc))])
                out = three_dir(root, width, t.anchor, b, c, "naive")
                interpolate_step(out, trained[b], model_path(trained[b]), [("naive", trained[c],
                                                                           model_path(trained[c]))])
    return list(steps.values())


def _status(step: Step) -> str:
    return "complete" if is_complete(step.out, step.marker) else "to do"


def check_plan(steps: list[Step]) -> None:
    """Refuse, before anything runs, to reuse a finished step whose settings the YAML has changed. A step's
    input paths are not compared: the layout derives them from the step's own name (so a moved or renamed
    experiment folder still matches its finished steps)."""
    for step in steps:
        if is_complete(step.out, step.marker):
            try:
                check_settings(step.out, step.settings, INPUT_PATH_KEYS)
            except LmcxError as e:
                raise LmcxError(f"{step.label}: {e}; or give the experiment a new `out`") from None


def run_experiment(cfg: ExperimentConfig, *, dry_run: bool = False, force: bool = False) -> dict[str, Any]:
    """Run (or list, with dry_run) every step; then write the report. Returns the step results."""
    root = experiment_dir(cfg)
    steps = plan(cfg)
    if not force:
        check_plan(steps)
    if dry_run:
        for step in steps:
            console.print(f"{_status(step):>9}  {step.label:<42} {step.out}", markup=False)
        todo = sum(_status(s) != "complete" for s in steps)
        console.print(f"{len(steps)} steps, {todo} to do", markup=False)
        return {}
    with claim(root, wait=True):  # a second `lmcx run` of this experiment waits: steps.json, report.md are shared
        return _run_steps(cfg, root, steps, force)


def _run_steps(cfg: ExperimentConfig, root: Path, steps: list[Step], force: bool) -> dict[str, Any]:
    from .report import write_report

    write_yaml(root / EXPERIMENT_FILE, to_dict(cfg))
    earlier = _read_steps(root)
    results: dict[str, dict[str, Any]] = {}
    failed: set[str] = set()
    with progress.task(f"run {cfg.name}", total=len(steps), unit="step") as bar:
        for i, step in enumerate(steps, 1):
            blocked = [n.label for n in step.needs if n.label in failed]
            bar.update(step=step.label)
            if blocked:
                failed.add(step.label)
                results[step.label] = {"status": "blocked", "reason": f"needs {blocked[0]}, which failed",
                                       "out": str(step.out)}
                console.print(f"[{i}/{len(steps)}] {step.label}: blocked (needs {blocked[0]}, which failed)",
                              markup=False)
                write_json(root / STEPS_FILE, results)  # recorded even when it is the last step
                bar.advance(1)
                continue
            started = time.perf_counter()
            try:
                status = run_once(step.out, step.settings, [step.marker], step.action, force=force, wait=True,
                                  keep=step.keep, marker=step.marker, ignore=INPUT_PATH_KEYS)
                seconds = round(time.perf_counter() - started, 2)
                results[step.label] = {"status": status, "out": str(step.out), "seconds": seconds}
                if status == "skipped" and "seconds_when_done" in earlier.get(step.label, {}):
                    results[step.label]["seconds_when_done"] = earlier[step.label]["seconds_when_done"]
                elif status == "done":
                    results[step.label].update(seconds_when_done=seconds, threads=thread_info())
                console.print(f"[{i}/{len(steps)}] {step.label}: {status} ({time.perf_counter() - started:.1f} s)",
                              markup=False)
            except LmcxError as e:
                failed.add(step.label)
                results[step.label] = {"status": "failed", "reason": str(e), "out": str(step.out)}
                console.print(f"[{i}/{len(steps)}] {step.label}: FAILED: {e}", markup=False)
            except Exception as e:  # noqa: BLE001 - one broken step must not stop the sweep; the reason is kept
                failed.add(step.label)
                reason = f"{type(e).__name__}: {e}"
                results[step.label] = {"status": "failed", "reason": reason, "out": str(step.out),
                                       "traceback": traceback.format_exc()}
                console.print(f"[{i}/{len(steps)}] {step.label}: FAILED: {reason}", markup=False)
            write_json(root / STEPS_FILE, results)
            bar.advance(1)
    write_report(root)
    return results


def _read_steps(root: Path) -> dict[str, Any]:
    """steps.json of an earlier run (so a re-run keeps how long each skipped step once took), or {}."""
    from .io import read_json

    try:
        earlier = read_json(root / STEPS_FILE) if (root / STEPS_FILE).is_file() else {}
    except LmcxError:
        return {}
    return earlier if isinstance(earlier, dict) else {}
