"""`lmcx analyze-svd`."""
from __future__ import annotations

from ..errors import LmcxError
from .app import app


@app.command("analyze-svd")
def analyze_svd() -> None:
    """Not implemented yet."""
    raise LmcxError("`lmcx analyze-svd` is not implemented yet")
