"""Model checkpoints: safetensors files that describe themselves.

The safetensors header carries the model and dataset settings (`lmcx` metadata key), so any file
written by `lmcx train` or `lmcx match` can be rebuilt into a model without its run directory.
Loading never executes code from a file: safetensors holds only tensors, the training-state file used
for `--resume` is read with `torch.load(weights_only=True)`, and a header naming a user's model factory
(`module:callable`) is refused unless the user trusts that module (lmcx/arch.py).
"""
from __future__ import annotations

import json
import math
import pickle
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .arch import require_trusted
from .config import DataConfig, ModelConfig, from_dict, validate
from .errors import LmcxError
from .io import atomic_path, loads_json, shorten
from .names import MODEL_FILE

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Checkpoint:
    model: ModelConfig
    data: DataConfig
    in_shape: tuple[int, int, int]
    num_classes: int
    state: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)  # free-form provenance (seed, permuted_from, ...)
    path: Path | None = None

    def header(self) -> dict[str, Any]:
        return {"model": asdict(self.model), "data": asdict(self.data), "in_shape": list(self.in_shape),
                "num_classes": self.num_classes, "info": self.info}

    @property
    def label(self) -> str:
        return str(self.path) if self.path else f"{self.model.arch} w{self.model.width:g}"


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """A safetensors file of `tensors` with `header` as its `lmcx` JSON metadata, written atomically."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"lmcx": json.dumps(header)})
        except SafetensorError as e:  # safetensors reports I/O failures (a full disk) as its own type
            raise OSError(str(e)) from None


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a safetensors file and its `lmcx` metadata (None when absent). Raises SafetensorError,
    OSError or ValueError for an unreadable file: callers say what the file should have been."""
    with safe_open(str(path), "pt") as f:
        header = (f.metadata() or {}).get("lmcx")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, (loads_json(header) if header is not None else None)


def check_weights(state: Mapping[str, Any], source: str | Path, names: Iterable[str] | None = None) -> None:
    """Refuse weights that cannot give a meaningful result: a NaN or Inf anywhere (0·NaN is NaN, so one bad
    model poisons every interpolation), or integer / boolean parameters (which weight matching would skip,
    returning the identity). Checks `names` (those present), else every entry but BatchNorm's
    `num_batches_tracked`, an integer counter by design."""
    if names is None:
        names = [n for n in state if not n.endswith("num_batches_tracked")]
    for name in [n for n in names if n in state]:
        t = state[name]
        if not (torch.is_tensor(t) and t.dtype in FLOAT_DTYPES):
            what = t.dtype if torch.is_tensor(t) else type(t).__name__
            raise LmcxError(f"{source}: tensor {shorten(name)} is {what}, not floating-point weights; use a "
                            "checkpoint written by `lmcx train` or `lmcx match`")
        # fast path: a NaN or Inf makes the sum NaN or infinite; a finite sum proves there is none (an
        # overflowing sum of finite values falls through to the exact count, which then finds nothing)
        if math.isfinite(float(t.sum())):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise LmcxError(f"{source}: tensor {shorten(name)} holds {bad} NaN or infinite value(s) of {t.numel()}; "
                            "the model diverged or the file is corrupt: retrain it or use another checkpoint")


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    write_tensors(path, {k: v.detach().contiguous().cpu() for k, v in ckpt.state.items()}, ckpt.header())


def resolve_model_path(path: str | Path) -> Path:
    """A run directory stands for the model file inside it."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        raise LmcxError(f"{path} is a directory without {MODEL_FILE}; pass a finished run directory or a "
                        ".safetensors file")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint whose header and weights have been checked: the header is data from a file, so every
    value is range-checked before anything is built from it, and it never starts a download."""
    path = resolve_model_path(path)
    if not path.exists():
        raise LmcxError(f"checkpoint {path} does not exist; pass a model.safetensors file or a run directory")
    try:
        state, header = read_tensors(path)
    except (SafetensorError, OSError, UnicodeDecodeError) as e:
        raise LmcxError(f"{path} is not a readable safetensors checkpoint ({shorten(str(e))}); it may be truncated "
                        "or corrupt: re-create it") from None
    except ValueError as e:  # the metadata is not JSON
        raise LmcxError(f"{path} has unreadable lmcx metadata ({e}); re-create the checkpoint") from None
    if header is None:
        raise LmcxError(f"{path} has no lmcx metadata; use a checkpoint written by `lmcx train` or `lmcx match`")
    model = header.get("model") if isinstance(header, dict) else None
    if isinstance(model, dict) and isinstance(model.get("arch"), str):
        require_trusted(model["arch"], str(path))  # a header naming `module:callable` must not make us import it
    try:
        ckpt = _from_header(header, state, path)
    except (LmcxError, KeyError, TypeError, ValueError) as e:
        raise LmcxError(f"{path} has unreadable lmcx metadata ({shorten(str(e), 300)}); re-create the "
                        "checkpoint") from None
    check_weights(state, path)
    return ckpt


def _from_header(header: Any, state: dict[str, torch.Tensor], path: Path) -> Checkpoint:
    from .data import check_synthetic_size, dataset_shape
    from .models import check_model_size

    if not isinstance(header, dict) or not all(isinstance(header.get(k), dict) for k in ("model", "data")):
        raise ValueError("expected a mapping with model and data settings")
    model = from_dict(ModelConfig, header["model"], "model")
    data = from_dict(DataConfig, header["data"], "data")
    validate(model, "model.")
    validate(data, "data.")
    data.download = False  # a file may not make lmcx fetch anything: datasets come from --data-root
    in_shape, num_classes, info = header["in_shape"], header["num_classes"], header.get("info", {})
    if not (isinstance(in_shape, list) and len(in_shape) == 3 and all(_is_int(s) for s in in_shape)):
        raise ValueError(f"in_shape must be [channels, height, width], got {shorten(in_shape)}")
    if not _is_int(num_classes):
        raise ValueError(f"num_classes must be an integer, got {shorten(num_classes)}")
    if not isinstance(info, dict):
        raise ValueError(f"info must be a mapping, got {shorten(info)}")
    check_model_size(model, tuple(in_shape), num_classes)
    if data.name == "synthetic":
        check_synthetic_size(data.synthetic, "data.synthetic")
    expected = dataset_shape(data)
    if expected is not None and expected != (tuple(in_shape), num_classes):
        raise ValueError(f"in_shape {in_shape} and num_classes {num_classes} do not fit {data.name} "
                         f"({list(expected[0])}, {expected[1]} classes)")
    return Checkpoint(model, data, tuple(in_shape), num_classes, state, info, path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_dataset_fits(ckpt: Checkpoint, in_shape: tuple[int, ...], num_classes: int) -> None:
    """The dataset a checkpoint is evaluated on has the images and classes it was built for (a folder of
    images may have changed since training)."""
    if (tuple(in_shape), num_classes) != (ckpt.in_shape, ckpt.num_classes):
        raise LmcxError(f"{ckpt.label} was trained on images {list(ckpt.in_shape)} with {ckpt.num_classes} classes, "
                        f"but {ckpt.data.name} now has {list(in_shape)} and {num_classes}; use the data it was "
                        "trained on")


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Two checkpoints can be matched / interpolated only if they are the same kind of model."""
    pairs = [("architecture", a.model.arch, b.model.arch), ("width", a.model.width, b.model.width),
             ("norm", a.model.norm, b.model.norm), ("bias", a.model.bias, b.model.bias),
             ("dataset", a.data.name, b.data.name), ("input shape", a.in_shape, b.in_shape),
             ("classes", a.num_classes, b.num_classes)]
    for what, va, vb in pairs:
        if va != vb:
            raise LmcxError(f"models differ in {what} ({a.label}: {va}, {b.label}: {vb}); "
                            "only models of one architecture, width, norm and dataset can be compared")


def build_from_checkpoint(ckpt: Checkpoint, device: torch.device | str = "cpu") -> torch.nn.Module:
    from .models import build_model

    model = build_model(ckpt.model, ckpt.in_shape, ckpt.num_classes)
    try:
        model.load_state_dict(ckpt.state)
    except RuntimeError as e:
        raise LmcxError(f"{ckpt.label} does not fit a {ckpt.model.arch} of width {ckpt.model.width:g} "
                        f"({str(e).splitlines()[0]}); the file's metadata and tensors disagree") from None
    return model.to(device)


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's zip writer reports a full disk as "unexpected pos ..."
            raise OSError(f"torch.save failed ({str(e).splitlines()[0]})") from None


def load_train_state(path: str | Path) -> dict[str, Any]:
    """weights_only=True: a crafted pickle cannot run code here."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: not the user's concern
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LmcxError(f"cannot resume from {path}: refused to load it (it holds objects other than tensors and "
                        "plain values, which could run code, or it is corrupt); pass --force to start "
                        "over") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise LmcxError(f"cannot resume from {path}: {str(e).splitlines()[0]}; pass --force to start "
                        "over") from None
