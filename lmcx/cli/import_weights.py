"""`lmcx import`: weights trained elsewhere + an architecture + a dataset -> an lmcx run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import TrainJob
from .app import (ArchOption, ConfigOption, DataRootOption, DeviceOption, ForceOption, WidthOption, app, key_default,
                  out_option, overrides, set_option, step_ran)


@app.command("import")
def import_weights(
    weights: Annotated[Path, typer.Option(
        "--weights", help="FILE.safetensors, or a PyTorch state dict (.pt/.pth/.bin, read with weights_only=True).")],
    arch: ArchOption = None,
    width: WidthOption = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--data", "--dataset", help="Dataset the model is for: input shape, classes, evaluation (data.name).",
        show_default=key_default(TrainJob, "data.name"))] = None,
    key: Annotated[Optional[str], typer.Option(help="Entry of the file that holds the state dict (e.g. state_dict).",
                                             show_default="the whole file")] = None,
    strip_prefix: Annotated[Optional[str], typer.Option(
        "--strip-prefix", help="Remove this prefix from every tensor name (e.g. 'module.').", show_default="none")] = None,
    config: ConfigOption = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    out: out_option("outputs/import/<dataset>-<arch>-<weights>-<hash>") = None,
    set_: set_option("model.width=2") = None,
    force: ForceOption = False,
) -> None:
    """Turn weights trained elsewhere into an lmcx checkpoint: model.safetensors (with the header every
    command reads), meta.json, config.yaml and metrics.json (test loss and accuracy) last, like a
    training run. The tensors must be exactly the architecture's state dict; a config file holds the
    model and data sections of a training config.

    Weights of torchvision's ResNet-18 trained for CIFAR-10, say: --arch torchvision.resnet18 --weights
    r18.pt --data cifar10. Example that runs as printed, the first model of the README's train examples as
    if it came from elsewhere:

    \b
    lmcx import --weights runs/s0/model.safetensors --set model.norm=none
    """
    from ..config import load_config

    loaded = load_config(TrainJob, config, overrides(
        {"model.arch": arch, "model.width": width, "data.name": dataset, "data.root": data_root, "device": device},
        set_))
    from ..console import console  # only now: torch loads below, and a config error needs none of it
    from ..import_weights import IMPORT_OUTPUTS, import_settings, with_model_norm
    from ..import_weights import import_weights as run_import
    from ..io import read_json
    from ..names import import_dir
    from ..rundir import run_once

    job = with_model_norm(loaded)
    settings = import_settings(job, weights, key, strip_prefix)
    run_dir = out or import_dir(job, weights, settings)
    metrics: dict = {}
    status = run_once(run_dir, settings, IMPORT_OUTPUTS,
                      lambda: metrics.update(run_import(job, weights, run_dir, key, strip_prefix)), force=force)
    if step_ran(run_dir, status) or status == "skipped":
        metrics = metrics or read_json(Path(run_dir) / "metrics.json")
        console.print(f"{run_dir}: {job.model.arch}, test accuracy {metrics['test_accuracy']:.4f}, "
                      f"loss {metrics['test_loss']:.4f}", markup=False)
