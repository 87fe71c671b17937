"""The thread policy, measured: `lmcx train` with the default threads against `--threads 1` and
`--threads <all cores>`, alone and beside 1, 2, 3 CPU-bound busy processes.

    python scripts/bench_threads.py                         # busy 0 1 2 3, 3 repetitions, the config's epochs
    python scripts/bench_threads.py --smoke                 # busy 0 1 2, 1 repetition, 5 epochs (~2 min)
    python scripts/bench_threads.py --config configs/mnist_mlp.yaml --epochs 1 --data-root /tmp/lmcx-data

Each measurement is one whole `python -m lmcx [--threads N] train -c CONFIG --force` in a fresh process
(start-up, data loading and file writes included: what a user waits for), wall clock and the child's
CPU time. The environment is cleaned of OMP_NUM_THREADS, MKL_NUM_THREADS and LMCX_THREADS, so
"default" is lmcx's own policy (lmcx/threads.py; the choice it made is read back from meta.json).
Busy processes are Python spin loops, one core each, started before a block of measurements, bounded
in time and killed at its end. Within a block the three variants are interleaved and their order
rotates every repetition, so a change in the machine's other load hits them alike; medians are
reported. Run it on an otherwise idle machine for figures that mean something: the load average is
printed at the start and end of each block.

Acceptance (issue 13): beside 1-3 busy processes the default is never more than 1.25x slower than
--threads 1, and beside one it takes at most 2.2x its time alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cores() -> int:
    return len(os.sched_getaffinity(0))


def lmcx_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LMCX_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["LMCX_QUIET"] = "1"
    return env


def train_once(threads: str | None, args, out: Path) -> dict:
    """One `lmcx train` run: wall seconds, child CPU seconds and the thread count it used."""
    cmd = [sys.executable, "-m", "lmcx"] + (["--threads", threads] if threads else []) + [
        "train", "-c", args.config, "--out", str(out), "--force"]
    if args.epochs:
        cmd += ["--set", f"train.epochs={args.epochs}"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=lmcx_env(), cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"lmcx train failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    info = json.loads((out / "meta.json").read_text()).get("threads", {})
    return {"wall": wall, "cpu": ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime,
            "threads": info.get("torch_threads", info.get("threads"))}


def block(busy: int, args, variants: dict[str, str | None], tmp: Path) -> dict[str, list[dict]]:
    """Every variant `args.repeats` times, interleaved, beside `busy` spin loops."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=args.spin_limit)]) for _ in range(busy)]
    try:
        time.sleep(1.0 if busy else 0.0)  # let them get going
        start_load = load()
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        names = list(variants)
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                r = train_once(variants[name], args, tmp / f"b{busy}-{name}")
                runs[name].append(r)
                print(f"  busy {busy}, {name:>9}: {r['wall']:6.2f} s wall, {r['cpu']:6.2f} s CPU, "
                      f"{r['threads']} thread(s)", flush=True)
        print(f"  busy {busy}: load {start_load} -> {load()}", flush=True)
        return runs
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/digits_mlp.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the config's)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2, 3], help="numbers of busy processes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spin-limit", type=float, default=1800, help="a busy process ends by itself after this")
    ap.add_argument("--smoke", action="store_true", help="busy 0 1 2, 1 repetition, 5 epochs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.busy, args.repeats, args.epochs = [0, 1, 2], 1, args.epochs or 5
    all_cores = str(cores())
    variants = {"default": None, "threads 1": "1", f"threads {all_cores}": all_cores}
    print(f"lmcx train -c {args.config}" + (f" --set train.epochs={args.epochs}" if args.epochs else "")
          + f"; {cores()} cores; {args.repeats} repetition(s); busy {args.busy}; load {load()}", flush=True)
    results: dict[int, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="lmcx-bench-threads-") as tmp:
        for busy in args.busy:
            results[busy] = block(busy, args, variants, Path(tmp))

    med = {b: {n: statistics.median(r["wall"] for r in runs) for n, runs in res.items()} for b, res in results.items()}
    print(f"\nmedian wall seconds (load at the end {load()})")
    names = list(variants)
    print(f"{'busy':>4}  " + "  ".join(f"{n:>10}" for n in names) + f"  {'default/1':>9}  {'all/1':>6}  "
          f"{'vs alone':>8}  threads chosen by default")
    ok = True
    for b, m in med.items():
        ratio = m["default"] / m["threads 1"]
        alone = m["default"] / med[0]["default"] if 0 in med else None
        chosen = sorted({r["threads"] for r in results[b]["default"]})
        print(f"{b:>4}  " + "  ".join(f"{m[n]:>10.2f}" for n in names) + f"  {ratio:>9.2f}  "
              f"{m[names[2]] / m['threads 1']:>6.2f}  " + (f"{alone:>8.2f}" if alone else f"{'-':>8}") + f"  {chosen}")
        if b >= 1 and ratio > 1.25:
            ok = False
        if b == 1 and alone is not None and alone > 2.2:
            ok = False
    print("acceptance (default <= 1.25 x --threads 1 beside 1-3 busy; <= 2.2 x alone beside 1):",
          "met" if ok else "MISSED")


if __name__ == "__main__":
    main()
