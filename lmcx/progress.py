"""Progress of long work, one small API for every step of lmcx:

    from lmcx import progress
    with progress.task("match wm", total=sweeps, unit="sweep") as t:
        for ...:
            t.advance(1, objective=obj, changed=n)
        t.log("converged after 7 sweeps")

    for layer in progress.track(layers, "svd", unit="layer"):  # a task advanced once per item
        ...

    progress.tick()  # in an inner loop that owns no task (evaluation batches, norm-fix passes): lets the
                     # innermost open task print its line (or refresh its bar) if one is due

Where it goes (always stderr, through lmcx.console; never into result files):
  - a terminal: rich bars; tasks opened inside another task share its display (an inner task's row
    goes away when it ends, the outermost stays);
  - anything else (CI, SLURM logs, `| tee`): a plain line once a task has run FIRST_LINE_S, then one
    every INTERVAL_S, and a closing line for a task that printed any; short tasks print nothing.
    $LMCX_PROGRESS_INTERVAL (seconds) overrides the interval (the first line comes at the smaller of
    the two);
  - `--quiet` / $LMCX_QUIET=1: nothing at all, `log` lines included.

Field values may be numbers, strings, 0-d tensors or zero-argument callables; they are evaluated only
when shown (a few times a second at most on a terminal, every INTERVAL_S in a log), so a training step
can pass device tensors without forcing a host synchronisation per step.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .console import console, is_quiet

FIRST_LINE_S = 5.0
INTERVAL_S = 10.0
INTERVAL_ENV = "LMCX_PROGRESS_INTERVAL"
REFRESH_S = 0.25  # how often fields are re-evaluated for a terminal bar
clock: Callable[[], float] = time.monotonic  # tests replace it

_bars: Progress | None = None  # the rich display shared by the open tasks on a terminal
_open = 0
_shown: list["Task"] = []  # open tasks that show something, innermost last (what `tick` refreshes)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, INTERVAL_S)))
    except ValueError:
        return INTERVAL_S


def _value(v: Any) -> Any:
    if callable(v):
        v = v()
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _clock_text(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Task:
    """One unit of long work: `advance` it, `update` its fields, `log` a line. See the module docstring."""

    def __init__(self, description: str, total: float | None, unit: str, show: bool):
        self.description, self.total, self.unit = description, total, unit
        self.done = 0.0
        self.fields: dict[str, Any] = {}
        self.show = show and not is_quiet()
        self.plain = not console.is_terminal
        self.started = clock()
        interval = _interval()
        self._interval = interval
        self._next = self.started + min(FIRST_LINE_S, interval)  # when the next plain line / field refresh is due
        self._printed = False
        self._row = None
        if self.show and not self.plain:
            assert _bars is not None
            self._row = _bars.add_task(description, total=total, unit=unit, status="")
            self._next = self.started

    def advance(self, n: float = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        self._maybe_show()

    def update(self, description: str | None = None, **fields: Any) -> None:
        if description is not None:
            self.description = description
        self.fields.update(fields)
        self._maybe_show(force=self._row is not None)

    def log(self, message: str) -> None:
        """A line that stays (above the bars on a terminal); silenced by --quiet."""
        if self.show:
            console.print(message, markup=False, highlight=False)

    def status(self) -> str:
        """Rate, ETA and fields, e.g. `812 img/s, eta 0:41, loss 0.1234` (fields evaluated now)."""
        elapsed = max(clock() - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [f"{_fmt(rate if rate >= 100 else round(rate, 2))} {self.unit}/s"] if self.done else []
        if self.total and self.done and self.done < self.total:
            parts.append(f"eta {_clock_text((self.total - self.done) / rate)}")
        parts += [f"{k} {_fmt(_value(v))}" for k, v in self.fields.items()]
        return ", ".join(parts)

    def line(self) -> str:
        """The plain form: `description: done/total unit (pct%), status [elapsed]`."""
        count = f"{_fmt(self.done)}" + (f"/{_fmt(self.total)}" if self.total else "")
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        status = self.status()
        return (f"{self.description}: {count} {self.unit}{pct}" + (f", {status}" if status else "")
                + f" [{_clock_text(clock() - self.started)}]")

    def _maybe_show(self, force: bool = False) -> None:
        if not self.show:
            return
        now = clock()
        if self._row is not None:
            assert _bars is not None
            if force or now >= self._next:  # fields are evaluated only here
                _bars.update(self._row, completed=self.done, description=self.description, status=self.status())
                self._next = now + REFRESH_S
            else:
                _bars.update(self._row, completed=self.done)
        elif now >= self._next:
            console.print(self.line(), markup=False, highlight=False)
            self._printed = True
            self._next = now + self._interval

    def _close(self, outermost: bool) -> None:
        if not self.show:
            return
        if self._row is not None:
            assert _bars is not None
            if outermost:
                _bars.update(self._row, completed=self.done, description=self.description, status=self.status())
            else:
                _bars.remove_task(self._row)
        elif self._printed:
            console.print(f"{self.line()} done", markup=False, highlight=False)


def tick() -> None:
    """Give the innermost open task a chance to show itself (a plain line when one is due, a bar
    refresh): for long inner loops that do not own a task, so that a log never falls silent."""
    if _shown:
        _shown[-1]._maybe_show()


T = TypeVar("T")


def track(items: Iterable[T], description: str, total: float | None = None, unit: str = "it") -> Iterator[T]:
    """Yield `items`, advancing a task (see `task`) once per item; `total` defaults to len(items)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total, unit) as t:
        for item in items:
            yield item
            t.advance(1)


@contextmanager
def task(description: str, total: float | None = None, unit: str = "it", show: bool = True) -> Iterator[Task]:
    """Report progress of the work inside the block (`show=False`: say nothing, e.g. on ranks other than 0)."""
    global _bars, _open
    terminal = show and not is_quiet() and console.is_terminal
    if terminal and _bars is None:
        _bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                         TextColumn("{task.fields[status]}"), console=console, transient=False)
        _bars.start()
    _open += 1
    t = Task(description, total, unit, show)
    if t.show:
        _shown.append(t)
    try:
        yield t
    finally:
        _open -= 1
        if t.show:
            _shown.remove(t)
        t._close(outermost=_open == 0)
        if _open == 0 and _bars is not None:
            _bars.stop()
            _bars = None
