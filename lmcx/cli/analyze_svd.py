"""`lmcx analyze-svd`: singular values, L2 distances and singular-vector alignment of A vs B and π(B)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..config import SvdConfig
from .app import (OFF, BPermutedOption, ConfigOption, DeviceOption, ForceOption, ModelAOption, PermOption, app,
                  key_default, out_option, overrides, set_option, step_ran)


@app.command("analyze-svd")
def analyze_svd(
    a: ModelAOption,
    b: Annotated[Path, typer.Option("--b", help="Model B (as trained).")],
    perm: PermOption = None,
    b_permuted: BPermutedOption = None,
    gamma: Annotated[Optional[list[float]], typer.Option(
        "--gamma", show_default=key_default(SvdConfig, "gammas"),
        help="γ of R(γ): top-k with s_i/s_1 >= γ (repeatable).")] = None,
    weighted: Annotated[bool, typer.Option(
        "--weighted", show_default=OFF, help="Also report the singular-value-weighted R_w(γ).")] = False,
    config: ConfigOption = None,
    set_: set_option("wm_max_iter=50") = None,
    out: out_option("outputs/svd/<A-B>-<hash>") = None,
    device: DeviceOption = None,
    force: ForceOption = False,
) -> None:
    """SVD analysis of weight matching ([A]): per layer weight, singular values of A, B and π(B), L2
    distances A–B and A–π(B), and alignment R(γ) of A's singular vectors with B's and π(B)'s.

    π(B) comes from --perm or --b-permuted; with neither, weight matching (seed svd.wm_seed) is computed
    here. Writes svd.csv, svd_spectra.png, svd_alignment.png and svd.json (last). A config file holds
    SvdConfig keys (gammas, weighted, wm_seed, wm_max_iter).

    Example, with the models of the README's train and match examples:

    \b
    lmcx analyze-svd --a runs/s0 --b runs/s1 --perm runs/wm/permutation.json
    """
    from ..config import load_config, to_dict
    from ..threads import apply_config

    cfg = load_config(SvdConfig, config, overrides({"gammas": list(gamma) if gamma else None,
                                                    "weighted": True if weighted else None}, set_))

    apply_config(cfg.threads)  # the config's `threads` key, ranked by lmcx/threads.py
    from ..analysis.pair import check_permutation_source  # only now: torch loads here, a config error needs none
    from ..analysis.svd import SVD_OUTPUTS, analyze_svd_checkpoints
    from ..console import console
    from ..names import svd_dir
    from ..rundir import run_once

    check_permutation_source(perm, b_permuted)  # before run_once creates the run directory
    resolved = {"a": str(a), "b": str(b), "perm": str(perm) if perm else None,
                "b_permuted": str(b_permuted) if b_permuted else None, "svd": to_dict(cfg),
                "device": device or "auto"}
    run_dir = out or svd_dir(a, b, resolved)
    result: dict = {}
    status = run_once(run_dir, resolved, SVD_OUTPUTS, lambda: result.update(analyze_svd_checkpoints(
        a, b, cfg, run_dir, perm_path=perm, b_permuted_path=b_permuted, device=device or "auto")),
        force=force, marker="svd.json")
    if not step_ran(run_dir, status):
        return
    totals = result["totals"]
    console.print(f"permutation: {result['settings']['permutation']['note']}", markup=False)
    for entry in totals["mean_alignment"]:
        console.print(f"mean R(γ={entry['gamma']:g}): B {entry['naive']:.3f}, π(B) {entry['permuted']:.3f}",
                      markup=False)
    l2 = totals["l2"]["parameters"]
    console.print(f"L2 distance: A–B {l2['a_b']:.4g}, A–π(B) {l2['a_permuted_b']:.4g} "
                  f"({100 * l2['relative_reduction']:.1f}% reduction); "
                  f"max relative singular-value difference B vs π(B) {totals['max_rel_sv_diff']:.2e}", markup=False)
    console.print(f"{run_dir}: svd.json, svd.csv, svd_spectra.png, svd_alignment.png", markup=False)
