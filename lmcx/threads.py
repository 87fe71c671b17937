"""How many CPU threads PyTorch may use: `--threads N|auto`, else $LMCX_THREADS, else the config
file's `threads` key, else OMP_NUM_THREADS, else auto.

PyTorch's own default (one thread per core) is a bad choice on a shared machine: every parallel region
ends in a barrier that waits for whichever thread the scheduler has just taken off its core, so with
other work running a step can be 5-20x slower than with one thread (docs/PERFORMANCE.md). "auto"
therefore never asks for more threads than there are cores left free, and uses one thread for small
models, where a second thread buys little on an idle machine and costs a lot on a busy one:

  1. OMP_NUM_THREADS, when the user set it, is respected (torchrun and SLURM scripts set it).
  2. cores  = the CPUs this process may run on (os.sched_getaffinity: taskset, cgroups, SLURM);
     busy   = the other processes running now (/proc/loadavg's runnable count, less this process)
              or the 1-minute load average, whichever is larger (so both a sweep's sibling jobs that
              start together and long-running work are seen);
     threads = cores - busy, at least 1.
  3. Once the model is known (`fit_to_model`), one thread if a step's forward pass is under
     SMALL_STEP_MACS multiply-adds.

`apply` runs once, in the CLI's root callback, before torch is imported: it sets OMP_NUM_THREADS and
MKL_NUM_THREADS (so child processes inherit the choice too) and, if torch is already loaded, calls
torch.set_num_threads. `apply_config` runs once the command has read its config file: a `threads: N`
there replaces a choice that came from OMP_NUM_THREADS or auto. `thread_info()` is the record of the
choice that runs write into their results (meta.json, metrics.json, barrier.json, ...).
Library callers that never call `apply` keep whatever threads they configured.

The thread count can change the last bits of a CPU run's results (reductions are split differently):
a run is bit-for-bit reproducible with the same `--threads N`; meta.json records the count used.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from .errors import LmcxError

ENV = "LMCX_THREADS"
LOADAVG = "/proc/loadavg"
SMALL_STEP_MACS = 1e9  # forward multiply-adds per training step below which auto uses one thread
USER_OMP = os.environ.get("OMP_NUM_THREADS")  # read at import, before `apply` sets it for child processes

_info: dict[str, Any] = {}


def available_cores() -> int:
    """CPUs this process may run on (affinity mask, which taskset, cgroups and SLURM narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_cores() -> int:
    """Cores other processes are using now: max(runnable tasks less this one, rounded 1-min load)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = 0.0
    try:
        with open(LOADAVG) as f:
            running = int(f.read().split()[3].split("/")[0]) - 1  # "R/T": runnable tasks, this one included
    except (OSError, ValueError, IndexError):
        running = 0
    return max(0, running, round(load1))


def parse(value: str | int | None, where: str = "--threads") -> int | None:
    """`auto` / None -> None; a positive integer -> that integer; else LmcxError naming `where`."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        example = "--threads 1" if where == "--threads" else f"{where}=1"
        raise LmcxError(f"{where} must be 'auto' or a positive integer, got {value!r}; e.g. {example}")
    return n


def choose(requested: str | int | None = None) -> dict[str, Any]:
    """The thread count and why: the flag, else $LMCX_THREADS, else OMP_NUM_THREADS, else free cores."""
    cores = available_cores()
    if requested is not None and parse(requested) is not None:
        return {"threads": parse(requested), "source": "--threads", "cores": cores}
    env = os.environ.get(ENV)
    if env and parse(env, ENV) is not None:
        return {"threads": parse(env, ENV), "source": ENV, "cores": cores}
    if USER_OMP:
        try:
            return {"threads": parse(USER_OMP), "source": "OMP_NUM_THREADS", "cores": cores}
        except LmcxError:
            pass  # OpenMP itself ignores a malformed value; so does this
    busy = busy_cores()
    free = max(1, cores - busy)
    return {"threads": free, "source": "auto", "cores": cores, "busy": busy, "free_threads": free}


def apply(requested: str | int | None = None) -> dict[str, Any]:
    """Choose (see `choose`) and set the thread count for torch and for child processes."""
    return _use(choose(requested))


def apply_config(value: str | int | None) -> dict[str, Any]:
    """A config file's `threads` key (`auto` or N): it ranks below --threads and $LMCX_THREADS and above
    OMP_NUM_THREADS and auto, so it replaces a choice that `apply` made from those two."""
    n = parse(value, "threads")
    if n is None or _info.get("source") in ("--threads", ENV):
        return thread_info()
    return _use({"threads": n, "source": "config", "cores": available_cores()})


def _use(info: dict[str, Any]) -> dict[str, Any]:
    global _info
    _info = info
    n = _info["threads"]
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        _set_torch(n)
    return thread_info()


def _set_torch(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    try:  # only possible before any inter-op parallel work has started
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def thread_info() -> dict[str, Any]:
    """What was chosen and why, with torch's current intra-op count (`source` "caller" if `apply` never ran)."""
    info = dict(_info) if _info else {"source": "caller"}
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def forward_macs(model, example) -> int:
    """Multiply-adds of one forward pass of `model` on `example` (Linear and Conv layers only)."""
    import torch

    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Linear):
            total += output.numel() * module.in_features
        else:  # a convolution: every output element sums in_channels / groups x kernel elements
            total += output.numel() * module.weight[0].numel()

    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    try:
        model.eval()  # eval: BatchNorm's running statistics stay as they are
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


def fit_to_model(model, example, batch_size: int) -> dict[str, Any]:
    """Under auto, one thread when a step of `batch_size` examples like `example` is small, else the
    free cores counted by `apply`. Returns `thread_info()` for the run's records."""
    if _info.get("source") == "auto":
        step_macs = forward_macs(model, example) * batch_size
        small = step_macs < SMALL_STEP_MACS
        _info.update(step_macs=step_macs, small_model=small, threads=1 if small else _info["free_threads"])
        _set_torch(_info["threads"])
    return thread_info()
