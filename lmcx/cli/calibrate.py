"""`lmcx calibrate`: temperature calibration of an interpolation directory, from its cached logits."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import DataRootOption, DeviceOption, ForceOption, app, step_ran


@app.command("calibrate")
def calibrate(
    directory: Annotated[Path, typer.Argument(help="Output directory of `lmcx interpolate`.")],
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    force: ForceOption = False,
) -> None:
    """Fit a temperature T per model (each endpoint and each θ(λ)) on the held-out calibration split and
    rewrite curve.csv (temperature, calibrated_loss), curve.png (calibrated loss dashed) and barrier.json
    (calibrated barriers). Uses the cached logits; the calibration split's logits are computed once if
    the cache lacks them.

    Example, on the curve of the README's interpolate example:

    \b
    lmcx calibrate runs/curve
    """
    from ..console import console
    from ..errors import LmcxError
    from ..interpolate import BARRIER_FILE, calibrate_dir, is_calibrated, summary_lines
    from ..rundir import claim

    if not (directory / BARRIER_FILE).is_file():
        raise LmcxError(f"{directory} has no {BARRIER_FILE}; pass the output directory of a finished "
                        "`lmcx interpolate`")
    if is_calibrated(directory) and not force:
        console.print(f"{directory}: already calibrated (use --force to refit)")
        return
    with claim(directory) as claimed:
        if not claimed:
            step_ran(directory, "busy")
            return
        result = calibrate_dir(directory, device or "auto", data_root)
    for line in summary_lines(result):
        console.print(line, markup=False)
    console.print(f"{directory}: barrier.json, curve.csv, curve.png rewritten with calibrated values", markup=False)
