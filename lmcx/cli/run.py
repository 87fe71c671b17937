"""`lmcx run` and `lmcx report`: a whole experiment from one YAML, and its report."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import DataRootOption, DeviceOption, ForceOption, OutOption, SetOption, app, overrides


@app.command()
def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML (see configs/quickstart.yaml).")],
    out: OutOption = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the steps and whether each is done.")] = False,
    force: ForceOption = False,
) -> None:
    """Train every (width, seed), match, interpolate, calibrate, analyse, and write report.md.

    Re-running skips finished steps; adding a width or seed runs only what is new.
    Example: lmcx run configs/quickstart.yaml
    """
    from ..config import ExperimentConfig, load_config
    from ..console import console
    from ..experiment import run_experiment
    from ..layout import experiment_dir
    from ..rundir import lock_timeout

    lock_timeout()  # a bad LMCX_LOCK_TIMEOUT is bad input now, not a failure of whichever step has to wait
    cfg = load_config(ExperimentConfig, experiment, overrides(
        {"out": out, "device": device, "data.root": data_root}, set_))
    results = run_experiment(cfg, dry_run=dry_run, force=force)
    failed = [k for k, v in results.items() if v["status"] == "failed"]
    if not dry_run:
        console.print(f"report: {experiment_dir(cfg) / 'report.md'}", markup=False)
    if failed:
        console.print(f"{len(failed)} step(s) failed; see {experiment_dir(cfg) / 'steps.json'}", markup=False)
        raise typer.Exit(1)


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="Output folder of an `lmcx run`.")],
) -> None:
    """(Re)write report.md, summary.csv and plots of an experiment folder. Example: lmcx report outputs/quickstart"""
    from ..console import console
    from ..report import write_report

    console.print(f"report: {write_report(directory)}", markup=False)
