"""Time interpolation curves against bare evaluation, the norm-fix passes, and calibration from cache.

    python scripts/bench_interpolate.py                       # MLP on MNIST-sized data, ResNet-20 x1 on CIFAR-sized
    python scripts/bench_interpolate.py --arch mlp --points 25 --test-size 10000 --train-eval-size 5000
    python scripts/bench_interpolate.py --arch resnet20 --device cuda

What is timed, per architecture (two freshly initialised models, synthetic images of the real shape:
the cost of a forward pass does not depend on training):

  curve (none)   `evaluate_curves` with norm fix none: a `--points` grid, test split + training subset,
                 every logits tensor kept (θ(0) is shared between B's, but with one B nothing is saved)
  bare loops     `--points` plain evaluation loops (`predict`) of one model over the same two splits:
                 the floor any curve has to pay. Target: curve / bare <= 1.2. Also, and interleaved with
                 them, the same forwards in a plain PyTorch loop over the splits already normalised to
                 float tensors (what `predict`'s per-batch normalisation of uint8 images costs)
  reset, repair  the whole curve with the norm fix, and the norm fix alone (setting θ(λ) with the fix for
                 every λ minus setting it without; REPAIR's endpoint statistics included): BN reset for
                 BN models, REPAIR for every model. The curve's ratio to the bare loops is shown with and
                 without the norm fix's own time (the target, <= 1.2, is for the curve without it)
  calibration    fitting T for every λ on cached calibration-split logits plus the calibrated losses on
                 test and train: no forward pass; compared with the curve time

Each timing is the best of `--repeats` runs (bare loops and the plain curve run alternately). On the
CPU the figures compared are the process's CPU time, which other processes sharing the cores barely
disturb (wall time is shown beside it); on CUDA, wall time. Prints one table per architecture.
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


class Timer:
    """Best-of-N timings. On the CPU the figure compared is the process's CPU time (robust to other
    processes sharing the cores; with one torch thread it is the single-core time), wall time shown
    beside it; on CUDA it is wall time after a synchronisation."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.sync = (lambda: torch.cuda.synchronize(device)) if self.cuda else (lambda: None)

    def __call__(self, fn, repeats: int = 1):
        best, wall, out = float("inf"), float("inf"), None
        for _ in range(repeats):
            self.sync()
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            self.sync()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            if (w if self.cuda else c) < best:
                best, wall = (w if self.cuda else c), w
        return best, wall, out


def bench(arch: str, args) -> list[tuple[str, str, str, str]]:
    import torch

    from lmcx.calibrate import calibrated_nll
    from lmcx.config import DataConfig, ModelConfig, SyntheticConfig
    from lmcx.data import load_dataset
    from lmcx.interpolate import Interpolator, evaluate_curves, fit_temperatures, norm_fix_inputs
    from lmcx.models import build_model
    from lmcx.train import predict, resolve_device

    in_shape, norm, test_size, train_eval, calib = PRESETS[arch]
    test_size = args.test_size or test_size
    train_eval = args.train_eval_size or train_eval
    calib = args.calib_size or calib
    device = resolve_device(args.device)
    timer = Timer(device)
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

    floats = [ds.normalize(x) for x, _y in splits.values()]  # pre-normalised, outside the timings

    @torch.inference_mode()
    def bare_float():  # plain PyTorch: float tensors already in memory, the model called on slices
        for _ in lambdas:
            for xf in floats:
                for s in range(0, len(xf), args.eval_batch_size):
                    a(xf[s:s + args.eval_batch_size])

    rows: list[tuple[str, str, str, str]] = []
    t_bare = t_curve = w_bare = w_curve = t_float = w_float = float("inf")
    for _ in range(args.repeats):  # interleaved, so that a change in background load hits both alike
        t, w, _ = timer(bare)
        t_bare, w_bare = min(t_bare, t), min(w_bare, w)
        t, w, _ = timer(lambda: curve("none"))
        t_curve, w_curve = min(t_curve, t), min(w_curve, w)
        t, w, _ = timer(bare_float)
        t_float, w_float = min(t_float, t), min(w_float, w)
    rows.append((f"{args.points} bare evaluation loops", f"{t_bare:.3f}", f"{w_bare:.3f}",
                 f"{images / t_bare:,.0f} images/s"))
    rows.append((f"{args.points} plain loops over pre-normalised float tensors", f"{t_float:.3f}", f"{w_float:.3f}",
                 f"{images / t_float:,.0f} images/s; lmcx's predict (uint8 normalised per batch) = "
                 f"{t_bare / t_float:.3f} x this"))
    rows.append((f"{args.points}-point curve, norm fix none", f"{t_curve:.3f}", f"{w_curve:.3f}",
                 f"{t_curve / t_bare:.3f} x bare (target <= 1.2); {t_curve / t_float:.3f} x the plain float loops"))
    inputs = norm_fix_inputs(ds, args.norm_fix_batches, args.norm_fix_batch_size)

    def set_all(fix):  # θ(λ) for every λ with the norm fix, no evaluation (REPAIR's endpoint statistics included)
        interp = Interpolator(a, b, inputs if fix != "none" else [], fix)
        for lam in lambdas:
            interp.at(lam)

    t_set, _, _ = timer(lambda: set_all("none"), args.repeats)
    for fix in (["reset"] if norm == "bn" else []) + ["repair"]:
        t_fix_curve, w_fix_curve, _ = timer(lambda: curve(fix), args.fix_repeats)
        t_fix, w_fix, _ = timer(lambda: set_all(fix), args.fix_repeats)
        t_fix -= t_set
        rows.append((f"{args.points}-point curve, norm fix {fix}", f"{t_fix_curve:.3f}", f"{w_fix_curve:.3f}",
                     f"{t_fix_curve / t_bare:.3f} x bare; {(t_fix_curve - t_fix) / t_bare:.3f} x bare without "
                     f"the {fix} passes (target <= 1.2)"))
        rows.append((f"  {fix} alone ({args.norm_fix_batches} x {args.norm_fix_batch_size} images per λ)",
                     f"{t_fix:.3f}", "", f"{1000 * t_fix / args.points:.1f} ms per λ = "
                                         f"{t_fix / (t_bare / images * fix_images * args.points):.2f} x a bare "
                                         f"evaluation of those images"))
    # calibration from cached logits: the calib split's logits come with the curve
    curves = curve("none", dict(splits, calib=(ds.x_calib, ds.y_calib)))

    def calibrate():  # what calibration adds: a T per λ, then the calibrated loss on every split
        temperatures = fit_temperatures(curves, "calib")
        return [calibrated_nll(z, curves.targets[split], t) for split, zs in curves.logits["b"].items()
                for z, t in zip(zs, temperatures["b"])]

    calibrate()  # warm-up: the first call imports scipy.optimize, a one-off cost per process
    t_cal, w_cal, _ = timer(calibrate, args.repeats)
    rows.append((f"calibration from cached logits ({args.points} T fits on {calib} images, calibrated losses)",
                 f"{t_cal:.3f}", f"{w_cal:.3f}", f"{t_cal / t_curve:.1%} of the curve; no forward pass"))
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
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (bare, curve, calibration)")
    parser.add_argument("--fix-repeats", type=int, default=1, help="best of this many runs of the norm-fix curves")
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
        clock = "wall s" if args.device.startswith("cuda") else "CPU s"
        w0 = max(len(r[0]) for r in rows)
        print(f"{'what':<{w0}}  {clock:>8}  {'wall s':>8}  ratio / rate")
        for what, t, wall, note in rows:
            print(f"{what:<{w0}}  {t:>8}  {wall:>8}  {note}")


if __name__ == "__main__":
    main()
