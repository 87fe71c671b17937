"""`lmcx interpolate`: loss and accuracy along θ(λ) = (1 − λ)θ_A + λθ_B, barriers, optional calibration."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import InterpolateConfig
from .app import (OFF, ConfigOption, DataRootOption, DeviceOption, ForceOption, TrackOption, app, key_default,
                  out_option, overrides, set_option, step_ran)


def _default_label(b: Path, perm: str | None) -> str:
    """naive for a B used as trained; else the matching method recorded in the permutation file or the
    permuted checkpoint (lmcx match), else `permuted`."""
    from ..checkpoint import resolve_model_path
    from ..io import loads_json, read_json

    info: dict = {}
    try:
        if perm is not None:
            info = read_json(perm).get("info") or {}
        else:
            from safetensors import safe_open

            with safe_open(str(resolve_model_path(b)), "pt") as f:
                info = loads_json((f.metadata() or {}).get("lmcx", "{}")).get("info") or {}
    except Exception:  # noqa: BLE001 - only a default name; the real loading reports unreadable files
        info = {}
    method = info.get("method") if isinstance(info, dict) else None
    if perm is None and not method and not (isinstance(info, dict) and info.get("permuted_from")):
        return "naive"
    return str(method) if method else "permuted"


def _unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        name, k = label, 2
        while name in out:
            name, k = f"{label}-{k}", k + 1
        out.append(name)
    return out


@app.command("interpolate")
def interpolate(
    a: Annotated[Path, typer.Option("--a", help="Model A (λ = 0): model.safetensors or a run directory.")],
    b: Annotated[list[Path], typer.Option(
        "--b", help="Model B (λ = 1); repeatable: one curve per --b, all against A, on one plot.")],
    label: Annotated[Optional[list[str]], typer.Option(
        "--label", show_default="naive, or the method that permuted B",
        help="Name of each --b's curve, in order (naive, wm, am, ste get fixed colours).")] = None,
    perm: Annotated[Optional[list[str]], typer.Option(
        "--perm", show_default="none", help="Permutation file (lmcx match) applied to B on the fly; one per --b, "
                                            "in order, `none` for a B used as it is.")] = None,
    points: Annotated[Optional[int], typer.Option(
        "--points", show_default=key_default(InterpolateConfig, "points"), help="Evenly spaced λ in [0, 1].")] = None,
    norm_fix: Annotated[Optional[str], typer.Option(
        "--norm-fix", show_default=key_default(InterpolateConfig, "norm_fix"),
        help="auto | reset | repair | none (auto: reset for BN models, else none).")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", show_default=OFF,
        help="Also fit a temperature per model on the calibration split (see lmcx calibrate).")] = False,
    config: ConfigOption = None,
    set_: set_option("points=11") = None,
    out: out_option("outputs/interpolate/<A-B>-<labels>[-<norm fix>]-<hash>") = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    track: TrackOption = None,
    force: ForceOption = False,
) -> None:
    """Interpolate A with each B: loss and accuracy barriers on test and train, raw and calibrated.

    Writes curve.csv, curve.png, logits.safetensors (every logits tensor, for calibration and re-analysis),
    config.yaml and barrier.json (last). A config file holds InterpolateConfig keys (points, lambdas,
    norm_fix, train_eval_size, norm_fix_batches, norm_fix_batch_size, eval_batch_size, precision,
    calibrate); --set lambdas=[0,0.25,0.5,0.75,1] gives an explicit grid.

    Example, with the models of the README's train and match examples (labels: naive, and wm from the
    permuted checkpoint):

    \b
    lmcx interpolate --a runs/s0 --b runs/s1 --b runs/wm/permuted.safetensors
    """
    from ..config import load_config, to_dict
    from ..threads import apply_config
    from ..errors import LmcxError

    cfg = load_config(InterpolateConfig, config, overrides(
        {"points": points, "norm_fix": norm_fix, "calibrate": True if calibrate else None}, set_))

    apply_config(cfg.threads)  # the config's `threads` key, ranked by lmcx/threads.py
    track = track or "none"
    perms: list[str | None] | None = None
    if perm:
        if len(perm) != len(b):
            raise LmcxError(f"{len(b)} --b but {len(perm)} --perm; give one --perm per --b, in order "
                            "(`none` for a B used as it is)")
        perms = [None if p.lower() in ("none", "-", "") else p for p in perm]
    if label and len(label) != len(b):
        raise LmcxError(f"{len(b)} --b but {len(label)} --label; give one --label per --b, in order")
    labels = list(label) if label else _unique([_default_label(bb, p) for bb, p in zip(b, perms or [None] * len(b))])
    resolved = {"interpolate": to_dict(cfg), "a": str(a), "b": [str(x) for x in b], "labels": labels,
                **({"perms": perms} if perms and any(perms) else {}),
                "device": device or "auto", "data": {"root": str(data_root) if data_root else None}, "track": track}
    # calibration only adds to a finished curve, so `calibrate` alone never makes it stale (or renames it)
    stays = {"interpolate.calibrate"}
    from ..console import console  # only now: torch loads below, and bad input needs none of it
    from ..interpolate import OUTPUTS, calibrate_dir, interpolate_checkpoints, is_calibrated, summary_lines
    from ..io import read_json
    from ..names import interpolate_dir
    from ..rundir import check_settings, claim, is_complete, run_once

    run_dir = out or interpolate_dir(a, b[0], labels, cfg.norm_fix, resolved, ignore=stays)

    result: dict = {}
    if not force and is_complete(run_dir, "barrier.json"):
        check_settings(run_dir, resolved, ignore=stays)
        status = "skipped"
        if cfg.calibrate and not is_calibrated(run_dir):  # calibrate it in place from its cached logits
            with claim(run_dir) as claimed:
                if not claimed:
                    status = "busy"
                else:
                    result = calibrate_dir(run_dir, device or "auto", data_root, track)
                    status = "calibrated"
    else:
        status = run_once(run_dir, resolved, OUTPUTS, lambda: result.update(interpolate_checkpoints(
            a, list(b), labels, cfg, run_dir, device or "auto", perms, data_root, track)), force=force,
            marker="barrier.json")
    if status == "busy":
        step_ran(run_dir, status)
        return
    if status == "skipped":
        step_ran(run_dir, status)
        result = read_json(run_dir / "barrier.json")
    console.print(f"norm fix {result.get('norm_fix')}; {result.get('lambda_convention')}", markup=False)
    for line in summary_lines(result):
        console.print(line, markup=False)
    console.print(f"{run_dir}: barrier.json, curve.csv, curve.png, logits.safetensors", markup=False)
