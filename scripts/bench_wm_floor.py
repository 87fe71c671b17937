"""Where lmcx's weight matching spends its time, and how far it is from its floor.

    python scripts/bench_wm_floor.py                       # MLP x4 and ResNet-20 x8, random init
    python scripts/bench_wm_floor.py --trained             # + two digits MLPs x4 trained briefly (a minute or two)
    python scripts/bench_wm_floor.py --orders 4            # + best of 4 random sweep orders (seeds 0..3)
    python scripts/bench_wm_floor.py --models mlp:1 resnet20:2 --quick-probe

Nothing in lmcx is changed: the script wraps, for one call of `weight_matching`, its cost matrices
(`wm_costs.Costs.matrix`: timed; FLOPs counted as if every cost matrix were computed from scratch,
2·n²·fan for each term used, and as computed: a permutation's constant terms are computed once), its
float64 work (exact gains of candidates too close to call from the cost matrix, and the exact
objective: timed), scipy's `linear_sum_assignment` (timed per solve, on the real cost matrices) and
the search's steps (which sweep a solve belongs to, the forward start being sweep 1; which candidates
were accepted). With one
thread (the default) every time is process CPU time, which other processes' load barely inflates;
with more, wall clock. A matmul probe measures this machine's float32 GFLOP/s at the model's largest
cost-matrix shape (one thread by default), and

    floor = Σ_sizes LAP s/solve × solves + cost-matrix FLOPs / GFLOP/s

i.e. what the same solves would cost with nothing around them; `WM / floor` is how close the
implementation is to it (target <= 1.5 for MLP x4 and ResNet-20 x8). The call and the probe alternate
`--repeats` times (the machine's speed drifts between seconds); the details are the first call's. The per-sweep table shows how many
permutations were solved, how many solves changed the assignment (and were accepted), and how many
units moved: solves that return the current assignment are the first thing to cut.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IN_SHAPES = {"mlp": (1, 28, 28), "resnet20": (3, 32, 32), "vgg11": (3, 32, 32)}
clock = time.process_time  # one thread: CPU time; main() switches to wall clock for more


class Recorder:
    """Wraps weight_matching's pieces for one call and records what they did."""

    def __init__(self, wm, spec):
        import scipy.optimize

        self.wm, self.spec, self.scipy = wm, spec, scipy.optimize
        self.cost_s = self.gain_s = self.lap_s = 0.0
        self.flops = 0  # of every cost matrix computed from scratch: what the floor counts
        self.done_flops = 0  # of the products computed (the constant terms of each p are computed once)
        self.solves: list[dict] = []  # one per LAP: size, seconds, sweep (0: the forward start)
        self.candidates: list[dict] = []  # assignments that differed from the current one: sweep, units moved, accepted
        self.forward_moved = 0

    def __enter__(self):
        wm, rec = self.wm, self
        search, costs = wm._Search, wm.Costs
        self.orig = (costs.matrix, wm.exact_gain, search.exact_objective, self.scipy.linear_sum_assignment,
                     search.solve, search.estimate, search.improve, search.forward)
        o_matrix, o_gain, o_objective, o_lap, o_solve, o_estimate, o_improve, o_forward = self.orig

        def matrix(self_, p, perm, use=None):
            t, done = clock(), self_.flops
            out = o_matrix(self_, p, perm, use)
            rec.cost_s += clock() - t
            n = self_.sizes[p]
            rec.flops += sum(2 * n * n * term.fan for term in self_.terms[p] if use is None or use(term) or not term.others)
            rec.done_flops += self_.flops - done
            return out

        def timed(fn):
            def wrapped(*args, **kwargs):
                t = clock()
                out = fn(*args, **kwargs)
                rec.gain_s += clock() - t
                return out
            return wrapped

        def lap(cost, maximize=False):
            t = clock()
            out = o_lap(cost, maximize=maximize)
            rec.solves[-1]["s"] = clock() - t
            rec.lap_s += rec.solves[-1]["s"]
            return out

        def solve(self_, p, cost):
            rec.solves.append({"n": cost.shape[0], "s": 0.0, "sweep": self_.iterations - 1})
            return o_solve(self_, p, cost)

        def estimate(self_, p, cost_np, rows, new, old):
            rec.candidates.append({"sweep": self_.iterations - 1, "moved": len(rows), "accepted": False})
            return o_estimate(self_, p, cost_np, rows, new, old)

        def improve(self_, p):
            units = o_improve(self_, p)
            if units:
                rec.candidates[-1]["accepted"] = True
            return units

        def forward(self_):
            rec.forward_moved = o_forward(self_)
            return rec.forward_moved

        costs.matrix, wm.exact_gain, search.exact_objective = matrix, timed(o_gain), timed(o_objective)
        self.scipy.linear_sum_assignment = lap
        search.solve, search.estimate, search.improve, search.forward = solve, estimate, improve, forward
        return self

    def __exit__(self, *exc):
        wm, search = self.wm, self.wm._Search
        (wm.Costs.matrix, wm.exact_gain, search.exact_objective, self.scipy.linear_sum_assignment,
         search.solve, search.estimate, search.improve, search.forward) = self.orig


def gflops(n: int, fan: int, repeats: int = 3) -> float:
    """float32 GFLOP/s of an (n x fan) @ (fan x n) product, best of `repeats`."""
    import torch

    x, y = torch.randn(n, fan), torch.randn(n, fan)
    x @ y.T
    best = math.inf
    for _ in range(repeats):
        t = clock()
        x @ y.T
        best = min(best, clock() - t)
    return 2 * n * n * fan / best / 1e9


def random_pair(arch: str, width: float, norm: str):
    import torch

    from lmcx.config import ModelConfig
    from lmcx.models import build_model

    cfg = ModelConfig(arch=arch, width=width, norm=norm)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append({k: v.detach() for k, v in build_model(cfg, IN_SHAPES[arch], 10).state_dict().items()})
    return cfg, states[0], states[1]


def trained_pair(width: float, epochs: int, tmp: Path):
    """Two digits MLPs trained with `lmcx train` (one thread, quiet) for `epochs` epochs."""
    from lmcx.checkpoint import load_checkpoint

    env = {**os.environ, "LMCX_QUIET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    states = []
    for seed in (0, 1):
        out = tmp / f"digits-mlp-w{width:g}-s{seed}"
        subprocess.run([sys.executable, "-m", "lmcx", "--threads", "1", "train", "-c", "configs/digits_mlp.yaml",
                        "--width", str(width), "--seed", str(seed), "--epochs", str(epochs), "--out", str(out)],
                       check=True, env=env, cwd=Path(__file__).resolve().parents[1])
        ckpt = load_checkpoint(out)
        states.append(ckpt.state)
    return ckpt.model, states[0], states[1]


def profile(name: str, cfg, a, b, args) -> None:
    import importlib

    from lmcx.models import permutation_spec
    from lmcx.permutation import apply_permutation, l2_distance, perm_sizes

    wm = importlib.import_module("lmcx.permutation.weight_matching")  # the module (the package exports the function)
    spec = permutation_spec(cfg, IN_SHAPES[cfg.arch], 10)  # a built-in's spec is the same for every input shape
    sizes = perm_sizes(spec, a)
    # the probe at the largest cost-matrix product: the biggest n and its widest fan
    n_big = max(sizes.values())
    fan_big = max(a[k].numel() // n_big for p, n in sizes.items() if n == n_big for k, _ in spec.perm_to_axes[p] if k in a)
    calls = []  # (recorder, result, WM seconds, probe GFLOP/s, floor): the call and the probe alternated
    for _ in range(args.repeats):
        with Recorder(wm, spec) as rec:
            c0 = clock()
            res = wm.weight_matching(spec, a, b, seed=args.seed, tol=args.tol, init_perm=start(args, spec, b))
            total = clock() - c0
        rate = gflops(min(n_big, 1024) if args.quick_probe else n_big, fan_big)
        calls.append((rec, res, total, rate, rec.lap_s + rec.flops / (rate * 1e9)))
    rec, res, total, rate, floor = calls[0]  # the details: the first call
    solves_by_n: dict[int, list[float]] = defaultdict(list)
    for s in rec.solves:
        solves_by_n[s["n"]].append(s["s"])
    lap_floor = rec.lap_s
    flop_floor = rec.flops / (rate * 1e9)
    other = total - rec.cost_s - rec.lap_s - rec.gain_s
    l2 = l2_distance(a, apply_permutation(spec, res.perm, b))[0]
    print(f"\n{name}: {len(spec.names)} permutations, sizes {sorted(set(sizes.values()))}; {res.iterations} sweeps, "
          f"{res.solves} solves, stop: {res.stop}; WM {total:.2f} s ({res.seconds:.2f} s wall); "
          f"L2 {l2_distance(a, b)[0]:.3f} -> {l2:.4f}")
    print(f"  time: cost matrices {rec.cost_s:.2f} s ({rec.cost_s / total:.0%}, {rec.flops / 1e9:.1f} GFLOP from scratch, "
          f"{rec.done_flops / 1e9:.1f} GFLOP computed = {rec.done_flops / 1e9 / max(rec.cost_s, 1e-9):.1f} GFLOP/s), LAP {rec.lap_s:.2f} s ({rec.lap_s / total:.0%}), "
          f"float64 ({res.exact_checks} exact gains, exact objective) {rec.gain_s:.2f} s ({rec.gain_s / total:.0%}), "
          f"other {other:.2f} s ({other / total:.0%})")
    print("  floor: LAP " + " + ".join(f"{statistics.mean(ts) * 1e3:.2f} ms x {len(ts)} (n={n})"
                                      for n, ts in sorted(solves_by_n.items()))
          + f" = {lap_floor:.2f} s; FLOPs {rec.flops / 1e9:.1f} GFLOP / {rate:.1f} GFLOP/s (probe {n_big}x{fan_big}) = "
          f"{flop_floor:.2f} s; floor {floor:.2f} s; WM / floor = {total / floor:.2f}")
    if len(calls) > 1:
        ratios = [c[2] / c[4] for c in calls]
        print(f"  WM / floor over {len(calls)} calls, each followed by its probe: "
              + " ".join(f"{r:.2f}" for r in ratios) + f"; median {statistics.median(ratios):.2f} (WM "
              f"{statistics.median(c[2] for c in calls):.2f} s, floor {statistics.median(c[4] for c in calls):.2f} s; "
              "the first call also pays the process's first touch of its memory)")
    by_sweep: dict[int, dict] = defaultdict(lambda: {"solves": 0, "changed": 0, "accepted": 0, "moved": 0})
    for s in rec.solves:
        by_sweep[s["sweep"]]["solves"] += 1
    for c in rec.candidates:
        row = by_sweep[c["sweep"]]
        row["changed"] += 1
        row["moved"] += c["moved"] if c["accepted"] else 0
        row["accepted"] += c["accepted"]
    if args.start == "forward":  # the forward start: every solve sets its permutation; kept as a whole or not
        by_sweep[0].update(changed="-", accepted="-", moved=rec.forward_moved)
    print("  sweep: solves / changed the assignment / accepted / units moved; objective gain")
    obj = res.objective
    for i in sorted(by_sweep):
        r = by_sweep[i]
        gain = obj[i + 1] - obj[i] if i + 1 < len(obj) else float("nan")
        print(f"    {i + 1:>3}: {r['solves']:>3} / {r['changed']:>3} / {r['accepted']:>3} / {r['moved']:>6}; {gain:+.4g}")
    descent = sum(1 for s in rec.solves if s["sweep"] > 0 or args.start != "forward")
    unchanged = descent - len(rec.candidates)
    print(f"  {unchanged} of the {descent} solves after the start ({unchanged / max(descent, 1):.0%}) returned the "
          "current assignment")
    stopping_rules(res.objective, [by_sweep[i]["solves"] for i in sorted(by_sweep)], wm.matchable_params(spec, a, b), a, b)
    if args.orders > 1:
        rows = []
        for seed in range(args.orders):
            t = clock()
            r = wm.weight_matching(spec, a, b, seed=seed, tol=args.tol, init_perm=start(args, spec, b))
            rows.append((seed, r.iterations, r.solves, clock() - t, l2_distance(a, apply_permutation(spec, r.perm, b))[0]))
        best = min(rows, key=lambda r: r[4])
        print("  sweep orders: " + "; ".join(f"seed {s}: {it} sweeps, {so} solves, {sec:.2f} s, L2 {d:.4f}"
                                             for s, it, so, sec, d in rows))
        print(f"  best of {args.orders}: seed {best[0]}, L2 {best[4]:.4f} ({(best[4] - rows[0][4]) / rows[0][4]:+.3%} vs seed 0) "
              f"for {sum(r[3] for r in rows) / rows[0][3]:.1f}x the time")


def start(args, spec, b):
    """init_perm for --start: None (the forward start) or the identity."""
    from lmcx.permutation import identity_permutation

    return None if args.start == "forward" else identity_permutation(spec, b)


def stopping_rules(objective: list[float], solves: list[int], keys: list[str], a, b) -> None:
    """What stopping after the first sweep that gains less than tol x the objective would have cost and saved.

    ||θ_A − π(θ_B)||² = ||θ_A||² + ||θ_B||² − 2·objective over the matched entries, so the L2 after every
    sweep follows from the objective without re-running anything.
    """
    norms = math.fsum(float(a[k].double().square().sum() + b[k].double().square().sum()) for k in keys)
    l2 = [math.sqrt(max(norms - 2 * o, 0.0)) for o in objective]  # l2[i]: after sweep i (0: start)
    cum = [sum(solves[:i]) for i in range(len(solves) + 1)]
    final = l2[-1]
    parts = []
    for tol in (1e-3, 1e-4, 1e-5):
        stop = next((i for i in range(1, len(objective)) if objective[i] - objective[i - 1] < tol * abs(objective[i])),
                    len(objective) - 1)
        stop = min(stop, len(cum) - 1)
        parts.append(f"tol {tol:g}: stop after sweep {stop}, {cum[stop]} of {cum[-1]} solves, L2 {l2[stop]:.4f} "
                     f"({(l2[stop] - final) / final:+.3%})")
    print("  stopping at a relative gain below tol (L2 over matched entries, vs running to the end): " + "; ".join(parts))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp:4", "resnet20:8"], help="arch:width, random init")
    ap.add_argument("--mlp-norm", default="none", choices=["none", "bn", "ln"])
    ap.add_argument("--trained", action="store_true", help="also two digits MLPs trained briefly")
    ap.add_argument("--trained-width", type=float, default=4)
    ap.add_argument("--trained-epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="calls of weight_matching, each followed by the probe")
    ap.add_argument("--orders", type=int, default=1, help="also run this many sweep orders (seeds) and keep the best")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=None, help="weight_matching's tol (default: its own, TOL)")
    ap.add_argument("--start", choices=["forward", "identity"], default="forward",
                    help="forward: weight_matching's own start; identity: init_perm = the identity")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick-probe", action="store_true", help="probe GFLOP/s at n <= 1024 (faster, less exact)")
    args = ap.parse_args(argv)

    import torch

    from lmcx.permutation.weight_matching import TOL

    if args.tol is None:
        args.tol = TOL

    global clock
    torch.set_num_threads(args.threads)
    if args.threads != 1:
        clock = time.perf_counter
    load0 = os.getloadavg()
    print(f"weight matching floor; start {args.start}, tol {args.tol:g}; torch {torch.__version__}, "
          f"{args.threads} thread(s), seconds are "
          f"{'CPU time' if args.threads == 1 else 'wall clock'}; load "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    cfg0, w0a, w0b = random_pair("mlp", 0.25, "none")
    _warm(cfg0, w0a, w0b)
    for spec_text in args.models:
        arch, width = spec_text.split(":")
        cfg, a, b = random_pair(arch, float(width), args.mlp_norm if arch == "mlp" else "bn")
        profile(f"{arch} x{float(width):g} ({cfg.norm}), random init", cfg, a, b, args)
    if args.trained:
        with tempfile.TemporaryDirectory(prefix="lmcx-wm-floor-") as tmp:
            cfg, a, b = trained_pair(args.trained_width, args.trained_epochs, Path(tmp))
            profile(f"digits mlp x{args.trained_width:g}, trained {args.trained_epochs} epochs", cfg, a, b, args)
    load1 = os.getloadavg()
    print(f"\nload at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


def _warm(cfg, a, b) -> None:
    """One small call first: one-off imports and set-up stay out of the figures."""
    from lmcx.models import permutation_spec
    from lmcx.permutation import weight_matching

    weight_matching(permutation_spec(cfg, IN_SHAPES[cfg.arch], 10), a, b, max_iter=2)


if __name__ == "__main__":
    main()
