"""`lmcx evaluate`: loss and accuracy of a checkpoint on a split of its dataset."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .app import DataRootOption, DeviceOption, app


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="model.safetensors or a run directory.")],
    split: Annotated[str, typer.Option(help="train | calib | test (calib: the held-out calibration split).")] = "test",
    device: DeviceOption = None,
    data_root: DataRootOption = None,
) -> None:
    """Print a checkpoint's loss and accuracy as JSON.

    Example, on a model of the README's train examples:

    \b
    lmcx evaluate runs/s0 --split test
    """
    from ..checkpoint import build_from_checkpoint, check_dataset_fits, load_checkpoint
    from ..data import load_dataset
    from ..errors import LmcxError
    from ..io import _json_safe
    from ..train import evaluate as evaluate_model, resolve_device

    if split not in ("train", "calib", "test"):
        raise LmcxError(f"--split {split!r}: choose train, calib or test")
    ckpt = load_checkpoint(model)
    if data_root is not None:
        ckpt.data.root = str(data_root)
    dev = resolve_device(device or "auto")
    ds = load_dataset(ckpt.data, dev)
    check_dataset_fits(ckpt, ds.in_shape, ds.num_classes)
    result = evaluate_model(build_from_checkpoint(ckpt, dev), ds, split)
    # strict JSON: a non-finite loss (a diverged model) is printed as null, not NaN
    typer.echo(json.dumps(_json_safe({"model": str(ckpt.path), "split": split, **result}), allow_nan=False))
