"""`lmcx run` and `lmcx report`: a whole experiment from one YAML, and its report."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import (OFF, DataRootOption, DeviceOption, ForceOption, TrackOption, app, out_option, overrides,
                  set_option)


@app.command()
def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML (see configs/quickstart.yaml).")],
    out: out_option("outputs/<name>") = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    set_: set_option("train.epochs=5") = None,
    track: TrackOption = None,
    launcher: Annotated[str, typer.Option(
        "--launcher", help="local: every step here, one after another | slurm: the steps as SLURM jobs through "
                           "submitit (the experiment's `slurm:` settings; pip install 'lmcx[slurm]').")] = "local",
    wait: Annotated[bool, typer.Option(
        "--wait", show_default=OFF, help="With --launcher slurm: return once the report job has run.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", show_default=OFF, help="List the steps and whether each is done.")] = False,
    force: ForceOption = False,
) -> None:
    """Train every (width, seed), match, interpolate, calibrate, analyse, and write report.md.

    Re-running skips finished steps; adding a width or seed runs only what is new. With --launcher slurm
    the missing steps are submitted (train steps as one job array, the others as jobs that wait for what
    they need, then a report job) and their job ids printed; --set slurm.partition=gpu and other keys
    of `slurm:` are submitit's SlurmExecutor parameters (lmcx/slurm.py).

    Examples, from the repository root:

    \b
    lmcx run configs/quickstart.yaml --dry-run
    lmcx run configs/quickstart.yaml
    """
    from ..config import ExperimentConfig, load_config
    from ..errors import LmcxError
    from ..rundir import lock_timeout
    from ..threads import apply_config

    lock_timeout()  # a bad LMCX_LOCK_TIMEOUT is bad input now, not a failure of whichever step has to wait
    cfg = load_config(ExperimentConfig, experiment, overrides(
        {"out": out, "device": device, "data.root": data_root, "track": track}, set_))
    apply_config(cfg.threads)  # the config's `threads` key, ranked by lmcx/threads.py
    if launcher not in ("local", "slurm"):
        raise LmcxError(f"--launcher {launcher!r}: choose local or slurm")
    if wait and launcher != "slurm":
        raise LmcxError("--wait waits for SLURM jobs; add --launcher slurm (a local run always waits)")
    if force and launcher == "slurm":
        raise LmcxError("--force cannot be sent to SLURM jobs (they skip complete steps); delete the step "
                        "directories to redo, or run with --launcher local --force")
    from ..console import console  # only now: torch loads below, and a config error needs none of it
    from ..experiment import check_plan, plan, run_experiment
    from ..io import read_json
    from ..layout import STEPS_FILE, experiment_dir

    if launcher == "slurm" and not dry_run:
        from ..slurm import submit_experiment

        steps = plan(cfg)
        check_plan(steps)
        submit_experiment(cfg, steps, experiment_dir(cfg) / "slurm", cfg.slurm, wait=wait)  # prints the job ids
        results = read_json(experiment_dir(cfg) / STEPS_FILE) if wait else {}
    else:
        results = run_experiment(cfg, dry_run=dry_run, force=force)
        if not dry_run:
            console.print(f"report: {experiment_dir(cfg) / 'report.md'}", markup=False)
    failed = [k for k, v in results.items() if v["status"] == "failed"]
    if failed:
        console.print(f"{len(failed)} step(s) failed; see {experiment_dir(cfg) / 'steps.json'}", markup=False)
        raise typer.Exit(1)


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="Output folder of an `lmcx run`.")],
) -> None:
    """(Re)write report.md, summary.csv and plots of an experiment folder.

    Example, after the README's `lmcx run configs/quickstart.yaml`:

    \b
    lmcx report outputs/quickstart
    """
    from ..console import console
    from ..report import write_report

    console.print(f"report: {write_report(directory)}", markup=False)
