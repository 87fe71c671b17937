"""`lmcx import`: weights trained elsewhere + an architecture + a dataset -> an lmcx run directory.

The weights are a `.safetensors` file or a PyTorch state dict (`.pt`, `.pth`, `.bin`: a
`model.state_dict()` saved with torch), read only with `torch.load(weights_only=True)`, so
a file holding anything but tensors and plain containers is refused, never unpickled into code.
`key` picks a state dict nested in the file (e.g. `state_dict` of a training checkpoint) and
`strip_prefix` removes a prefix from every name (e.g. `module.` left by DataParallel).

The tensors must be exactly the state dict of `model.arch` built for the dataset's input shape and
classes: missing, unexpected and mis-shaped names are refused together (a few named, the rest
counted), and so are non-finite values. Floating tensors are cast to the model's dtype; a
`num_batches_tracked` counter the file lacks is set to 0 (it does not change the function).

The run directory then looks like one `lmcx train` wrote: model.safetensors (whose header every other
command reads), meta.json, config.yaml, and metrics.json (test loss and accuracy, evaluated here) last,
the completeness marker, so `lmcx run`, `collect`, `match`, ... accept it.
"""
from __future__ import annotations

import hashlib
import pickle
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import TrainJob, to_dict
from .errors import LmcxError

IMPORT_OUTPUTS = ["model.safetensors", "meta.json", "metrics.json"]
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
SHOWN = 3  # names listed per kind of mismatch; the rest are counted


def read_weights(path: str | Path, key: str | None = None, strip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (module docstring), by name."""
    path = Path(path)
    if not path.is_file():
        raise LmcxError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise LmcxError(f"{path} is not a readable safetensors file ({e})") from None
    elif path.suffix in STATE_DICT_SUFFIXES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise LmcxError(f"refused to load {path}: it holds objects other than tensors and plain containers, "
                            "which could run code; save the state dict alone (torch.save(model.state_dict(), ...)) "
                            "or as .safetensors") from None
        except Exception as e:  # noqa: BLE001 - any failure to read means an unusable file
            raise LmcxError(f"cannot read {path}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    else:
        raise LmcxError(f"{path}: weights must be .safetensors or a PyTorch state dict "
                        f"({', '.join(STATE_DICT_SUFFIXES)})")
    if key is not None:
        if not isinstance(data, Mapping) or key not in data:
            keys = list(data)[:8] if isinstance(data, Mapping) else []
            raise LmcxError(f"{path} has no entry {key!r} (--key); its top-level entries: {keys}")
        data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in data.items()):
        nested = [k for k, v in data.items() if isinstance(v, Mapping)] if isinstance(data, Mapping) else []
        hint = f"; pick the state dict inside with --key (e.g. --key {nested[0]})" if nested else ""
        raise LmcxError(f"{path} does not hold a state dict (names mapped to tensors){hint}")
    if strip_prefix:
        data = {k.removeprefix(strip_prefix): v for k, v in data.items()}
    return dict(data)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading into a model whose state dict is `expected` (names and shapes), or None."""
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (the model has {tuple(v.shape)})" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{len(names)} {what}: {_listed(names)}" for what, names in
             (("missing", missing), ("unexpected", extra), ("of another shape", shapes)) if names]
    return "; ".join(parts) or None


def fit_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str,
              arch: str) -> dict[str, torch.Tensor]:
    """`state` checked against `expected` (module docstring), cast to its dtypes, in its order."""
    state = dict(state)
    for k, v in expected.items():
        if k not in state and k.endswith("num_batches_tracked"):
            state[k] = torch.zeros((), dtype=v.dtype)
    mismatch = state_mismatch(expected, state)
    if mismatch:
        raise LmcxError(f"{source} does not fit {arch}: {mismatch}; import weights of this architecture (for "
                        "prefixed names use --strip-prefix, for a nested state dict --key)")
    kinds = [k for k, v in expected.items() if v.is_floating_point() != state[k].is_floating_point()]
    if kinds:
        raise LmcxError(f"{source}: {len(kinds)} tensor(s) of the wrong kind (integer vs floating): {_listed(kinds)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise LmcxError(f"{source} holds non-finite values (inf or nan) in {len(bad)} tensor(s): {_listed(bad)}")
    return {k: state[k].to(v.dtype).contiguous() for k, v in expected.items()}


def import_settings(job: TrainJob, weights: str | Path, key: str | None, strip_prefix: str | None) -> dict[str, Any]:
    """What an import's config.yaml records (no training settings: nothing was trained)."""
    return {"import": {"weights": str(weights), "key": key, "strip_prefix": strip_prefix},
            "data": to_dict(job.data), "model": to_dict(job.model), "device": job.device}


def import_weights(job: TrainJob, weights: str | Path, run_dir: str | Path, key: str | None = None,
                   strip_prefix: str | None = None) -> dict[str, Any]:
    """Import `weights` as a model of `job.model` for `job.data` into `run_dir` (module docstring); returns
    what metrics.json holds. Does not skip or lock: callers use `rundir.run_once`."""
    from .checkpoint import Checkpoint, build_from_checkpoint, save_checkpoint
    from .data import load_dataset
    from .io import write_json
    from .models import build_model
    from .train import evaluate, resolve_device, versions

    started = time.perf_counter()
    run_dir = Path(run_dir)
    dev = resolve_device(job.device)
    state = read_weights(weights, key, strip_prefix)
    ds = load_dataset(job.data, dev)
    model = build_model(job.model, ds.in_shape, ds.num_classes)
    state = fit_state(state, model.state_dict(), str(weights), job.model.arch)
    info = {"imported_from": str(Path(weights).resolve()), "sha256": _sha256(weights)}
    ckpt = Checkpoint(job.model, job.data, ds.in_shape, ds.num_classes, state, info)
    test = evaluate(build_from_checkpoint(ckpt, dev), ds, "test", job.train.eval_batch_size, job.train.precision)
    metrics = {"test_loss": test["loss"], "test_accuracy": test["accuracy"], "imported": True,
               "seconds": time.perf_counter() - started}
    save_checkpoint(run_dir / "model.safetensors", ckpt)
    write_json(run_dir / "meta.json", {
        "architecture": job.model.arch, "width": job.model.width, "norm": job.model.norm, "bias": job.model.bias,
        "dataset": job.data.name, "num_classes": ds.num_classes, "in_shape": list(ds.in_shape),
        "num_parameters": sum(p.numel() for p in model.parameters()), **info,
        "config": import_settings(job, weights, key, strip_prefix),
        "metrics": metrics, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json(run_dir / "metrics.json", metrics)  # last: marks the run directory complete
    return metrics


def with_model_norm(job: TrainJob) -> TrainJob:
    """A model from outside lmcx has the norm it was written with: record it (models/external.py)."""
    from .arch import arch_kind
    from .data import load_dataset
    from .models.external import build_unchecked
    from .models.layers import model_norm

    if arch_kind(job.model.arch) == "builtin":
        return job
    ds = load_dataset(job.data, "cpu")
    norm = model_norm(build_unchecked(job.model, ds.in_shape, ds.num_classes))
    return replace(job, model=replace(job.model, norm=norm))


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
