"""Training throughput: lmcx's training loop against a bare PyTorch loop, and lmcx's on-device tensor
data path against a conventional per-sample torchvision DataLoader.

    python scripts/bench_train.py                                  # both models + data path, synthetic data
    python scripts/bench_train.py --quick                          # smaller sizes, about a minute
    python scripts/bench_train.py --threads 1                      # on a shared, loaded machine (see below)
    python scripts/bench_train.py --data-root /tmp/lmcx-data       # real MNIST / CIFAR-10 (materialised there)
    python scripts/bench_train.py --device cuda [--compile]

What is timed:

  loop     `lmcx.train.train` (the real function, on a temporary run directory) against a bare loop
           written here: the same model (`build_model`, same seed), the same optimiser, hyper-parameters
           and linear learning-rate decay, the same batch size and number of steps, the same device and
           precision (bf16 autocast on CUDA, fp32 on CPU; channels_last for the ResNet on CUDA;
           `--compile` compiles both), with the data already in memory as normalised float tensors,
           shuffled by index each epoch. The ResNet case trains with crop + flip augmentation: lmcx's
           `data.augment`, and in the bare loop a batched crop + flip (one gather) of the float images,
           padded once up front. The bare loop draws its shuffles and crops from lmcx's per-epoch seeds,
           so both sides compute the same numbers (the final weights are compared, bit for bit): on CPU
           the training trajectory matters to speed (subnormal floats, common once a model fits the
           easy synthetic data, make the same step several times slower).
           lmcx runs 1 + E epochs and its figure is epochs 2..1+E from history.csv's `seconds` column,
           minus the time of the evaluation inside the last epoch (measured by wrapping
           `lmcx.train.evaluate`; nothing in lmcx is changed): process start-up, dataset decoding,
           model building and file writes are outside it. The bare loop runs 1 + E epochs too and its
           epochs 2..1+E are timed. Target: lmcx >= 0.95 x bare.
  data     one epoch of CIFAR-sized batches with random crop (padding 4) + horizontal flip, normalised:
           lmcx's `train_batches` (uint8 images held on the device, the batch gathered and augmented
           there) against a torchvision `DataLoader` over a Dataset doing per-sample PIL
           `RandomCrop(32, padding=4)` + `RandomHorizontalFlip` + `ToTensor` + `Normalize` (as
           `torchvision.datasets.CIFAR10` does), shuffled, same images and batch size, num_workers 0 and
           2 (persistent workers, started before timing). Target: lmcx >= 3 x the DataLoader.

Repetitions of the two sides of a comparison are interleaved (A, B, A, B, ...) and medians reported,
so that a change in the machine's load hits both sides alike; the per-pair ratios and the ratio by
process CPU time (which other processes' load does not inflate; `time.process_time`) are printed
too. The load average is printed before and after. On a shared machine use `--threads 1`: with two
PyTorch (OpenMP) threads on two cores that other processes also use, each parallel region waits for a
descheduled partner thread and a step can be ten times slower, which swamps what is being compared.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Case:
    name: str
    arch: str
    norm: str
    bias: bool
    shape: tuple[int, int, int]
    images: int
    optimizer: str
    lr: float
    weight_decay: float
    augment: bool
    real: str  # dataset name with --data-root
    real_path: str | None = None


def cases(args) -> list[Case]:
    mlp_n, res_n = (10_000, 1_000) if args.quick else (60_000, 2_000)
    mlp_n, res_n = args.mlp_images or mlp_n, args.resnet_images or res_n
    mnist, cifar = ("MNIST", "CIFAR-10") if args.data_root else ("MNIST-sized", "CIFAR-sized")
    out = [  # the configs/ recipes: mnist_mlp.yaml (Adam 1e-3) and cifar10_resnet20.yaml (SGD 0.4, wd 5e-4)
        Case(f"MLP x1, {mnist}", "mlp", "none", True, (1, 28, 28), mlp_n, "adam", 1e-3, 0.0, False, "mnist"),
        Case(f"ResNet-20 x1, {cifar}, crop+flip", "resnet20", "bn", False, (3, 32, 32), res_n, "sgd", 0.4, 5e-4,
             True, "imagefolder", "cifar10-jpeg"),
    ]
    return [c for c in out if args.only is None or c.arch == args.only]


def data_config(case: Case, args, images: int):
    from lmcx.config import DataConfig, SyntheticConfig

    if args.data_root:
        return DataConfig(name=case.real, root=args.data_root, path=case.real_path, calib_size=0,
                          train_size=images, augment=case.augment, crop_padding=4)
    return DataConfig(name="synthetic", calib_size=0, augment=case.augment, crop_padding=4,
                      synthetic=SyntheticConfig(train_size=images, test_size=args.test_images, num_classes=10,
                                                shape=list(case.shape)))


def train_job(case: Case, args, epochs: int):
    from lmcx.config import ModelConfig, TrainConfig, TrainJob

    return TrainJob(
        data=data_config(case, args, case.images),
        model=ModelConfig(arch=case.arch, width=1.0, norm=case.norm, bias=case.bias),
        train=TrainConfig(optimizer=case.optimizer, lr=case.lr, momentum=0.9, weight_decay=case.weight_decay,
                          schedule="linear", warmup_epochs=0.0, epochs=epochs, batch_size=args.batch_size,
                          eval_every=epochs, precision="auto", compile=args.compile),
        seed=0, device=args.device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Training loop: lmcx against bare


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU = this process's user + system time (all its threads)."""
    return time.perf_counter(), time.process_time()


def lmcx_loop(case: Case, args, timed_epochs: int):
    """([(wall, CPU) seconds of lmcx's epochs 2..1+E], final weights, largest |marks - history.csv|).

    Wall seconds: history.csv's `seconds` (what lmcx records per epoch), minus the evaluation inside the
    last epoch. CPU seconds: process CPU time between marks from its first batch to its end-of-epoch
    bookkeeping (the one host sync for metrics, the finiteness check), i.e. up to the call of `evaluate`
    (last epoch) or `save_train_state` (others); the marks are set by wrapping those three module-level
    names of lmcx.train (nothing in lmcx changes), and their wall span is checked against history.csv."""
    from safetensors.torch import load_file

    import lmcx.train as lt
    from lmcx.console import console

    marks: list[tuple[str, float, float]] = []
    originals = lt.train_batches, lt.evaluate, lt.save_train_state

    def train_batches(*a, **k):
        marks.append(("start", *_clock()))  # at the first batch request
        yield from originals[0](*a, **k)

    def evaluate(*a, **k):
        marks.append(("end", *_clock()))
        t0 = time.perf_counter()
        out = originals[1](*a, **k)  # ends in .item(): synchronised
        marks.append(("eval", time.perf_counter() - t0, 0.0))
        return out

    def save_train_state(*a, **k):
        marks.append(("end", *_clock()))
        return originals[2](*a, **k)

    lt.train_batches, lt.evaluate, lt.save_train_state = train_batches, evaluate, save_train_state
    quiet, console.quiet = console.quiet, True  # no per-epoch log lines
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            lt.train(train_job(case, args, 1 + timed_epochs), Path(tmp) / "run")
            with open(Path(tmp) / "run" / "history.csv") as f:
                history = [float(r["seconds"]) for r in csv.DictReader(f)]
            weights = load_file(str(Path(tmp) / "run" / "model.safetensors"))
    finally:
        (lt.train_batches, lt.evaluate, lt.save_train_state), console.quiet = originals, quiet
    spans, start = [], None
    for kind, wall, cpu in marks:
        if kind == "start":
            start = (wall, cpu)
        elif kind == "end" and start is not None:
            spans.append((wall - start[0], cpu - start[1]))
            start = None
    eval_seconds = [wall for kind, wall, _ in marks if kind == "eval"]
    assert len(spans) == len(history) == 1 + timed_epochs and len(eval_seconds) == 1, (marks, history)
    history[-1] -= eval_seconds[0]
    mismatch = max(abs(h - w) for h, (w, _) in zip(history, spans))
    return [(h, cpu) for h, (_, cpu) in zip(history, spans)][1:], weights, mismatch


def crop_flip(padded, h: int, w: int, padding: int, generator):
    """Random h x w crops + horizontal flips of a batch of already padded float images (one gather):
    the bare loop's augmentation. Draws (row offsets, column offsets, flips) in lmcx's order."""
    import torch

    n, c, hp, wp = padded.shape
    dev = padded.device

    def to_dev(t):  # pinned and non-blocking on CUDA: no host-device synchronisation
        return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t

    dy = to_dev(torch.randint(0, 2 * padding + 1, (n,), generator=generator))
    dx = to_dev(torch.randint(0, 2 * padding + 1, (n,), generator=generator))
    flip = to_dev(torch.rand(n, generator=generator) < 0.5)
    rows = dy[:, None] + torch.arange(h, device=dev)
    cols = dx[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, hp * wp).gather(2, index).view(n, c, h, w)


def bare_loop(case: Case, args, ds, timed_epochs: int):
    """([(wall, CPU) seconds of epochs 2..1+E], final weights) of a plain PyTorch loop over pre-normalised
    float tensors.

    It uses lmcx's per-epoch seeds for its shuffling and crops, and the same learning-rate schedule,
    so that it computes the same numbers as lmcx's loop: the training trajectory (which decides, for
    one, how many subnormal floats slow the CPU down late in training) is the same on both sides."""
    import torch
    import torch.nn.functional as F

    from lmcx.data import epoch_generator
    from lmcx.models import build_model

    device = ds.x_train.device
    job = train_job(case, args, 1 + timed_epochs)
    torch.manual_seed(job.seed)
    model = build_model(job.model, ds.in_shape, ds.num_classes).to(device)
    if device.type == "cuda" and case.arch != "mlp":
        model = model.to(memory_format=torch.channels_last)
    cfg = job.train
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, bs = len(ds.y_train), cfg.batch_size
    total = cfg.epochs * -(-n // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total)  # linear decay, no warm-up
    net = torch.compile(model) if cfg.compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    pad = 4 if case.augment else 0
    h, w = ds.in_shape[1:]
    # In memory, normalised, on the device; padded once up front when augmenting (a pixel of value 0,
    # normalised, as lmcx pads).
    x_all, y_all = ds.normalize(F.pad(ds.x_train, (pad,) * 4) if pad else ds.x_train), ds.y_train
    spans = []
    for epoch in range(1 + timed_epochs):
        g = epoch_generator(job.seed, epoch)
        _sync(device)
        t0 = _clock()
        net.train()
        order = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, bs):
            idx = order[s:s + bs]
            xb, yb = x_all[idx], y_all[idx]
            if pad:
                xb = crop_flip(xb, h, w, pad, g)
            with amp:
                loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        loss.item()  # one host sync per epoch, as in lmcx
        t1 = _clock()
        spans.append((t1[0] - t0[0], t1[1] - t0[1]))
    return spans[1:], {k: v.detach().cpu() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Data path: lmcx tensors against a per-sample DataLoader


class PerSampleDataset:
    """What torchvision.datasets.CIFAR10 does: HWC uint8 array -> PIL image -> per-sample transforms."""

    def __init__(self, images_hwc, targets, transform):
        self.data, self.targets, self.transform = images_hwc, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def bench_data(args, device) -> list[dict]:
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from lmcx.config import DataConfig
    from lmcx.data import epoch_generator, load_dataset, train_batches

    n = args.data_images or (5_000 if args.quick else 20_000)
    case = cases(argparse.Namespace(**{**vars(args), "only": None}))[1]
    ds = load_dataset(data_config(case, args, n), device)
    n = len(ds.y_train)
    aug = DataConfig(augment=True, crop_padding=4)
    images_hwc = ds.x_train.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    targets = ds.y_train.cpu().tolist()
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(ds.mean.tolist(), ds.std.tolist())])
    dataset = PerSampleDataset(images_hwc, targets, tf)
    pin = device.type == "cuda"

    def lmcx_epoch(epoch: int) -> tuple[float, float]:
        _sync(device)
        t0 = _clock()
        for x, y in train_batches(ds, args.batch_size, epoch_generator(0, epoch), aug):
            pass
        _sync(device)
        t1 = _clock()
        return t1[0] - t0[0], t1[1] - t0[1]

    def loader_epoch(loader) -> tuple[float, float]:
        _sync(device)
        t0 = _clock()
        for x, y in loader:
            x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
        _sync(device)
        t1 = _clock()
        return t1[0] - t0[0], t1[1] - t0[1]

    loaders = {w: DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=w,
                             persistent_workers=w > 0, pin_memory=pin) for w in args.workers}
    lmcx_epoch(0)  # warm-up (and worker start-up, outside the timings)
    for loader in loaders.values():
        loader_epoch(loader)
    times: dict[str, list[tuple[float, float]]] = {"lmcx": [], **{f"w{w}": [] for w in loaders}}
    reps = max(args.repeats, 5)  # an epoch here takes seconds at most
    for rep in range(reps):  # interleaved: lmcx, w0, w2, lmcx, w0, w2, ...
        times["lmcx"].append(lmcx_epoch(rep + 1))
        for w, loader in loaders.items():
            times[f"w{w}"].append(loader_epoch(loader))
    del loaders
    med = statistics.median
    lw, lc = [n / w for w, _ in times["lmcx"]], [n / c for _, c in times["lmcx"]]
    rows = []
    for w in args.workers:
        bw, bc = [n / t for t, _ in times[f"w{w}"]], [n / c for _, c in times[f"w{w}"]]
        rows.append(dict(what=f"data path, {n} {'CIFAR-10' if args.data_root else 'CIFAR-sized'} images, crop+flip: lmcx vs DataLoader num_workers={w}",
                         lmcx=med(lw), base=med(bw), ratio=med(lw) / med(bw),
                         pair_ratio=med([a / b for a, b in zip(lw, bw)]),
                         cpu_ratio=med(lc) / med(bc) if w == 0 and device.type == "cpu" else None, target=3.0,
                         detail=f"{reps} repetitions; wall images/s lmcx {fmt(lw)}, DataLoader {fmt(bw)}"
                                + (f"; CPU-time images/s lmcx {fmt(lc)}, DataLoader {fmt(bc)}" if w == 0 else
                                   " (the workers' CPU time is not the main process's: no CPU-time ratio)")))
    return rows


def _rates(n: int, spans: list[list[tuple[float, float]]]) -> tuple[list[float], list[float]]:
    """Images/s per repetition by wall clock and by CPU time."""
    return ([n * len(s) / sum(w for w, _ in s) for s in spans], [n * len(s) / sum(c for _, c in s) for s in spans])


def bench_loop(case: Case, args, device) -> dict:
    import torch

    from lmcx.data import load_dataset

    ds = load_dataset(data_config(case, args, case.images), device)
    n = len(ds.y_train)
    E = args.epochs
    steps = E * -(-n // args.batch_size)
    lm, bare, same, mismatch = [], [], [], 0.0
    for rep in range(args.repeats):  # interleaved: lmcx, bare, lmcx, bare, ...
        spans, w_lmcx, diff = lmcx_loop(case, args, E)
        lm.append(spans)
        mismatch = max(mismatch, diff)
        spans, w_bare = bare_loop(case, args, ds, E)
        bare.append(spans)
        same.append(w_lmcx.keys() == w_bare.keys() and all(torch.equal(w_lmcx[k], w_bare[k]) for k in w_lmcx))
        (lw, lc), (bw, bc) = _rates(n, lm[-1:]), _rates(n, bare[-1:])
        print(f"  {case.name} rep {rep + 1}/{args.repeats}: lmcx {lw[0]:,.0f} images/s (CPU time {lc[0]:,.0f}), "
              f"bare {bw[0]:,.0f} (CPU time {bc[0]:,.0f}), same final weights: {'yes' if same[-1] else 'no'}  "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    (lw, lc), (bw, bc) = _rates(n, lm), _rates(n, bare)
    med = statistics.median
    return dict(what=f"train loop, {case.name}: {n} images x {E} epoch(s), {steps} steps of {args.batch_size}",
                lmcx=med(lw), base=med(bw), ratio=med(lw) / med(bw),
                cpu_ratio=med(lc) / med(bc) if device.type == "cpu" else None,  # host CPU time says little on a GPU
                pair_ratio=med([a / b for a, b in zip(lw, bw)]), target=0.95,
                detail=f"wall images/s lmcx {fmt(lw)}, bare {fmt(bw)}; CPU-time images/s lmcx {fmt(lc)}, "
                       f"bare {fmt(bc)}; bit-identical final weights in {sum(same)}/{len(same)} repetitions; "
                       f"epoch marks vs history.csv seconds (minus evaluation): max difference {1000 * mismatch:.1f} ms")


def fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:,.0f}" for x in xs) + "]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (MLP 10k, ResNet 1k, data 5k images)")
    ap.add_argument("--data-root", default=None, help="use real MNIST / CIFAR-10 (imagefolder cifar10-jpeg) from here")
    ap.add_argument("--only", choices=["mlp", "resnet20"], default=None, help="one model only")
    ap.add_argument("--no-data", action="store_true", help="skip the data-path comparison")
    ap.add_argument("--no-loop", action="store_true", help="skip the training-loop comparison")
    ap.add_argument("--mlp-images", type=int, default=None, help="MLP training images (default 60000; quick 10000)")
    ap.add_argument("--resnet-images", type=int, default=None, help="ResNet training images (default 2000; quick 1000)")
    ap.add_argument("--data-images", type=int, default=None, help="data-path images (default 20000; quick 5000)")
    ap.add_argument("--test-images", type=int, default=500, help="synthetic test split (evaluated once, not timed)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=1, help="timed epochs per repetition (after one warm-up epoch)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repetitions per side (default 3; quick 2)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers to compare")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both loops (train.compile)")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 3)

    import torch

    from lmcx.train import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    load0 = os.getloadavg()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, batch {args.batch_size}, "
          f"{args.repeats} interleaved repetitions, medians; data "
          f"{'real, ' + args.data_root if args.data_root else 'synthetic'}; load average {load0[0]:.2f} {load0[1]:.2f} "
          f"{load0[2]:.2f}", flush=True)
    rows = []
    if not args.no_loop:
        for case in cases(args):
            rows.append(bench_loop(case, args, device))
    if not args.no_data:
        rows += bench_data(args, device)
    load1 = os.getloadavg()

    print(f"\nload average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; "
          f"{time.perf_counter() - started:.0f} s in all")
    w = max(len(r["what"]) for r in rows)
    print(f"{'what':<{w}}  {'lmcx img/s':>11}  {'base img/s':>11}  {'ratio':>6}  {'pairs':>6}  {'CPU':>6}  target")
    for r in rows:
        cpu = f"{r['cpu_ratio']:>6.3f}" if r["cpu_ratio"] is not None else f"{'-':>6}"
        ok = "ok" if r["ratio"] >= r["target"] else "MISSED"
        print(f"{r['what']:<{w}}  {r['lmcx']:>11,.0f}  {r['base']:>11,.0f}  {r['ratio']:>6.3f}  "
              f"{r['pair_ratio']:>6.3f}  {cpu}  >= {r['target']:g} {ok}")
    print("img/s: medians over the repetitions, by wall clock. base: the bare PyTorch loop (train rows), the "
          "per-sample DataLoader (data rows). ratio: lmcx / base of those medians (judged against the target); "
          "pairs: median of the per-repetition ratios (each lmcx run against the base run next to it); "
          "CPU: the ratio by process CPU time, which other processes' load does not inflate.")
    for r in rows:
        print(f"  {r['what']}: {r['detail']}")


if __name__ == "__main__":
    main()
