"""`lmcx lewc`: is the merged model's layer output LEWC's or LLFC's combination of A's and B's?"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import (BPermutedOption, ConfigOption, DataRootOption, DeviceOption, ForceOption, ModelAOption, OutOption,
                  PermOption, SetOption, app, overrides, pair_tag, step_ran)


@app.command("lewc")
def lewc(
    a: ModelAOption,
    b: Annotated[Path, typer.Option("--b", help="Model B (used as trained unless --perm / --b-permuted).")],
    perm: PermOption = None,
    b_permuted: BPermutedOption = None,
    lambda_: Annotated[Optional[list[float]], typer.Option(
        "--lambda", help="λ of θ(λ) = (1−λ)θ_A + λθ_B (repeatable; default 0.25 0.5 0.75).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="First N test images (lewc.samples).")] = None,
    norm_fix: Annotated[str, typer.Option("--norm-fix", help="auto | reset | repair | none (auto: reset for BN).")] = "auto",
    config: ConfigOption = None,
    set_: SetOption = None,
    out: OutOption = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    force: ForceOption = False,
) -> None:
    """LEWC vs LLFC ([B]): for every layer ℓ and λ, cosine similarity and relative error of the merged
    model's output f_ℓ(θ(λ)) against (1−λ)^ℓ f_ℓ(A) + λ^ℓ f_ℓ(B) (LEWC) and (1−λ) f_ℓ(A) + λ f_ℓ(B)
    (LLFC), fitted (α, β), reciprocal orthogonality and weak additivity.

    Writes lewc.csv, lewc_cosine.png, lewc_coefficients.png and lewc.json (last). A config file holds
    LewcConfig keys (lambdas, samples, batch_size, norm_fix_batches, norm_fix_batch_size).

    Example: lmcx lewc --a outputs/train/a --b outputs/train/b --lambda 0.25 --lambda 0.5 --lambda 0.75
    """
    from ..analysis.lewc_run import LEWC_OUTPUTS, lewc_checkpoints
    from ..analysis.pair import check_permutation_source
    from ..config import LewcConfig, load_config, to_dict
    from ..console import console
    from ..interpolate import check_norm_fix
    from ..rundir import run_once

    check_permutation_source(perm, b_permuted)  # before run_once creates the run directory
    check_norm_fix(norm_fix, "--norm-fix")
    cfg = load_config(LewcConfig, config, overrides({"lambdas": list(lambda_) if lambda_ else None,
                                                     "samples": samples}, set_))
    permuted = perm is not None or b_permuted is not None
    run_dir = out or Path("outputs") / "lewc" / f"{pair_tag(a, b)}-{'permuted' if permuted else 'naive'}"
    resolved = {"a": str(a), "b": str(b), "perm": str(perm) if perm else None,
                "b_permuted": str(b_permuted) if b_permuted else None, "norm_fix": norm_fix,
                "lewc": to_dict(cfg), "device": device or "auto",
                "data": {"root": str(data_root) if data_root else None}}
    result: dict = {}
    status = run_once(run_dir, resolved, LEWC_OUTPUTS, lambda: result.update(lewc_checkpoints(
        a, b, cfg, run_dir, perm_path=perm, b_permuted_path=b_permuted, norm_fix=norm_fix,
        device=device or "auto", data_root=data_root)), force=force, marker="lewc.json")
    if not step_ran(run_dir, status):
        return
    s = result["settings"]
    console.print(f"{'π(B)' if s['permuted'] else 'B (no permutation)'}, norm fix {s['norm_fix']}, "
                  f"{s['samples']} test images; {s['lambda_convention']}", markup=False)
    for layer in result["layers"]:
        cells = "  ".join(f"λ={e['lambda']:g}: LEWC {e['cos_lewc']:.3f} / LLFC {e['cos_llfc']:.3f}"
                          for e in layer["lambdas"])
        console.print(f"ℓ={layer['index']} {layer['name']}: cos {cells}", markup=False)
    console.print(f"{run_dir}: lewc.json, lewc.csv, lewc_cosine.png, lewc_coefficients.png", markup=False)
