"""`lmcx lewc`: is the merged model's layer output LEWC's or LLFC's combination of A's and B's?"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import LewcConfig
from .app import (BPermutedOption, ConfigOption, DataRootOption, DeviceOption, ForceOption, ModelAOption, PermOption,
                  app, key_default, out_option, overrides, set_option, step_ran)


@app.command("lewc")
def lewc(
    a: ModelAOption,
    b: Annotated[Path, typer.Option("--b", help="Model B (used as trained unless --perm / --b-permuted).")],
    perm: PermOption = None,
    b_permuted: BPermutedOption = None,
    lambda_: Annotated[Optional[list[float]], typer.Option(
        "--lambda", show_default=key_default(LewcConfig, "lambdas"),
        help="λ of θ(λ) = (1−λ)θ_A + λθ_B (repeatable).")] = None,
    samples: Annotated[Optional[int], typer.Option(
        "--samples", show_default=key_default(LewcConfig, "samples"), help="The first N test images.")] = None,
    norm_fix: Annotated[str, typer.Option("--norm-fix", help="auto | reset | repair | none (auto: reset for BN).")] = "auto",
    config: ConfigOption = None,
    set_: set_option("batch_size=100") = None,
    out: out_option("outputs/lewc/<A-B>-<naive | permuted>-<hash>") = None,
    device: DeviceOption = None,
    data_root: DataRootOption = None,
    force: ForceOption = False,
) -> None:
    """LEWC vs LLFC ([B]): for every layer ℓ and λ, cosine similarity and relative error of the merged
    model's output f_ℓ(θ(λ)) against (1−λ)^ℓ f_ℓ(A) + λ^ℓ f_ℓ(B) (LEWC) and (1−λ) f_ℓ(A) + λ f_ℓ(B)
    (LLFC), fitted (α, β), reciprocal orthogonality and weak additivity.

    Writes lewc.csv, lewc_cosine.png, lewc_coefficients.png and lewc.json (last). A config file holds
    LewcConfig keys (lambdas, samples, batch_size, norm_fix_batches, norm_fix_batch_size).

    Examples, with the models of the README's train and match examples:

    \b
    lmcx lewc --a runs/s0 --b runs/s1
    lmcx lewc --a runs/s0 --b runs/s1 --perm runs/wm/permutation.json --lambda 0.5
    """
    from ..config import load_config, to_dict
    from ..threads import apply_config

    cfg = load_config(LewcConfig, config, overrides({"lambdas": list(lambda_) if lambda_ else None,
                                                     "samples": samples}, set_))

    apply_config(cfg.threads)  # the config's `threads` key, ranked by lmcx/threads.py
    from ..analysis.lewc_run import LEWC_OUTPUTS, lewc_checkpoints  # only now: torch loads here
    from ..analysis.pair import check_permutation_source
    from ..console import console
    from ..interpolate import check_norm_fix
    from ..names import lewc_dir
    from ..rundir import run_once

    check_permutation_source(perm, b_permuted)  # before run_once creates the run directory
    check_norm_fix(norm_fix, "--norm-fix")
    permuted = perm is not None or b_permuted is not None
    resolved = {"a": str(a), "b": str(b), "perm": str(perm) if perm else None,
                "b_permuted": str(b_permuted) if b_permuted else None, "norm_fix": norm_fix,
                "lewc": to_dict(cfg), "device": device or "auto",
                "data": {"root": str(data_root) if data_root else None}}
    run_dir = out or lewc_dir(a, b, permuted, resolved)
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
