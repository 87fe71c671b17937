"""Run directories: complete only when their marker file exists, claimed by one process at a time.

Every step (train, match, interpolate, ...) writes into its own directory, its marker file last.
So a shell loop can be re-run safely: a finished step is skipped, an interrupted one is redone, and two
processes started at once never both work in the same directory (an exclusive `flock` on `.lock`).
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .errors import LmcxError
from .io import write_yaml

CONFIG_FILE = "config.yaml"
# Settings that do not change a result: a finished run is still valid when only these differ.
NON_RESULT_KEYS = {"device", "out", "data.root", "data.download", "train.compile", "train.eval_batch_size"}


def is_complete(run_dir: str | Path, marker: str = "metrics.json") -> bool:
    return (Path(run_dir) / marker).is_file()


@contextmanager
def claim(run_dir: str | Path, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on `run_dir` for the block; yields False (without waiting, unless `wait`)
    when another process holds it. The lock dies with the process, so a killed run never blocks."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LmcxError(f"cannot create run directory {run_dir}: {e.strerror}; choose a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_difference(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> str | None:
    """First result-relevant setting that differs, as 'key: old -> new', or None. Keys in `ignore` are
    treated like NON_RESULT_KEYS (settings that cannot make this step's finished outputs stale)."""
    a, b = _flatten(old), _flatten(new)
    skip = NON_RESULT_KEYS | set(ignore)
    for key in sorted(set(a) | set(b)):
        if key not in skip and a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
    return None


def check_settings(run_dir: str | Path, resolved: dict[str, Any], ignore: Iterable[str] = ()) -> None:
    """Refuse to reuse a run directory whose recorded settings differ from these (`ignore`: see
    settings_difference)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, OSError):
        return  # unreadable record: the caller starts over and rewrites it
    diff = settings_difference(old, resolved, ignore)
    if diff:
        raise LmcxError(f"{run_dir} holds a run with other settings ({diff}); pass --force to redo it there "
                        "or --out for a new directory")


def start(run_dir: str | Path, resolved: dict[str, Any], outputs: list[str], marker: str = "metrics.json") -> None:
    """Begin (or restart) a step: drop its old outputs, marker first, and record the settings."""
    run_dir = Path(run_dir)
    for name in [marker] + [o for o in outputs if o != marker]:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for stale in run_dir.glob(".*.tmp"):  # temporary files of a writer that was killed (io.atomic_path);
        stale.unlink(missing_ok=True)     # we hold the directory's lock, so no live writer owns them
    write_yaml(run_dir / CONFIG_FILE, resolved)


def run_once(run_dir: str | Path, resolved: dict[str, Any], outputs: list[str], step, *, force: bool = False,
             wait: bool = False, keep: tuple[str, ...] = (), marker: str = "metrics.json") -> str:
    """Run `step()` into `run_dir` unless its outputs are complete. Returns "done", "skipped" (complete
    with the same settings) or "busy" (another process holds the directory and `wait` is False).
    Outputs named in `keep` survive a restart (e.g. the training state that --resume continues from)."""
    if is_complete(run_dir, marker) and not force:
        check_settings(run_dir, resolved)
        return "skipped"
    with claim(run_dir, wait) as claimed:
        if not claimed:
            return "busy"
        if is_complete(run_dir, marker) and not force:  # finished by another process while we waited
            check_settings(run_dir, resolved)
            return "skipped"
        if keep:
            check_settings(run_dir, resolved)  # continuing a partial run: its settings must match
        start(run_dir, resolved, [o for o in outputs if o not in keep], marker)
        step()
        return "done"
