"""`lmcx match`: permute model B (or several) into model A's unit order with wm, am or ste."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import MatchConfig
from .app import (ConfigOption, DataRootOption, DeviceOption, ForceOption, app, key_default, out_option, overrides,
                  set_option, step_ran)


@app.command("match")
def match(
    a: Annotated[Path, typer.Option("--a", help="Model A (the reference frame): model.safetensors or a run directory.")],
    b: Annotated[list[Path], typer.Option(
        "--b", help="Model B to permute into A's frame; repeatable (several B's: see --many).")],
    method: Annotated[Optional[str], typer.Option(
        "--method", show_default=key_default(MatchConfig, "method"),
        help="wm (weight matching) | am (activation matching) | ste (straight-through estimator).")] = None,
    many: Annotated[Optional[str], typer.Option(
        "--many", show_default=key_default(MatchConfig, "many"),
        help="With several --b: anchor (each B matched to A) | merge-many (MergeMany, wm only).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", show_default=key_default(MatchConfig, "seed"),
        help="Seed of the sweep orders (and STE's batches).")] = None,
    max_iter: Annotated[Optional[int], typer.Option(
        "--max-iter", show_default=key_default(MatchConfig, "max_iter"), help="Weight matching sweeps at most.")] = None,
    config: ConfigOption = None,
    set_: set_option("ste.epochs=1") = None,
    out: out_option("outputs/match/<A-B>-<method>-<hash>") = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    force: ForceOption = False,
) -> None:
    """Match B to A. Writes permutation.json, permuted.safetensors (B in A's frame, a normal checkpoint),
    config.yaml and metrics.json (last); with several --b, b1/, b2/, ... each holding the first two.

    A config file holds MatchConfig keys (method, seed, max_iter, tol, start, wm_objective, am_samples,
    am_batch_size, many, threads, ste: {epochs, lr, batch_size, eval_samples, eval_every}). am and ste
    read the training data of A's dataset; wm needs only the weights.

    Examples, with the models of the README's train examples:

    \b
    lmcx match --a runs/s0 --b runs/s1 --out runs/wm
    lmcx match --method ste --a runs/s0 --b runs/s1 --set ste.epochs=1
    """
    from ..config import load_config, to_dict
    from ..threads import apply_config

    cfg = load_config(MatchConfig, config, overrides(
        {"method": method, "many": many, "seed": seed, "max_iter": max_iter}, set_))

    apply_config(cfg.threads)  # the config's `threads` key, ranked by lmcx/threads.py
    from ..console import console  # only now: torch loads below, and a config error needs none of it
    from ..io import read_json
    from ..match import METRICS_FILE, match_checkpoints, match_outputs, summary_lines
    from ..names import match_dir
    from ..rundir import run_once

    resolved = {"match": to_dict(cfg), "a": str(a), "b": [str(x) for x in b], "device": device or "auto",
                "data": {"root": str(data_root) if data_root else None}}
    run_dir = out or match_dir(a, b, cfg, resolved)
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
