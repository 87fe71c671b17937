"""`lmcx train`: train one model into a run directory (skipped when already complete)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import TrainJob
from .app import (OFF, ArchOption, ConfigOption, DataRootOption, DeviceOption, ForceOption, TrackOption, WidthOption,
                  app, key_default, out_option, overrides, set_option, step_ran)


@app.command()
def train(
    config: ConfigOption = None,
    width: WidthOption = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Random seed (init, data order, augmentation).", show_default=key_default(TrainJob, "seed"))] = None,
    arch: ArchOption = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset name (README, Datasets).", show_default=key_default(TrainJob, "data.name"))] = None,
    epochs: Annotated[Optional[int], typer.Option(
        help="Training epochs.", show_default=key_default(TrainJob, "train.epochs"))] = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    out: out_option("outputs/train/<dataset>-<arch>-<norm>-w<width>-s<seed>-<hash>") = None,
    set_: set_option("train.lr=0.1") = None,
    track: TrackOption = None,
    force: ForceOption = False,
    resume: Annotated[bool, typer.Option("--resume", show_default=OFF, help=(
        "Continue an interrupted run from its last epoch: the default whenever its settings match "
        "(kept for scripts); --force starts over instead."))] = False,
) -> None:
    """Train a model. Writes model.safetensors, meta.json, history.csv, config.yaml, metrics.json.

    Re-running a finished run skips it; an interrupted one resumes after its last finished epoch. Without
    -c the built-in defaults train a batch-normalised MLP on the bundled digits (958 training images
    after the calibration split, by default a third of them: 479); train.batch_size must not exceed the
    training set.

    Examples (the second from the repository root, which holds configs/):

    \b
    lmcx train --epochs 2 --out runs/try
    lmcx train -c configs/digits_mlp.yaml --seed 1 --out runs/s1
    """
    from ..config import load_config
    from ..threads import apply_config
    from ..errors import LmcxError

    if force and resume:
        raise LmcxError("--force starts the run over and --resume continues it; pass one of them")

    job = load_config(TrainJob, config, overrides(
        {"model.width": width, "seed": seed, "model.arch": arch, "data.name": dataset, "train.epochs": epochs,
         "device": device, "data.root": data_root, "out": out, "track": track}, set_))

    apply_config(job.threads)  # the config's `threads` key, ranked by lmcx/threads.py
    from ..console import console  # only now: torch loads below, and a config error needs none of it
    from ..names import train_dir
    from ..train import train_run

    run_dir = Path(job.out) if job.out else train_dir(job)
    result, metrics = train_run(job, run_dir, force=force)
    if result != "worker" and step_ran(run_dir, result):
        console.print(f"{run_dir}: test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f}")
