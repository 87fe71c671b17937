"""Which architectures `model.arch` can name, and when naming one runs someone's code.

Three kinds (`arch_kind`):
  built-in     `mlp`, `vgg11`, `vgg16`, `resnet20` (lmcx/models/)
  torchvision  `torchvision.<name>`: any classification builder of torchvision.models, built with
               weights=None (never a download)
  factory      `package.module:callable`: the user's own model, built by importing that module and
               calling the callable. This runs the user's code, so it happens only when the user named
               it: in a config or flag of `lmcx train` / `lmcx import`, in the experiment YAML of
               `lmcx run`, or, for a checkpoint whose header names a factory, with
               `--trust-code MODULE` (or LMCX_TRUST_CODE=MODULE[,MODULE...]). A checkpoint alone never
               makes lmcx import anything (`require_trusted`).

Kept free of torch imports: config validation and checkpoint loading read it.
"""
from __future__ import annotations

import os
import re

from .errors import LmcxError

BUILTIN_ARCHS = ("mlp", "vgg11", "vgg16", "resnet20")
TORCHVISION_PREFIX = "torchvision."
TRUST_ENV = "LMCX_TRUST_CODE"

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
FACTORY_SYNTAX = re.compile(rf"^{_NAME}(\.{_NAME})*:{_NAME}(\.{_NAME})*$")

_trusted: set[str] = set()  # modules whose factories may be imported for checkpoints in this process


def arch_kind(arch: str) -> str:
    """'builtin', 'torchvision' or 'factory' (syntax only; `check_arch` says whether it exists)."""
    if arch in BUILTIN_ARCHS:
        return "builtin"
    if arch.startswith(TORCHVISION_PREFIX):
        return "torchvision"
    if FACTORY_SYNTAX.match(arch):
        return "factory"
    raise LmcxError(f"unknown architecture {arch!r}; use one of {', '.join(BUILTIN_ARCHS)}, "
                    "torchvision.<name> (e.g. torchvision.resnet18) or package.module:callable (your own factory)")


def torchvision_names() -> list[str]:
    """The classification builders of torchvision.models (not detection, segmentation, video, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """Raise LmcxError unless `arch` names an architecture that exists (a factory: by syntax only;
    importing it is building it)."""
    if arch_kind(arch) == "torchvision":
        name = arch[len(TORCHVISION_PREFIX):]
        names = torchvision_names()
        if name not in names:
            close = [n for n in names if n.startswith(name[:4])][:6] or names[:6]
            raise LmcxError(f"{arch!r} is not a torchvision classification model; e.g. "
                            f"{', '.join(TORCHVISION_PREFIX + n for n in close)} "
                            "(all: torchvision.models.list_models())")


def factory_module(arch: str) -> str:
    return arch.split(":", 1)[0]


def trust_code(*names: str) -> None:
    """Allow importing these modules (or the modules of these `module:callable` strings) for checkpoints."""
    _trusted.update(factory_module(n.strip()) for n in names if n.strip())


def trust_named(arch: str) -> None:
    """The user named `arch` in their own settings (an experiment YAML): checkpoints of it may import it."""
    if arch_kind(arch) == "factory":
        trust_code(arch)


def is_trusted(module: str) -> bool:
    from_env = {factory_module(n.strip()) for n in os.environ.get(TRUST_ENV, "").split(",") if n.strip()}
    return module in _trusted | from_env


def require_trusted(arch: str, source: str) -> None:
    """Refuse a factory architecture named by a file (`source`) unless the user trusts its module."""
    try:
        if arch_kind(arch) != "factory":
            return
    except LmcxError:
        return  # not an architecture at all: building it says so
    module = factory_module(arch)
    if not is_trusted(module):
        raise LmcxError(f"{source} names model.arch {arch!r}, which would import and run module {module!r}; "
                        f"lmcx never runs code because a file names it: if you trust that code, pass "
                        f"--trust-code {module} (or set {TRUST_ENV}={module})")
