"""Models from outside lmcx: torchvision classification models and the user's own factories
(lmcx/arch.py says which names are which, and when a factory may be imported).

`torchvision.<name>`: built with weights=None (nothing is downloaded) and the dataset's number of
classes. They take 3-channel images: a dataset with another number of channels (MNIST, digits) is
refused; wrap the model in a factory that adapts its first layer instead. ViTs get `image_size` from
the dataset (square images whose side is a multiple of the patch size), MaxViT `input_size`;
GoogLeNet and Inception-v3 are built without their auxiliary classifiers. Some need large images:
alexnet (at least 63x63), inception_v3 (75x75), maxvit_t (224x224); a model that cannot run on the
dataset's images is refused when it is built.

`package.module:callable`: `callable(in_shape=(C, H, W), num_classes=K)` must return an nn.Module
mapping [N, C, H, W] images to [N, K] logits; `width=model.width` is passed too when the callable has
a `width` parameter (or **kwargs), and model.width must stay 1 when it has not. The callable may be a
class.

For both, `model.norm` describes the model rather than choosing its layers: bn if it has BatchNorm,
else ln if it has LayerNorm or GroupNorm, else none (it picks the default norm fix of interpolation);
a config that says otherwise is refused. `model.bias` applies to the built-in architectures only.
"""
from __future__ import annotations

import importlib
import inspect
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from ..arch import TORCHVISION_PREFIX, arch_kind, check_arch
from ..config import ModelConfig
from ..errors import LmcxError
from .layers import model_norm

_checked: set[tuple] = set()  # configurations whose models were run once on the dataset's shape


def build_external(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    model = build_unchecked(cfg, in_shape, num_classes)
    _check_runs(model, cfg, in_shape, num_classes)
    return model


def build_unchecked(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The model, before checking that model.norm describes it and that it runs on the dataset's images."""
    if arch_kind(cfg.arch) == "torchvision":
        return _torchvision(cfg, in_shape, num_classes)
    return _factory(cfg, in_shape, num_classes)


def _torchvision(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    import torchvision

    check_arch(cfg.arch)
    name = cfg.arch[len(TORCHVISION_PREFIX):]
    c, h, w = in_shape
    if c != 3:
        raise LmcxError(f"model.arch {cfg.arch} takes 3-channel (RGB) images, but the dataset's have {c} "
                        "channel(s); use a 3-channel dataset, or your own factory (model.arch: module:callable) "
                        "that adapts the model's first layer")
    kwargs: dict = {"num_classes": num_classes}
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        if h != w or h % patch:
            raise LmcxError(f"model.arch {cfg.arch} needs square images whose side is a multiple of its patch "
                            f"size {patch}; the dataset's are {h}x{w}")
        kwargs["image_size"] = h
    elif name == "maxvit_t":
        kwargs["input_size"] = (h, w)
    elif name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)  # logits only; explicit init silences a warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, **kwargs)


def _factory(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    module_name, attr = cfg.arch.split(":", 1)
    try:
        factory = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise LmcxError(f"model.arch {cfg.arch!r}: there is no module {module_name!r} on the Python path; "
                            "install its package or add its folder to PYTHONPATH") from None
        raise LmcxError(f"model.arch {cfg.arch!r}: importing {module_name} failed{_where(e)}: {_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the user's module: any failure is reported, not a traceback
        raise LmcxError(f"model.arch {cfg.arch!r}: importing {module_name} failed{_where(e)}: {_line(e)}") from None
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise LmcxError(f"model.arch {cfg.arch!r}: module {module_name} has no {attr!r}")
    if not callable(factory):
        raise LmcxError(f"model.arch {cfg.arch!r}: {attr} is not callable; name a function or class that builds "
                        "the model")
    kwargs: dict = {"in_shape": tuple(in_shape), "num_classes": num_classes}
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        params = []
    if any(p.name == "width" or p.kind is p.VAR_KEYWORD for p in params):
        kwargs["width"] = cfg.width
    elif cfg.width != 1:
        raise LmcxError(f"model.width: {cfg.arch} takes no width parameter, so model.width must be 1, "
                        f"got {cfg.width:g}")
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise LmcxError(f"model.arch {cfg.arch!r}: {attr}({', '.join(kwargs)}) failed{_where(e)}: {_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise LmcxError(f"model.arch {cfg.arch!r}: {attr} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_runs(model: nn.Module, cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> None:
    """Once per configuration: the norm setting describes the model, and the model maps one batch of the
    dataset's shape to [N, num_classes] logits (skipped on the meta device: nothing to run)."""
    norm = model_norm(model)
    if cfg.norm != norm:
        raise LmcxError(f"model.norm: {cfg.arch} normalises with "
                        f"{ {'bn': 'BatchNorm', 'ln': 'LayerNorm/GroupNorm', 'none': 'no norm layer'}[norm]}, so set "
                        f"model.norm: {norm} (for models from outside lmcx it describes the model; got {cfg.norm})")
    key = (cfg.arch, cfg.width, tuple(in_shape), num_classes)
    if key in _checked or any(t.is_meta for t in model.state_dict().values()):
        return
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *in_shape))
    except Exception as e:  # noqa: BLE001
        raise LmcxError(f"model.arch {cfg.arch}: the model fails on {'x'.join(map(str, in_shape))} images "
                        f"({_line(e)}); it may need larger images (see README: Any model)") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise LmcxError(f"model.arch {cfg.arch}: the model returns {got} for a batch of 2 images; lmcx needs "
                        f"logits of shape [N, {num_classes}] (the number of classes)")
    _checked.add(key)


def _where(e: Exception) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""


def _line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
