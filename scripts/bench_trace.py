"""Time tracing a permutation spec (trace_unchecked) and checking it (check_spec) on torchvision models.

    OMP_NUM_THREADS=1 python scripts/bench_trace.py                        # resnet50, resnet18, mobilenet_v2
    python scripts/bench_trace.py --models resnet50 vit_b_16 --size 32 --batch 2

Models are freshly initialised (weights=None, 10 classes); inputs are one random batch. Each model is
traced and checked --repeat times and the fastest time is shown, after one untimed warm-up run of the
whole pipeline (first calls pay for lazy imports and allocator growth). The trace runs the graph
once per training mode that gives a different graph; the check copies the model in float64 and runs
it four times (eval and train, unpermuted and permuted), so it grows with the parameter count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} thread(s), "
          f"input {args.batch}x3x{args.size}x{args.size}")
    for name in args.models:
        kwargs = {"image_size": args.size} if name.startswith("vit") else {}
        model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        check_spec(model, trace_unchecked(model, x), x)  # warm-up
        trace_s = check_s = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            spec = trace_unchecked(model, x)
            t1 = time.perf_counter()
            coverage = check_spec(model, spec, x)
            t2 = time.perf_counter()
            trace_s, check_s = min(trace_s, t1 - t0), min(check_s, t2 - t1)
        params = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
        print(f"\n{name} ({params / 1e6:.1f}M parameters): trace {trace_s:.2f} s, check {check_s:.2f} s, "
              f"total {trace_s + check_s:.2f} s")
        print(coverage.summary())


if __name__ == "__main__":
    main()
