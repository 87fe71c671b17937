"""`lmcx lewc`."""
from __future__ import annotations

from ..errors import LmcxError
from .app import app


@app.command("lewc")
def lewc() -> None:
    """Not implemented yet."""
    raise LmcxError("`lmcx lewc` is not implemented yet")
