"""Time interpolation curves against bare evaluation, the norm-fix passes, and calibration from cache.

    python scripts/bench_interpolate.py                       # MLP on MNIST-sized data, ResNet-20 x1 on CIFAR-sized
    python scripts/bench_interpolate.py --arch mlp --points 25 --test-size 10000 --train-eval-size 5000
    python scripts/bench_interpolate.py --arch resnet20 --device cuda

What is timed, per architecture (two freshly initialised models, synthetic images of the real shape:
the cost of a forward pass does not depend on training):

  curve (none)   `evaluate_curves` with norm fix none: a `--points` grid, test split + training subset,
                 every logits tensor kept (θ(0) is shared between B's, but with one B nothing is saved)
  bare loops     `--points` plain evaluation loops (`predict`) of one model over the same two splits:
                 the floor any curve has to pay. Target: curve / bare <= 1.2.
  reset, repair  the norm fix's own time inside a curve (BN reset for BN models; REPAIR, including its
                 endpoint statistics, for every model), total and per λ, and the whole curve with it
  calibration    fitting T for every λ on cached calibration-split logits plus the calibrated losses on
                 test and train: no forward pass; compared with the curve time

Each timing is the best of `--repeats` runs (the machine may be shared; bare loops and the plain curve
are run alternately). Prints one table per architecture.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {  # (in_shape, norm, test images, train-eval images, calibration images)
    "mlp": ((1, 28, 28), "none", 10000, 5000, 5000),
    "resnet20": ((3, 32, 32), "bn", 10000, 5000, 5000),
}


def _timed(fn, repeats: int, sync) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench(arch: str, args) -> list[tuple[str, str, str]]:
    import torch

    from lmcx.config import DataConfig, ModelConfig, SyntheticConfig
    from lmcx.data import load_dataset
    from lmcx.interpolate import evaluate_curves, fit_temperatures, summarize
    from lmcx.models import build_model
    from lmcx.train import predict, resolve_device

    in_shape, norm, test_size, train_eval, calib = PRESETS[arch]
    test_size = args.test_size or test_size
    train_eval = args.train_eval_size or train_eval
    calib = args.calib_size or calib
    device = resolve_device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fix_images = args.norm_fix_batches * args.norm_fix_batch_size
    data = DataConfig(name="synthetic", calib_size=calib, synthetic=SyntheticConfig(
        train_size=calib + max(train_eval, fix_images), test_size=test_size, num_classes=10, shape=list(in_shape)))
    ds = load_dataset(data, device)
    cfg = ModelConfig(arch=arch, width=args.width, norm=norm)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(cfg, in_shape, 10).to(device).eval())
    a, b = models
    lambdas = [i / (args.points - 1) for i in range(args.points)]
    splits = {"test": (ds.x_test, ds.y_test), "train": (ds.x_train[:train_eval], ds.y_train[:train_eval])}
    images = args.points * (test_size + train_eval)
    kw = dict(norm_fix_batches=args.norm_fix_batches, norm_fix_batch_size=args.norm_fix_batch_size,
              eval_batch_size=args.eval_batch_size, precision=args.precision)

    predict(a, ds, ds.x_test[: args.eval_batch_size], args.eval_batch_size, args.precision)  # warm-up

    def bare():
        for _ in lambdas:
            for x, _y in splits.values():
                predict(a, ds, x, args.eval_batch_size, args.precision)

    def curve(fix, use_splits=splits):
        return evaluate_curves(a, {"b": b}, ds, lambdas, fix, use_splits, **kw)

    rows: list[tuple[str, str, str]] = []
    t_bare = t_curve = float("inf")
    for _ in range(args.repeats):  # interleaved, so that a change in background load hits both alike
        t_bare = min(t_bare, _timed(bare, 1, sync)[0])
        t_curve = min(t_curve, _timed(lambda: curve("none"), 1, sync)[0])
    rows.append((f"{args.points} bare evaluation loops", f"{t_bare:.3f} s",
                 f"{images / t_bare:,.0f} images/s"))
    rows.append((f"{args.points}-point curve, norm fix none", f"{t_curve:.3f} s",
                 f"{t_curve / t_bare:.3f} x bare (target <= 1.2)"))
    fixes = (["reset"] if norm == "bn" else []) + ["repair"]
    for fix in fixes:
        t_fix_curve, curves = _timed(lambda: curve(fix), args.repeats, sync)
        t_fix = curves.timing["norm_fix_seconds"]
        rows.append((f"{args.points}-point curve, norm fix {fix}", f"{t_fix_curve:.3f} s",
                     f"{t_fix_curve / t_bare:.3f} x bare"))
        rows.append((f"  of which {fix} passes ({args.norm_fix_batches} x {args.norm_fix_batch_size} images)",
                     f"{t_fix:.3f} s", f"{1000 * t_fix / args.points:.1f} ms per λ; "
                                      f"{t_fix / t_fix_curve:.0%} of the curve"))
    # calibration from cached logits: the calib split's logits come with the curve
    with_calib = dict(splits, calib=(ds.x_calib, ds.y_calib))
    curves = curve("none", with_calib)

    def calibrate():
        return summarize(curves, fit_temperatures(curves, "calib"))

    calibrate()  # warm-up: the first call imports scipy.optimize, a one-off cost per process
    t_cal, _ = _timed(calibrate, args.repeats, sync)
    rows.append((f"calibration from cached logits ({args.points} T fits on {calib} images + losses)",
                 f"{t_cal:.3f} s", f"{t_cal / t_curve:.1%} of the curve; no forward pass"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["mlp", "resnet20", "both"], default="both")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--points", type=int, default=25)
    parser.add_argument("--test-size", type=int, default=None, help="test images (default: the real dataset's)")
    parser.add_argument("--train-eval-size", type=int, default=None, help="training images on the curve")
    parser.add_argument("--calib-size", type=int, default=None, help="calibration images")
    parser.add_argument("--norm-fix-batches", type=int, default=10)
    parser.add_argument("--norm-fix-batch-size", type=int, default=500)
    parser.add_argument("--eval-batch-size", type=int, default=2000)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per timing")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for arch in (["mlp", "resnet20"] if args.arch == "both" else [args.arch]):
        in_shape, norm, test_size, train_eval, calib = PRESETS[arch]
        print(f"\n{arch} x{args.width:g} (norm {norm}), input {list(in_shape)}, "
              f"test {args.test_size or test_size} + train {args.train_eval_size or train_eval} images per λ, "
              f"device {args.device}, {torch.get_num_threads()} CPU thread(s)")
        rows = bench(arch, args)
        w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
        print(f"{'what':<{w0}}  {'time':>{w1}}  ratio / rate")
        for what, t, note in rows:
            print(f"{what:<{w0}}  {t:>{w1}}  {note}")


if __name__ == "__main__":
    main()
