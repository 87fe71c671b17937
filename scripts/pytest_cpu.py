"""A pytest plugin: CPU seconds per test (user + system, of the test's process and of the subprocesses it
waited for), which depends less on other load than the wall times of --durations do. Setup (module-scoped
fixtures included) counts to the first test that needs it. Prints the slowest 40 and the total at the end;
with $PYTEST_CPU_OUT set, each worker also appends "cpu<TAB>wall<TAB>nodeid" lines to that file (xdist
workers print nothing themselves).

  PYTHONPATH=scripts .venv/bin/python -m pytest -p pytest_cpu [-n 0] [FILES...]
"""
from __future__ import annotations

import os
import resource
import time

import pytest

_rows: list[tuple[float, float, str]] = []


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _cpu(), time.perf_counter()
    yield
    row = (_cpu() - cpu, time.perf_counter() - wall, item.nodeid)
    _rows.append(row)
    if os.environ.get("PYTEST_CPU_OUT"):
        with open(os.environ["PYTEST_CPU_OUT"], "a") as f:
            f.write(f"{row[0]:.2f}\t{row[1]:.2f}\t{row[2]}\n")


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    terminalreporter.write_sep("=", f"CPU s per test (total {sum(r[0] for r in _rows):.1f} s in {len(_rows)} tests)")
    for cpu, wall, nodeid in sorted(_rows, reverse=True)[:40]:
        terminalreporter.write_line(f"{cpu:8.2f} cpu {wall:8.2f} wall  {nodeid}")
