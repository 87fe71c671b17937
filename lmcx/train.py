"""Training and evaluation.

`train(job, run_dir)` trains one model and writes its run directory:
  model.safetensors  the weights (self-describing, see checkpoint.py)
  meta.json          architecture, width, norm, dataset, seed, resolved config, final metrics, versions
  history.csv        one row per epoch
  config.yaml        the resolved settings
  metrics.json       final metrics, written last: the run is complete only when it exists
  train_state.pt     model + optimiser + scheduler + history after the last finished epoch (for
                     resuming, the default when an interrupted run is re-run); removed once the run
                     is complete
  tensorboard/       per-epoch and final event files, with `track: tensorboard` (lmcx/tracking.py)

The data order and augmentation of epoch e depend only on (seed, e), so resuming from the state
after epoch e reproduces an uninterrupted run bit for bit on CPU. The training step never
synchronises with the host: losses are summed on the device and read once per epoch.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import shutil
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import __version__, progress, threads
from .checkpoint import MODEL_FILE, Checkpoint, check_weights, load_train_state, save_checkpoint, save_train_state
from .collect import FIGURES
from .config import TrainConfig, TrainJob, to_dict
from .console import console
from .data import Dataset, epoch_generator, eval_batches, load_dataset, train_batches
from .errors import LmcxError, RunFailed
from .io import write_csv, write_json
from .tracking import EVENTS_DIR, open_tracker

STATE_FILE = "train_state.pt"
RUN_OUTPUTS = [MODEL_FILE, "meta.json", "history.csv", "metrics.json", STATE_FILE, EVENTS_DIR]


# ---------------------------------------------------------------------------------------------
# Devices, precision, distributed


@dataclass
class Distributed:
    """torchrun environment: rank 0 writes outputs; every rank takes a slice of each global batch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, dist: Distributed | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LmcxError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
        if dist is not None and dist.world_size > 1:
            return torch.device("cuda", dist.local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise LmcxError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision auto or bf16); plain fp32 elsewhere."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------
# Evaluation: logits first, so callers (interpolation, calibration) can cache them


@torch.inference_mode()
def predict(model: torch.nn.Module, ds: Dataset, x: torch.Tensor, batch_size: int = 2000,
            precision: str = "auto") -> torch.Tensor:
    """Float32 logits of `model` (in eval mode) on uint8 images `x`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with autocast(device, precision):
        logits = [model(xb).float() for xb, _ in eval_batches(ds, x, x.new_zeros(len(x)), batch_size)]
    model.train(was_training)
    return torch.cat(logits)


def loss_and_accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def evaluate(model: torch.nn.Module, ds: Dataset, split: str = "test", batch_size: int = 2000,
             precision: str = "auto") -> dict[str, float]:
    x, y = ds.split(split)
    loss, acc = loss_and_accuracy(predict(model, ds, x, batch_size, precision), y)
    return {"loss": loss, "accuracy": acc}


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 / cosine / constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    fraction = (step - warmup) / max(1, total - warmup)
    return 1.0 - fraction if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * fraction))


# ---------------------------------------------------------------------------------------------
# Provenance


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    return {"lmcx": __version__, "torch": torch.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# The loop


def train(job: TrainJob, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train one model into `run_dir` (see module docstring). Returns the final metrics. With `job.track`,
    the main process also records each epoch's row and the final metrics (lmcx/tracking.py)."""
    track = job.track if Distributed.from_env().is_main else "none"
    if track != "none":  # the events are rebuilt from the start: a resumed run replays its history first
        shutil.rmtree(Path(run_dir) / EVENTS_DIR, ignore_errors=True)
    with open_tracker(track, run_dir) as tracker:
        return _train(job, Path(run_dir), resume, tracker)


def _train(job: TrainJob, run_dir: Path, resume: bool, tracker) -> dict[str, Any]:
    from .models import build_model

    dist = Distributed.from_env()
    device = resolve_device(job.device, dist)
    cfg = job.train
    torch.manual_seed(job.seed)
    ds = load_dataset(job.data, device)
    if cfg.batch_size > len(ds.y_train):
        raise LmcxError(f"train.batch_size={cfg.batch_size} is larger than the training set "
                        f"({len(ds.y_train)} images); lower it")
    model = build_model(job.model, ds.in_shape, ds.num_classes).to(device)
    if 1 in {len(range(r, m, dist.world_size)) for m in (cfg.batch_size, len(ds.y_train) % cfg.batch_size) if m
             for r in range(dist.world_size)}:
        try:  # BatchNorm cannot train on one image unless it has spatial positions to average over (on a copy)
            copy.deepcopy(model).train()(ds.normalize(ds.x_train[:1]))
        except ValueError:
            raise LmcxError(f"train.batch_size={cfg.batch_size} leaves a batch of one image ({len(ds.y_train)} "
                            "training images), on which BatchNorm cannot train; change train.batch_size or "
                            "data.train_size") from None
    thread_info = threads.fit_to_model(model, ds.normalize(ds.x_train[:1]), cfg.batch_size)
    if device.type == "cuda" and job.model.arch != "mlp":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), cfg)
    steps_per_epoch = math.ceil(len(ds.y_train) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, round(min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total, warmup, cfg.schedule))

    start_epoch, history = 0, []
    state_path = run_dir / STATE_FILE
    if resume and state_path.is_file():
        state = load_train_state(state_path)
        try:  # a state of another model, or not a state at all: one clear line, not a traceback
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, history = state["epoch"], state["history"]
            if not (isinstance(start_epoch, int) and 0 <= start_epoch <= cfg.epochs and len(history) == start_epoch):
                raise ValueError(f"epoch {start_epoch!r} of {cfg.epochs} with {len(history)} history rows")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise LmcxError(f"cannot resume from {state_path}: it does not fit this run ({str(e).splitlines()[0]}); "
                            "pass --force to start over") from None
        check_weights(model.state_dict(), state_path)  # a state holding NaN must not become a finished model
        if dist.is_main:
            console.print(f"resuming {run_dir} after epoch {start_epoch}/{cfg.epochs}")
        for row in history:
            tracker.epoch(row["epoch"], row)

    net: torch.nn.Module = model
    if dist.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    started = time.perf_counter()
    train_seconds = 0.0
    with progress.task(f"train {run_dir.name}", total=(cfg.epochs - start_epoch) * steps_per_epoch, unit="batch",
                       show=dist.is_main) as bar:
        images = 0
        for epoch in range(start_epoch, cfg.epochs):
            epoch_start = time.perf_counter()
            net.train()
            totals = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, correct, count
            for step, (x, y) in enumerate(train_batches(ds, cfg.batch_size, epoch_generator(job.seed, epoch), job.data,
                                                        dist.rank, dist.world_size), 1):
                with autocast(device, cfg.precision):
                    out = net(x)
                    loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                totals += torch.stack([loss.detach().double() * len(y), (out.argmax(1) == y).sum().double(),
                                       # torch.full, not torch.tensor: a fill kernel, no host-to-device copy
                                       torch.full((), float(len(y)), device=device, dtype=torch.float64)])
                images += len(y) * dist.world_size
                # callables: read from the device only when the progress display is refreshed
                bar.advance(1, epoch=f"{epoch + 1}/{cfg.epochs}", batch=f"{step}/{steps_per_epoch}",
                            loss=lambda: totals[0] / totals[2], acc=lambda: totals[1] / totals[2],
                            **{"img/s": lambda: images / (time.perf_counter() - started)})
            if dist.world_size > 1:
                torch.distributed.all_reduce(totals)
            loss_sum, correct, count = totals.tolist()  # the one host sync of the epoch
            train_seconds += time.perf_counter() - epoch_start
            train_loss = loss_sum / count
            if not math.isfinite(train_loss) or not all(torch.isfinite(p).all() for p in model.parameters()):
                kept = f"the last good state (epoch {epoch}) is kept in {state_path}" if epoch else "nothing was saved"
                raise RunFailed(f"training diverged in epoch {epoch + 1}: the loss became {train_loss}; "
                                f"{kept}; lower train.lr or set train.grad_clip")
            row: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                                   "train_loss": train_loss, "train_accuracy": correct / count}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                test = evaluate(model, ds, "test", cfg.eval_batch_size, cfg.precision)
                row.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
            row["seconds"] = time.perf_counter() - epoch_start
            history.append(row)
            tracker.epoch(epoch + 1, row)
            status = f"loss {train_loss:.4f} acc {correct / count:.3f}"
            if "test_accuracy" in row:
                status += f" test {row['test_accuracy']:.3f}"
            bar.log(f"{run_dir.name} epoch {epoch + 1}/{cfg.epochs}: {status}")
            if dist.is_main:
                save_train_state(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                              "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                                              "history": history})

    last = history[-1]
    metrics = {"test_loss": last["test_loss"], "test_accuracy": last["test_accuracy"],
               "train_loss": last["train_loss"], "train_accuracy": last["train_accuracy"],
               "epochs": cfg.epochs, "seconds": time.perf_counter() - started,
               "train_images_per_second": len(ds.y_train) * (cfg.epochs - start_epoch) / max(train_seconds, 1e-9)}
    if dist.is_main:
        resolved = to_dict(job)
        info = {"seed": job.seed, "run_dir": str(run_dir), "preprocessing": ds.preprocessing(job.data.normalization)}
        save_checkpoint(run_dir / MODEL_FILE, Checkpoint(job.model, job.data, ds.in_shape, ds.num_classes,
                                                         model.state_dict(), info))
        write_json(run_dir / "meta.json", {
            "architecture": job.model.arch, "width": job.model.width, "norm": job.model.norm,
            "bias": job.model.bias, "dataset": job.data.name, "seed": job.seed, "num_classes": ds.num_classes,
            "in_shape": list(ds.in_shape), "preprocessing": info["preprocessing"],
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "device": str(device), "world_size": dist.world_size, "threads": thread_info, "config": resolved,
            "metrics": metrics,
            "versions": versions(), "git_commit": git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        write_csv(run_dir / "history.csv", history)
        tracker.final(FIGURES["train"](metrics))
        write_json(run_dir / "metrics.json", metrics)
        state_path.unlink(missing_ok=True)
    return metrics


def train_run(job: TrainJob, run_dir: str | Path, *, force: bool = False,
              wait: bool = False) -> tuple[str, dict[str, Any]]:
    """Train into `run_dir` unless it is complete (see rundir.run_once): ("done" | "skipped" | "busy", metrics);
    ("worker", {}) on ranks other than 0. An interrupted run resumes from its last finished epoch when its
    recorded settings match (else it is refused: finished epochs are never silently discarded); `force`
    starts over.

    Under torchrun, rank 0 alone owns the run directory and tells the other ranks whether to train.
    """
    resume = not force
    from .rundir import run_once

    dist = Distributed.from_env()
    metrics: dict[str, Any] = {}

    def tell_ranks(decision: str) -> None:
        if dist.world_size > 1:
            torch.distributed.broadcast_object_list([decision], src=0)

    def step() -> None:
        tell_ranks("train")
        metrics.update(train(job, run_dir, resume))

    if not dist.is_main:
        decision = [None]
        torch.distributed.broadcast_object_list(decision, src=0)
        if decision[0] == "train":
            train(job, run_dir, resume)
        return "worker", metrics
    try:
        status = run_once(run_dir, to_dict(job), RUN_OUTPUTS, step, force=force, wait=wait, keep=(STATE_FILE,))
    except LmcxError:
        tell_ranks("failed")
        raise
    if status != "done":
        tell_ranks(status)
    return status, metrics
