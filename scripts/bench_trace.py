"""Time tracing a permutation spec (trace_unchecked) and checking it (check_spec) on torchvision models.

    OMP_NUM_THREADS=1 python scripts/bench_trace.py                        # resnet50, resnet18, mobilenet_v2
    python scripts/bench_trace.py --models resnet50 vit_b_16 --size 32 --batch 2

Models are freshly initialised (weights=None, 10 classes); inputs are one random batch. Each model is
traced and checked --repeat times and the fastest time is shown, after one untimed warm-up run of the
whole pipeline (first calls pay for lazy imports and allocator growth); wall-clock and process CPU
times are both shown, and the load average at the start and the end. The trace runs the graph
once per training mode that gives a different graph; the check copies the model in float64 and runs
it four times (eval and train, unpermuted and permuted), so it grows with the parameter count.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


CLOCKS = (time.perf_counter, time.process_time)  # wall clock, and process CPU time (barely moved by others' load)


def main() -> None:
    import torch
    import torchvision

    from lmcx.permutation import check_spec
    from lmcx.permutation.trace import trace_unchecked

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet18", "mobilenet_v2"])
    parser.add_argument("--size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    load = os.getloadavg()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} thread(s), "
          f"input {args.batch}x3x{args.size}x{args.size}, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for name in args.models:
        kwargs = {"image_size": args.size} if name.startswith("vit") else {}
        model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        check_spec(model, trace_unchecked(model, x), x)  # warm-up
        best = {clock: [float("inf"), float("inf")] for clock in CLOCKS}
        for _ in range(args.repeat):
            t0 = {clock: clock() for clock in CLOCKS}
            spec = trace_unchecked(model, x)
            t1 = {clock: clock() for clock in CLOCKS}
            coverage = check_spec(model, spec, x)
            for clock in CLOCKS:
                t2 = clock()
                best[clock] = [min(best[clock][0], t1[clock] - t0[clock]), min(best[clock][1], t2 - t1[clock])]
        params = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
        print(f"\n{name} ({params / 1e6:.1f}M parameters): " + "; ".join(
            f"{label}: trace {best[clock][0]:.2f} s, check {best[clock][1]:.2f} s, total {sum(best[clock]):.2f} s"
            for label, clock in zip(("wall", "CPU"), CLOCKS)))
        print(coverage.summary())
    load = os.getloadavg()
    print(f"\nload at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
