"""`lmcx match`: permute model B (or several) into model A's unit order with wm, am or ste."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (ConfigOption, DataRootOption, DeviceOption, ForceOption, OutOption, SetOption, app,
                  overrides, step_ran)


@app.command("match")
def match(
    a: Annotated[Path, typer.Option("--a", help="Model A (the reference frame): model.safetensors or a run directory.")],
    b: Annotated[list[Path], typer.Option(
        "--b", help="Model B to permute into A's frame; repeatable (several B's: see --many).")],
    method: Annotated[Optional[str], typer.Option(
        "--method", help="wm (weight matching) | am (activation matching) | ste (straight-through estimator).")] = None,
    many: Annotated[Optional[str], typer.Option(
        "--many", help="With several --b: anchor (each B matched to A) | merge-many (MergeMany, wm only).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the sweep orders (and STE's batches).")] = None,
    max_iter: Annotated[Optional[int], typer.Option("--max-iter", help="Weight matching sweeps at most.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    out: OutOption = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    force: ForceOption = False,
) -> None:
    """Match B to A. Writes permutation.json, permuted.safetensors (B in A's frame, a normal checkpoint),
    config.yaml and metrics.json (last); with several --b, b1/, b2/, ... each holding the first two.

    A config file holds MatchConfig keys (method, seed, max_iter, am_samples, am_batch_size, many,
    ste: {epochs, lr, batch_size, eval_samples, eval_every}); e.g. --set ste.epochs=1.
    am and ste read the training data of A's dataset; wm needs only the weights.

    Example: lmcx match --method wm --a outputs/train/s0 --b outputs/train/s1
    """
    from ..config import MatchConfig, load_config, to_dict
    from ..console import console
    from ..io import read_json
    from ..match import METRICS_FILE, default_out_dir, match_checkpoints, match_outputs, summary_lines
    from ..rundir import run_once

    cfg = load_config(MatchConfig, config, overrides(
        {"method": method, "many": many, "seed": seed, "max_iter": max_iter}, set_))
    run_dir = out or default_out_dir(a, b, cfg)
    resolved = {"match": to_dict(cfg), "a": str(a), "b": [str(x) for x in b], "device": device or "auto",
                "data": {"root": str(data_root) if data_root else None}}
    result: dict = {}
    status = run_once(run_dir, resolved, match_outputs(len(b)), lambda: result.update(match_checkpoints(
        a, list(b), cfg, run_dir, device or "auto", data_root)), force=force, marker=METRICS_FILE)
    if status == "busy":
        step_ran(run_dir, status)
        return
    if not step_ran(run_dir, status):  # already complete: summarise the finished match
        result = read_json(run_dir / METRICS_FILE)
    for line in summary_lines(result, run_dir):
        console.print(line, markup=False)
