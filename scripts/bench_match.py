"""Time weight matching between two independently initialised models at several widths.

    python scripts/bench_match.py                         # ResNet-20 (BN), widths 1 4 16, CPU
    python scripts/bench_match.py --arch mlp --widths 1 4 16
    python scripts/bench_match.py --device cuda

Models are freshly initialised, not trained: matching cost depends on the shapes and on how many
sweeps the coordinate descent needs, and trained models may need a different number of sweeps, so
iteration counts (and hence seconds) here are indicative. The LAP share is the part of the time spent in
`scipy.optimize.linear_sum_assignment`, which no faster cost-matrix code can remove. Each width runs in
its own process so that its peak resident memory (ru_maxrss) is its own.
"""
from __future__ import annotations

import argparse
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
    spec = permutation_spec(cfg)
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
        weight_matching(permutation_spec(small), w0, apply_permutation(permutation_spec(small), random_permutation(
            permutation_spec(small), w0, seed), w0), max_iter=2)
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
    args = ap.parse_args(argv)

    print(f"weight matching: {args.arch} (norm {args.norm}), random init (untrained), device {args.device}, "
          f"seed {args.seed}, max_iter {args.max_iter}, {'cold (no warm-up)' if args.no_warmup else 'after a warm-up call'}")
    header = (f"{'width':>6} {'params':>11} {'max n':>6} {'seconds':>8} {'CPU s':>7} {'sweeps':>6} {'solves':>6} "
              f"{'LAP s':>7} {'LAP %':>6} {'RSS models MiB':>14} {'RSS peak MiB':>12}"
              f"{'  GPU peak MiB' if args.device.startswith('cuda') else ''} {'L2 before':>10} {'L2 after':>10}")
    print(header)
    print("-" * len(header))
    ctx = mp.get_context("spawn")
    threads = None
    for w in args.widths:
        with ctx.Pool(1) as pool:
            r = pool.apply(_one, (args.arch, args.norm, w, args.device, args.seed, args.max_iter, args.threads,
                                      not args.no_warmup))
        threads = r["threads"]
        gpu = f" {r['gpu_peak']:13.0f}" if r["gpu_peak"] is not None else ""
        flag = "" if r["converged"] else "  (max_iter reached)"
        print(f"{w:>6g} {r['params']:>11,} {r['biggest']:>6} {r['seconds']:>8.2f} {r['cpu']:>7.2f} {r['iterations']:>6} {r['solves']:>6} "
              f"{r['lap']:>7.2f} {100 * r['lap'] / r['seconds']:>5.1f}% {r['rss_models']:>14.0f} {r['rss_peak']:>12.0f}"
              f"{gpu} {r['l2_before']:>10.2f} {r['l2_after']:>10.2f}{flag}", flush=True)
    print(f"(torch threads: {threads}; 'seconds' = wall clock of weight_matching, 'CPU s' = its user+system CPU time "
          "(wall >> CPU/threads means other processes were competing for the cores); 'sweeps' = coordinate-descent sweeps incl. the final non-improving one; "
          "'solves' = linear assignments actually solved; RSS = process peak resident memory, "
          "'models' = after building both models, before matching; L2 over all floating entries incl. BN running stats)")


if __name__ == "__main__":
    main()
