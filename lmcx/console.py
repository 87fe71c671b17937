"""Terminal output: messages on stderr (stdout stays free for machine-readable output), and whether
progress may be shown at all (`--quiet` / $LMCX_QUIET). Progress itself is lmcx.progress."""
from __future__ import annotations

import os

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)
QUIET_ENV = "LMCX_QUIET"
_quiet = False


def set_quiet(quiet: bool) -> None:
    """--quiet: no progress output in this process (results and errors still print)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet or os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")
