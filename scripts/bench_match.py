"""Time weight matching between two independently initialised models at several widths.

    python scripts/bench_match.py                         # ResNet-20 (BN), widths 1 4 16, CPU
    python scripts/bench_match.py --arch mlp --widths 1 4 16
    python scripts/bench_match.py --device cuda
    python scripts/bench_match.py --sweep                 # growth with width: ResNet-20 and MLP, widths 1 2 4 8 16
    python scripts/bench_match.py --sweep --mlp-max-width 16   # include the 8192-unit MLP (slow on CPU)

Models are freshly initialised, not trained: matching cost depends on the shapes and on how many
sweeps the coordinate descent needs, and trained models may need a different number of sweeps, so
iteration counts (and hence seconds) here are indicative. The LAP share is the part of the time spent in
`scipy.optimize.linear_sum_assignment`, which no faster cost-matrix code can remove. Each width runs in
its own process so that its peak resident memory (ru_maxrss) is its own.

Growth: the `~w^k` column is the exponent k of `seconds ∝ width^k` between a width and the previous
one in the table (the models' parameter count grows as width² for both architectures; one dense
linear assignment of n units costs up to n³, with n ∝ width). `--sweep` runs both architectures over
widths 1 2 4 8 16, the MLP capped by `--mlp-max-width` (default 8 on CPU: at width 16 its three
hidden layers have 8192 units, so every sweep solves three dense 8192×8192 assignments and builds
8192×8192 cost matrices from 2×67M-parameter layers: tens of minutes on a few CPU cores).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IN_SHAPES = {"mlp": (1, 28, 28), "vgg11": (3, 32, 32), "vgg16": (3, 32, 32), "resnet20": (3, 32, 32)}


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def _one(arch: str, norm: str, width: float, device: str, seed: int, max_iter: int, threads: int | None,
         warmup: bool) -> dict:
    import torch

    from lmcx.config import ModelConfig
    from lmcx.models import build_model, permutation_spec
    from lmcx.permutation import apply_permutation, l2_distance, perm_sizes, random_permutation, weight_matching

    if threads:
        torch.set_num_threads(threads)
    cfg = ModelConfig(arch=arch, width=width, norm=norm)
    spec = permutation_spec(cfg, IN_SHAPES[arch], 10)
    states = []
    for s in (seed, seed + 1):
        torch.manual_seed(s)
        net = build_model(cfg, IN_SHAPES[arch], 10).to(device)
        states.append({k: v.detach() for k, v in net.state_dict().items()})
        del net
    a, b = states
    n_params = sum(v.numel() for v in a.values() if v.is_floating_point())
    biggest = max(perm_sizes(spec, a).values())
    if warmup:  # first torch/scipy calls in a fresh process pay ~1 s of one-off set-up; keep it out of the figures
        small = ModelConfig(arch=arch, width=0.25, norm=norm)
        torch.manual_seed(seed)
        w0 = {k: v.detach() for k, v in build_model(small, IN_SHAPES[arch], 10).to(device).state_dict().items()}
        small_spec = permutation_spec(small, IN_SHAPES[arch], 10)
        weight_matching(small_spec, w0, apply_permutation(small_spec, random_permutation(small_spec, w0, seed), w0),
                        max_iter=2)
    rss_models = _peak_rss_mib()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    res = weight_matching(spec, a, b, max_iter=max_iter, seed=seed)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    before = l2_distance(a, b)[0]
    after = l2_distance(a, apply_permutation(spec, res.perm, b))[0]
    return dict(width=width, params=n_params, perms=len(spec.names), biggest=biggest, seconds=res.seconds, cpu=cpu_seconds,
                iterations=res.iterations, solves=res.solves, lap=res.lap_seconds, converged=res.converged,
                rss_models=rss_models, rss_peak=_peak_rss_mib(), gpu_peak=gpu_peak,
                l2_before=before, l2_after=after, threads=torch.get_num_threads())


SWEEP_WIDTHS = [1, 2, 4, 8, 16]


def _table(arch: str, norm: str, widths: list[float], args) -> list[dict]:
    """Benchmark `arch` at each width (one fresh process per width) and print one row per width."""
    print(f"weight matching: {arch} (norm {norm}), random init (untrained), device {args.device}, "
          f"seed {args.seed}, max_iter {args.max_iter}, {'cold (no warm-up)' if args.no_warmup else 'after a warm-up call'}")
    header = (f"{'width':>6} {'params':>11} {'max n':>6} {'seconds':>8} {'~w^k':>5} {'CPU s':>7} {'sweeps':>6} {'solves':>6} "
              f"{'LAP s':>7} {'LAP %':>6} {'RSS models MiB':>14} {'RSS peak MiB':>12}"
              f"{'  GPU peak MiB' if args.device.startswith('cuda') else ''} {'L2 before':>10} {'L2 after':>10}")
    print(header)
    print("-" * len(header))
    ctx = mp.get_context("spawn")
    rows: list[dict] = []
    for w in widths:
        with ctx.Pool(1) as pool:
            r = pool.apply(_one, (arch, norm, w, args.device, args.seed, args.max_iter, args.threads,
                                  not args.no_warmup))
        prev = rows[-1] if rows else None
        k = (math.log(r["seconds"] / prev["seconds"]) / math.log(w / prev["width"])
             if prev and prev["seconds"] > 0 and w != prev["width"] else None)
        rows.append(r)
        gpu = f" {r['gpu_peak']:13.0f}" if r["gpu_peak"] is not None else ""
        flag = "" if r["converged"] else "  (max_iter reached)"
        growth = f"{k:>5.2f}" if k is not None else f"{'':>5}"
        print(f"{w:>6g} {r['params']:>11,} {r['biggest']:>6} {r['seconds']:>8.2f} {growth} {r['cpu']:>7.2f} {r['iterations']:>6} "
              f"{r['solves']:>6} {r['lap']:>7.2f} {100 * r['lap'] / r['seconds']:>5.1f}% {r['rss_models']:>14.0f} "
              f"{r['rss_peak']:>12.0f}{gpu} {r['l2_before']:>10.2f} {r['l2_after']:>10.2f}{flag}", flush=True)
    if len(rows) >= 2 and rows[-1]["width"] != rows[0]["width"]:
        first, last = rows[0], rows[-1]
        k = math.log(last["seconds"] / first["seconds"]) / math.log(last["width"] / first["width"])
        per_sweep = [r["seconds"] / max(1, r["iterations"]) for r in (first, last)]
        k_sweep = math.log(per_sweep[1] / per_sweep[0]) / math.log(last["width"] / first["width"])
        print(f"growth {arch}: width {first['width']:g} -> {last['width']:g}: seconds x{last['seconds'] / first['seconds']:.1f} "
              f"(~width^{k:.2f}); seconds per sweep ~width^{k_sweep:.2f}; peak RSS {first['rss_peak']:.0f} -> "
              f"{last['rss_peak']:.0f} MiB")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet20", choices=sorted(IN_SHAPES))
    ap.add_argument("--norm", default="bn", choices=["bn", "ln", "none"])
    ap.add_argument("--widths", type=float, nargs="+", default=[1, 4, 16])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="time the very first call in a fresh process (includes ~1 s of one-off torch set-up)")
    ap.add_argument("--sweep", action="store_true",
                    help=f"growth with width: ResNet-20 (--norm) and the MLP at widths {SWEEP_WIDTHS} "
                         "(ignores --arch and --widths)")
    ap.add_argument("--mlp-max-width", type=float, default=None,
                    help="with --sweep: largest MLP width (default 8 on CPU, 16 on CUDA)")
    args = ap.parse_args(argv)

    if args.sweep:
        cap = args.mlp_max_width if args.mlp_max_width is not None else (16 if args.device.startswith("cuda") else 8)
        mlp_widths = [w for w in SWEEP_WIDTHS if w <= cap]
        rows = _table("resnet20", args.norm, SWEEP_WIDTHS, args)
        print()
        if len(mlp_widths) < len(SWEEP_WIDTHS):
            skipped = [w for w in SWEEP_WIDTHS if w > cap]
            print(f"MLP widths {skipped} skipped (--mlp-max-width {cap:g}): at width 16 the MLP's hidden layers have "
                  "8192 units, so each sweep solves three dense 8192x8192 assignments (O(n^3) in scipy) and multiplies "
                  "8192x8192 layers twice over 141M-parameter models; that takes tens of minutes on a few CPU cores. "
                  "Pass --mlp-max-width 16 to run it anyway (or use --device cuda for the cost matrices).")
        rows += _table("mlp", args.norm, mlp_widths, args)
    else:
        rows = _table(args.arch, args.norm, args.widths, args)
    threads = rows[-1]["threads"] if rows else None
    print(f"(torch threads: {threads}; 'seconds' = wall clock of weight_matching, '~w^k' = exponent k of seconds ~ width^k "
          "against the previous row, 'CPU s' = its user+system CPU time "
          "(wall >> CPU/threads means other processes were competing for the cores); 'sweeps' = coordinate-descent sweeps incl. the final non-improving one; "
          "'solves' = linear assignments actually solved; RSS = process peak resident memory, "
          "'models' = after building both models, before matching; L2 over all floating entries incl. BN running stats)")


if __name__ == "__main__":
    main()
