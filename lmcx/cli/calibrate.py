"""`lmcx calibrate`."""
from __future__ import annotations

from ..errors import LmcxError
from .app import app


@app.command("calibrate")
def calibrate() -> None:
    """Not implemented yet."""
    raise LmcxError("`lmcx calibrate` is not implemented yet")
