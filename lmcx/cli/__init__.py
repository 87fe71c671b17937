"""`lmcx` command line: a thin shell that parses, calls the library, and writes.

Each subcommand lives in its own module here, named for it, and registers itself on `app` (app.py,
with the options every subcommand shares): train, evaluate, match, interpolate, calibrate, analyze_svd,
lewc, and run (`lmcx run` and `lmcx report`). The library does the work; these modules parse, call it
and print.
"""
from __future__ import annotations

import sys

import typer

from ..console import console
from ..errors import LmcxError
from .app import app
from . import analyze_svd, calibrate, collect, evaluate, interpolate, lewc, match, run, train  # noqa: E402,F401  (registers commands)


def main() -> None:
    """Entry point: bad input -> `error: <one line>` and exit code 2, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except LmcxError as e:
        console.print(f"error: {e}", markup=False)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as e:
        # Typer's usage errors (bad flag, wrong value type) come from its vendored click: same shape.
        if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
            console.print(f"error: {e.format_message()}{hint}", markup=False)
            sys.exit(e.exit_code)
        raise
    if code == 130:  # typer itself turns Ctrl-C into a return code of 130, without a word
        console.print("interrupted", markup=False)
    sys.exit(code if isinstance(code, int) else 0)
