"""`lmcx match`."""
from __future__ import annotations

from ..errors import LmcxError
from .app import app


@app.command("match")
def match() -> None:
    """Not implemented yet."""
    raise LmcxError("`lmcx match` is not implemented yet")
