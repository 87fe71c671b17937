"""`lmcx` command line: a thin shell that parses, calls the library, and writes.

Each subcommand lives in its own module here, named for it, and registers itself on `app` (app.py,
with the options every subcommand shares): train, evaluate, import_weights (`lmcx import`), match,
interpolate, calibrate, analyze_svd, lewc, and run (`lmcx run` and `lmcx report`). The library does the
work; these modules parse, call it and print.
"""
from __future__ import annotations

import signal
import sys

import typer

from ..console import console
from ..errors import INTERRUPTED_EXIT_CODE, TERMINATED_EXIT_CODE, LmcxError
from .app import app
from . import analyze_svd, calibrate, collect, evaluate, import_weights, interpolate, lewc, match, run, train  # noqa: E402,F401  (registers commands)


def main() -> None:
    """Entry point: bad input -> `error: <one line>` and exit code 2, never a traceback. Ctrl-C and SIGTERM
    stop the same way: one line, the state of finished work kept, exit 130 / 143."""
    signals: list[int] = []

    def terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C: temporary files go, finished epochs stay
        signals.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        code = app(standalone_mode=False)
    except LmcxError as e:
        console.print(f"error: {_one_line(str(e))}", markup=False)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED_EXIT_CODE
    except Exception as e:
        # Typer's usage errors (bad flag, wrong value type) come from its vendored click: same shape.
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
            console.print(f"error: {_one_line(e.format_message())}{hint}", markup=False)
            sys.exit(e.exit_code)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code == INTERRUPTED_EXIT_CODE:  # typer itself turns Ctrl-C into a return code of 130, without a word
        console.print("interrupted (SIGTERM)" if signals else "interrupted", markup=False)
        code = TERMINATED_EXIT_CODE if signals else code
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str, limit: int = 1000) -> str:
    """A message on one line, its middle cut when it quotes a long value (the start names what is wrong, the
    end how to fix it)."""
    message = " ".join(message.splitlines())
    return message if len(message) <= limit else f"{message[:limit // 2]} … {message[-limit // 3:]}"
