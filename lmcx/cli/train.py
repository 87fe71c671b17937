"""`lmcx train`: train one model into a run directory (skipped when already complete)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (ConfigOption, DataRootOption, DeviceOption, ForceOption, OutOption, SetOption, app,
                  overrides, step_ran)


@app.command()
def train(
    config: ConfigOption = None,
    width: Annotated[Optional[float], typer.Option(help="Width multiplier (model.width).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (init, data order, augmentation).")] = None,
    arch: Annotated[Optional[str], typer.Option(help="mlp | vgg11 | vgg16 | resnet20 (model.arch).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (data.name).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (train.epochs).")] = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    out: OutOption = None,
    set_: SetOption = None,
    force: ForceOption = False,
    resume: Annotated[bool, typer.Option("--resume", help=(
        "Continue an interrupted run from its last epoch: the default whenever its settings match "
        "(kept for scripts); --force starts over instead."))] = False,
) -> None:
    """Train a model. Writes model.safetensors, meta.json, history.csv, config.yaml, metrics.json.

    Re-running a finished run skips it; an interrupted one resumes after its last finished epoch.
    Example: lmcx train -c configs/digits_mlp.yaml --width 2 --seed 1
    """
    from ..config import TrainJob, load_config
    from ..console import console
    from ..errors import LmcxError
    from ..train import default_run_dir, train_run

    if force and resume:
        raise LmcxError("--force starts the run over and --resume continues it; pass one of them")

    job = load_config(TrainJob, config, overrides(
        {"model.width": width, "seed": seed, "model.arch": arch, "data.name": dataset, "train.epochs": epochs,
         "device": device, "data.root": data_root, "out": out}, set_))
    run_dir = Path(job.out) if job.out else default_run_dir(job)
    result, metrics = train_run(job, run_dir, force=force)
    if result != "worker" and step_ran(run_dir, result):
        console.print(f"{run_dir}: test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f}")
