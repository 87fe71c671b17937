"""Terminal output: messages on stderr (stdout stays free for machine-readable output), and whether
progress may be shown at all (`--quiet` / $LMCX_QUIET). Progress itself is lmcx.progress."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)
QUIET_ENV = "LMCX_QUIET"
_quiet = False


def set_quiet(quiet: bool) -> None:
    """--quiet: no progress output in this process (results and errors still print)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet or os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A rich bar on a terminal, nothing elsewhere (kept for the callers not yet on lmcx.progress)."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console,
                   disable=not console.is_terminal or is_quiet(), transient=False)
    with bar:
        yield bar
