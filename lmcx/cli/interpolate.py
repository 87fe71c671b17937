"""`lmcx interpolate`."""
from __future__ import annotations

from ..errors import LmcxError
from .app import app


@app.command("interpolate")
def interpolate() -> None:
    """Not implemented yet."""
    raise LmcxError("`lmcx interpolate` is not implemented yet")
