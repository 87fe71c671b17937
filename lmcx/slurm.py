"""An experiment's plan as SLURM jobs, through submitit (`pip install 'lmcx[slurm]'`).

The train steps that are not complete go in one job array; every other step is one job that starts
once the jobs of the steps it needs have succeeded (`afterok`; SLURM cancels it when one of them
fails: `kill-on-invalid-dep`), and a last job (`afterany` of all) records steps.json and writes the
report. Each job re-plans the experiment from its settings and runs its one step as `lmcx run` does
(rundir.run_once: skipped when complete, resumed when interrupted), in the folder it was submitted
from, so local and SLURM runs share run directories and a re-submission runs only what is missing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, from_dict, to_dict
from .console import console
from .errors import LmcxError, RunFailed
from .experiment import EXPERIMENT_FILE, STEPS_FILE, Step, experiment_dir, plan
from .io import write_json, write_yaml
from .rundir import INPUT_PATH_KEYS, is_complete, run_once

# submitit's SlurmExecutor parameters (sbatch options with `_` for `-`); submitit's own default time
# limit is 5 minutes, too short for training.
DEFAULT_OPTIONS: dict[str, Any] = {"time": 60, "cpus_per_task": 1}
REPORT = "report"  # the label of the last job


def schedule(steps: list[Step]) -> tuple[list[Step], list[tuple[Step, list[str]]]]:
    """(train steps for the job array, [(other step, labels of the submitted steps it waits for)]), only
    steps that are not complete; the other steps keep the plan's order, which puts needs first."""
    todo = [s for s in steps if not is_complete(s.out, s.marker)]
    labels = {s.label for s in todo}
    trains = [s for s in todo if s.kind == "train"]
    others = [(s, [n.label for n in s.needs if n.label in labels]) for s in todo if s.kind != "train"]
    return trains, others


def run_step(settings: dict[str, Any], out: str, cwd: str) -> str:
    """Job body: the step of the experiment `settings` whose directory is `out` ("done" or "skipped")."""
    os.chdir(cwd)
    cfg = from_dict(ExperimentConfig, settings, "")
    step = next((s for s in plan(cfg) if str(s.out) == out), None)
    if step is None:
        raise LmcxError(f"the experiment has no step writing {out}; re-submit it")
    return run_once(step.out, step.settings, [step.marker], step.action, wait=True, keep=step.keep,
                    marker=step.marker, ignore=INPUT_PATH_KEYS)  # as `lmcx run`: a moved folder keeps its steps


def finish_experiment(settings: dict[str, Any], cwd: str, jobs: dict[str, dict[str, str]]) -> str:
    """Last job: steps.json from what is complete now (done / skipped / failed / blocked), then the report.
    `jobs`: label -> {"job": id, "log": stderr file} of each submitted step. Returns report.md's path."""
    from .report import write_report

    os.chdir(cwd)
    cfg = from_dict(ExperimentConfig, settings, "")
    root = experiment_dir(cfg)
    results: dict[str, dict[str, Any]] = {}
    for step in plan(cfg):
        entry: dict[str, Any] = {"out": str(step.out), **jobs.get(step.label, {})}
        missing = [n.label for n in step.needs if not is_complete(n.out, n.marker)]
        if is_complete(step.out, step.marker):
            entry["status"] = "done" if step.label in jobs else "skipped"
        elif missing:
            entry.update(status="blocked", reason=f"needs {missing[0]}, which failed")
        else:
            entry.update(status="failed", reason=f"SLURM job {entry.get('job')} did not finish it; see {entry.get('log')}")
        results[step.label] = entry
    write_json(root / STEPS_FILE, results)
    return str(write_report(root))


def _executor(folder: Path, options: dict[str, Any]):
    try:
        import submitit
    except ImportError:
        raise LmcxError("the slurm launcher needs submitit: pip install 'lmcx[slurm]'") from None
    try:
        executor = submitit.SlurmExecutor(folder=folder / "%j")
    except RuntimeError:  # submitit's check that srun exists
        raise LmcxError("no SLURM here (srun not found); submit from a SLURM login node, or run with the "
                        "local launcher") from None
    try:  # submitit's generic names too (timeout_min -> time, mem_gb -> mem), as its AutoExecutor converts them
        executor.update_parameters(**{**DEFAULT_OPTIONS, **executor._convert_parameters(options)})
    except ValueError as e:  # submitit lists the valid options
        raise LmcxError(f"slurm options: {str(e).splitlines()[0]}; use submitit SlurmExecutor parameters "
                        "(partition, time or timeout_min, gpus_per_node, cpus_per_task, mem or mem_gb, account, "
                        "...)") from None
    return executor


def _job_record(job) -> dict[str, str]:
    return {"job": str(job.job_id), "log": str(job.paths.stderr)}


def _submit(executor, name: str, trains: list[Step], others: list[tuple[Step, list[str]]],
            where: tuple[dict[str, Any], str], options: dict[str, Any], jobs: dict[str, Any]):
    """Submit the train array, the dependent jobs and the report job; fills `jobs` (label -> job) as it goes,
    returns the report job. `where`: the experiment's settings and the folder to run in."""
    settings, cwd = where
    if trains:
        executor.update_parameters(job_name=f"{name}-train", dependency=None)
        array = executor.map_array(run_step, [settings] * len(trains), [str(s.out) for s in trains],
                                   [cwd] * len(trains))
        jobs.update(zip([s.label for s in trains], array))
    # a job whose afterok can no longer be met (a step it needs failed) is cancelled, not left pending
    executor.update_parameters(additional_parameters={**(options.get("additional_parameters") or {}),
                                                      "kill_on_invalid_dep": "yes"})
    for step, needs in others:
        after = ":".join(str(jobs[label].job_id) for label in needs)
        executor.update_parameters(job_name=f"{name}-{step.kind}", dependency=f"afterok:{after}" if after else None)
        jobs[step.label] = executor.submit(run_step, settings, str(step.out), cwd)
    executor.update_parameters(job_name=f"{name}-report",
                               dependency="afterany:" + ":".join(str(j.job_id) for j in jobs.values()) if jobs else None)
    return executor.submit(finish_experiment, settings, cwd, {label: _job_record(j) for label, j in jobs.items()})


def submit_experiment(cfg: ExperimentConfig, steps: list[Step], folder: str | Path,
                      slurm_options: dict[str, Any] | None = None, *, wait: bool = False) -> dict[str, str]:
    """Submit the incomplete `steps` (plan(cfg), checked by experiment.check_plan) and the report job;
    submitit's files and the jobs' logs go to `folder`. Returns label -> SLURM job id ("report" for the
    last job), and prints them. With `wait`, returns once the report is written."""
    folder = Path(folder)
    root = experiment_dir(cfg)
    options = dict(slurm_options or {})
    executor = _executor(folder, options)
    from submitit.core.utils import FailedJobError, UncompletedJobError  # there: _executor checked

    settings, cwd = to_dict(cfg), os.getcwd()
    write_yaml(root / EXPERIMENT_FILE, settings)
    trains, others = schedule(steps)
    jobs: dict[str, Any] = {}
    try:
        report = _submit(executor, cfg.name, trains, others, (settings, cwd), options, jobs)
    except FailedJobError as e:  # sbatch refused a job: take back the ones it took, so none waits forever
        for job in jobs.values():
            job.cancel(check=False)
        raise LmcxError(f"sbatch refused a job ({str(e).strip().splitlines()[0]}); nothing was left queued; "
                        "check the slurm options") from None
    ids = {label: str(job.job_id) for label, job in jobs.items()} | {REPORT: str(report.job_id)}
    array_ids = sorted({ids[s.label].split("_")[0] for s in trains})
    console.print(f"{len(steps) - len(jobs)} steps complete, {len(jobs)} submitted: "
                  f"{len(trains)} train (job array {', '.join(array_ids) or '-'}), {len(others)} dependent jobs; "
                  f"report job {report.job_id}; logs in {folder}", markup=False)
    for label, job_id in ids.items():
        console.print(f"{job_id:>12}  {label}", markup=False)
    if wait:
        try:
            console.print(f"report: {report.result()}", markup=False)
        except (FailedJobError, UncompletedJobError) as e:
            raise RunFailed(f"the report job {report.job_id} failed ({str(e).splitlines()[0]}); see "
                            f"{report.paths.stderr}") from None
    return ids
