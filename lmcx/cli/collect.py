"""`lmcx collect`: one table of every run below some folders (see lmcx.collect)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .app import OFF, app


def _cell(value: Any, base: str) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)  # paths, and lists of them, are shown below the folder that holds every run
    return "." if text == base else text.replace(base + os.sep, "")


def _base(rows: list[dict[str, Any]]) -> str:
    return os.path.commonpath([os.path.abspath(r["path"]) for r in rows])


def _plain(columns: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [columns] + cells
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


@app.command("collect")
def collect(
    paths: Annotated[list[Path], typer.Argument(help="Folders to search: run directories, experiments, or any "
                                                     "folder above them.")],
    csv: Annotated[Optional[Path], typer.Option(
        "--csv", show_default="none", help="Also write every row to this CSV file.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", show_default=OFF, help="Print the rows as JSON records instead of the table.")] = False,
) -> None:
    """One row per run below PATHS (train, match, interpolate, svd, lewc, experiments): kind, status, the
    settings that differ between rows, headline figures (test accuracy, L2 before/after, loss and accuracy
    barriers raw and calibrated, alignment R, LEWC/LLFC cosines). Unfinished and broken runs are listed as such.

    For pandas: pandas.read_csv("runs.csv") or pandas.read_json(output of --json).

    Example, after the README's examples:

    \b
    lmcx collect outputs runs --csv runs.csv
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from ..collect import collect as collect_rows
    from ..console import console
    from ..io import _json_safe, write_csv

    rows = collect_rows(list(paths))
    if csv is not None and rows:
        write_csv(csv, rows)
    if as_json:
        typer.echo(json.dumps(_json_safe(rows), indent=1))
    elif rows:
        columns = [c for c in rows[0] if any(r[c] not in (None, "") for r in rows)]
        base = _base(rows)
        cells = [[_cell(os.path.abspath(r[c]) if c == "path" else r[c], base) for c in columns] for r in rows]
        out = Console(highlight=False, soft_wrap=False)
        if out.is_terminal:
            table = Table(*columns, header_style="bold")
            for line in cells:
                table.add_row(*line)
            out.print(table)
        else:
            typer.echo(_plain(columns, cells))
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    where = _base(rows) if rows else ", ".join(map(str, paths))
    console.print(f"{len(rows)} runs below {where}" + (f": {summary}" if rows else ""), markup=False)
    if csv is not None and rows:
        console.print(f"wrote {csv}", markup=False)
