"""lmcx's weight matching against the pip library `rebasin` (Git Re-Basin's weight matching on any
nn.Module, traced with torchview), on the same lmcx models.

    python scripts/bench_peers.py                        # MLP widths 1-4, ResNet-20 widths 1 2 4 8
    python scripts/bench_peers.py --quick                # MLP width 1, ResNet-20 width 1
    python scripts/bench_peers.py --mlp-widths 1 2 --resnet-widths 1 --repeats 3

rebasin is optional. Install it without touching torch (it pulls in torch otherwise):

    pip install --no-deps rebasin torchview graphviz tqdm
    # or into a folder of its own:  pip install --no-deps --target /tmp/peers rebasin torchview graphviz tqdm
    #                               PYTHONPATH=/tmp/peers python scripts/bench_peers.py

Without it the script says so and exits 0.

For each model: two independently initialised copies (seeds 0 and 1; MLP on 1x28x28 inputs, norm
--mlp-norm, default none; ResNet-20 on 3x32x32 with BatchNorm); then lmcx and rebasin alternately
(lmcx, rebasin, lmcx, ...) `--repeats` times each, one torch thread, by process CPU time
(`time.process_time`, which other processes' load barely inflates) and wall clock, medians:
  lmcx     permutation_spec (traced from the model) + weight_matching (over the trainable parameters,
           as `lmcx match` by default) + apply_permutation
  rebasin  PermutationCoordinateDescent(A, B, x) (traces both models) + .rebasin() (coordinate
           descent, then permutes B in place); its own seed: torch.manual_seed(seed) before each run
Reported: CPU-time ratio rebasin / lmcx (> 1: lmcx faster), the tracing share of rebasin's time, L2
||θ_A − π(θ_B)|| after matching over the model's parameters and over every floating state-dict entry
(BN running statistics included: lmcx matches those too; each model's statistics come from three
training-mode forwards of random batches, so that they differ per channel), lower is better, and whether π(B) computes B's
function in eval mode (max |π(B)(x) − B(x)| on 256 random inputs, relative to max |B(x)|, < 1e-5).
Acceptance (issue 13): lmcx >= 5x rebasin by CPU time on every model, L2 no worse by more than 0.5 %
on average, BN models exact in eval mode.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IN_SHAPES = {"mlp": (1, 28, 28), "resnet20": (3, 32, 32)}
INSTALL = "pip install --no-deps rebasin torchview graphviz tqdm"


def have_rebasin() -> str | None:
    """None if rebasin imports, else why not."""
    try:
        import rebasin  # noqa: F401
    except Exception as e:  # ImportError, or one of its own imports failing
        return f"{type(e).__name__}: {e}"
    return None


def build_pair(arch: str, width: float, norm: str):
    import torch

    from lmcx.config import ModelConfig
    from lmcx.models import build_model

    cfg = ModelConfig(arch=arch, width=width, norm=norm)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(cfg, IN_SHAPES[arch], 10)
        with torch.no_grad():  # BatchNorm running statistics of each model's own, so that eval mode tests them
            for _ in range(3):
                model.train()(torch.randn(64, *IN_SHAPES[arch]))
        models.append(model.eval())
    return cfg, models[0], models[1]


def run_lmcx(cfg, a, b, seed: int):
    from lmcx.models import permutation_spec
    from lmcx.permutation import apply_permutation, weight_matching

    spec = permutation_spec(cfg, IN_SHAPES[cfg.arch], 10)
    sa, sb = a.state_dict(), b.state_dict()
    # the objective of `lmcx match` (match.wm_objective: params) and of rebasin: the trainable parameters
    res = weight_matching(spec, sa, sb, seed=seed, keys={k for k, _ in a.named_parameters()})
    permuted = copy.deepcopy(b)
    permuted.load_state_dict(apply_permutation(spec, res.perm, sb))
    return permuted, {"sweeps": res.iterations, "solves": res.solves}


def run_rebasin(a, b, example, seed: int):
    import torch
    from rebasin import PermutationCoordinateDescent

    permuted = copy.deepcopy(b)
    torch.manual_seed(seed)
    t0 = time.process_time()
    pcd = PermutationCoordinateDescent(a, permuted, example, logging_level=logging.ERROR)
    trace_cpu = time.process_time() - t0
    pcd.rebasin()
    return permuted.eval(), {"trace_cpu": trace_cpu}


def l2(a, b, params_only: bool) -> float:
    from lmcx.permutation import l2_distance

    keys = [k for k, _ in a.named_parameters()] if params_only else None
    return l2_distance(a.state_dict(), b.state_dict(), keys)[0]


def same_function(b, permuted, arch: str) -> float:
    import torch

    x = torch.randn(256, *IN_SHAPES[arch], generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref, out = b.eval()(x), permuted.eval()(x)
    return ((out - ref).abs().max() / ref.abs().max()).item()


def bench(arch: str, width: float, norm: str, repeats: int, seed: int) -> dict:
    import torch

    cfg, a, b = build_pair(arch, width, norm)
    example = torch.randn(1, *IN_SHAPES[arch])
    times: dict[str, list[tuple[float, float]]] = {"lmcx": [], "rebasin": []}
    out: dict[str, dict] = {}
    for _ in range(repeats):
        for name in ("lmcx", "rebasin"):
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                permuted, extra = run_lmcx(cfg, a, b, seed) if name == "lmcx" else run_rebasin(a, b, example, seed)
            except Exception as e:  # a peer that cannot handle a model is a result, not a crash
                out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}
                continue
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))
            out[name] = {**extra, "l2": l2(a, permuted, True), "l2_all": l2(a, permuted, False),
                         "function": same_function(b, permuted, arch)}
    for name, ts in times.items():
        if ts:
            out[name]["cpu"] = statistics.median(t[0] for t in ts)
            out[name]["wall"] = statistics.median(t[1] for t in ts)
    out["l2_before"] = l2(a, b, True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlp-widths", type=float, nargs="*", default=[1, 2, 3, 4])
    ap.add_argument("--resnet-widths", type=float, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--mlp-norm", default="none", choices=["none", "bn", "ln"])
    ap.add_argument("--repeats", type=int, default=2, help="alternated runs of each side per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="MLP width 1 and ResNet-20 width 1, one run each")
    args = ap.parse_args(argv)
    if args.quick:
        args.mlp_widths, args.resnet_widths, args.repeats = [1], [1], 1

    missing = have_rebasin()
    if missing:
        print(f"rebasin is not installed ({missing}); skipping. To compare, install it without touching "
              f"torch:\n    {INSTALL}")
        return
    import rebasin  # noqa: F401
    import torch
    from importlib.metadata import version

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(f"lmcx weight matching vs rebasin {version('rebasin')}; torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.repeats} alternated run(s) each, medians; load {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    head = (f"{'model':<16} {'lmcx CPU s':>10} {'rebasin CPU s':>13} {'(trace)':>8} {'ratio':>6} {'L2 before':>9} "
            f"{'L2 lmcx':>9} {'L2 rebasin':>10} {'L2 diff':>8} {'L2all lmcx':>10} {'L2all rb':>9} "
            f"{'fn lmcx':>8} {'fn rebasin':>10}")
    print(head)
    print("-" * len(head))
    for arch in ("mlp", "resnet20"):  # warm-up, untimed: one-off imports and set-up of both sides (tracing too)
        bench(arch, 0.25 if arch == "mlp" else 0.5, "bn", 1, args.seed)
    models = [("mlp", w, args.mlp_norm) for w in args.mlp_widths] + [("resnet20", w, "bn") for w in args.resnet_widths]
    ratios, l2_diffs = [], []
    for arch, width, norm in models:
        r = bench(arch, width, norm, args.repeats, args.seed)
        lm, rb = r["lmcx"], r["rebasin"]
        name = f"{arch} x{width:g} ({norm})"
        if "error" in lm or "error" in rb:
            print(f"{name:<16} lmcx: {lm.get('error', 'ok')}; rebasin: {rb.get('error', 'ok')}", flush=True)
            continue
        ratio = rb["cpu"] / lm["cpu"]
        diff = (lm["l2"] - rb["l2"]) / rb["l2"]
        ratios.append(ratio)
        l2_diffs.append(diff)

        def fn(v: float) -> str:
            return f"{'exact' if v < 1e-5 else 'NO'} {v:.0e}"

        print(f"{name:<16} {lm['cpu']:>10.3f} {rb['cpu']:>13.3f} {rb['trace_cpu'] / rb['cpu']:>7.0%} {ratio:>6.2f} "
              f"{r['l2_before']:>9.3f} {lm['l2']:>9.3f} {rb['l2']:>10.3f} {diff:>+8.2%} {lm['l2_all']:>10.3f} "
              f"{rb['l2_all']:>9.3f} {fn(lm['function']):>8} {fn(rb['function']):>10}", flush=True)
    load1 = os.getloadavg()
    print(f"load at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print("ratio: rebasin CPU s / lmcx CPU s (> 1: lmcx faster); (trace): rebasin's share spent tracing; L2 over "
          "parameters (L2all: every floating state-dict entry), lower is better; L2 diff: (lmcx - rebasin) / rebasin; "
          "fn: max |pi(B)(x) - B(x)| / max |B(x)| in eval mode")
    if ratios:
        print(f"lmcx speed-up by CPU time: min {min(ratios):.2f}x (target >= 5); mean L2 diff "
              f"{statistics.mean(l2_diffs):+.2%} (target <= +0.5 %)")


if __name__ == "__main__":
    main()
