"""Run directories: complete only when everything they hold is whole, claimed by one process at a time.

Every step (train, match, interpolate, ...) writes into its own directory, its marker file last, and
`run_once` then lists the files the marker vouches for in a hidden manifest. A directory is complete only
when the marker, the recorded settings (config.yaml) and every listed file exist and parse; anything less
is redone. So a shell loop can be re-run safely: a finished step is skipped, an interrupted or damaged one
redone, and two processes never both work in one directory (an exclusive `flock` on `.lock`, removed when
the step ends).
"""
from __future__ import annotations

import fcntl
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
from safetensors import SafetensorError, safe_open

from .console import console
from .errors import LmcxError
from .io import loads_json, read_json, read_yaml, shorten, write_json, write_yaml

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
MANIFEST_FILE = ".outputs.json"  # the files a finished step vouches for
# Settings that do not change a result: a finished run is still valid when only these differ.
NON_RESULT_KEYS = {"device", "out", "data.root", "data.download", "train.compile", "train.eval_batch_size", "track",
                   "threads", "match.threads", "interpolate.threads", "svd.threads", "lewc.threads"}
# Settings naming input files, compared as locations: the same experiment given with an absolute --out
# (or a relative one) still matches its finished steps.
INPUT_PATH_KEYS = ("a", "b", "perm", "perms", "b_permuted")
LOCK_TIMEOUT_ENV = "LMCX_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 3600.0  # seconds a step waits for another process's lock (`lmcx run`)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Completeness


def incomplete_reason(run_dir: str | Path, marker: str = "metrics.json") -> str | None:
    """Why `run_dir` is not a finished step (its marker, settings or a file the marker vouches for is
    missing or does not parse), or None when it is."""
    run_dir = Path(run_dir)
    if not (run_dir / marker).is_file():
        return f"no {marker}"
    _, why = read_settings(run_dir)
    if why:
        return why
    try:
        names = _vouched_files(run_dir)
    except LmcxError as e:
        return f"its list of outputs is unreadable ({e})"
    for name in [marker, *names]:
        problem = unreadable(run_dir / name)
        if problem:
            return f"{name} {problem}"
    return None


def is_complete(run_dir: str | Path, marker: str = "metrics.json") -> bool:
    return incomplete_reason(run_dir, marker) is None


def _vouched_files(run_dir: Path) -> list[str]:
    """The manifest's list; a directory finished before manifests existed (or killed between its marker
    and the manifest) vouches for every file it holds."""
    if not (run_dir / MANIFEST_FILE).is_file():
        return _listing(run_dir)
    names = read_json(run_dir / MANIFEST_FILE)
    if not (isinstance(names, list) and all(isinstance(n, str) and n and not Path(n).is_absolute()
                                            and ".." not in Path(n).parts for n in names)):
        raise LmcxError("not a list of file names inside the directory")
    return names


def _listing(run_dir: Path) -> list[str]:
    """Every visible regular file under `run_dir`, relative to it (hidden files are locks and temporaries)."""
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts))


def unreadable(path: Path) -> str | None:
    """What is wrong with an output file lmcx wrote, judged by its kind (None: it exists and parses)."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_file():
        return "is missing"
    try:
        if path.suffix == ".json":
            read_json(path)
        elif path.suffix == ".yaml":
            read_yaml(path)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:  # checks the header and that the tensors cover the file
                header = (f.metadata() or {}).get("lmcx")
            if header is None:
                return "has no lmcx metadata"
            loads_json(header)
        elif path.suffix in (".csv", ".png"):
            with open(path, "rb") as f:
                head = f.read(8)
                f.seek(max(0, path.stat().st_size - 12))
                tail = f.read()
            whole = tail.endswith(b"\n") if path.suffix == ".csv" else (head == PNG_SIGNATURE and b"IEND" in tail)
            if not whole:
                return "is empty or cut short"
    except (LmcxError, SafetensorError, yaml.YAMLError, ValueError, OSError, UnicodeDecodeError) as e:
        return f"does not parse ({shorten(str(e))})"
    return None


# ---------------------------------------------------------------------------------------------
# Recorded settings


def read_settings(run_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """(settings recorded in config.yaml, None), or (None, why they cannot be used)."""
    path = Path(run_dir) / CONFIG_FILE
    if path.is_symlink() or not path.is_file():
        return None, f"{CONFIG_FILE} is {'a symbolic link' if path.is_symlink() else 'missing'}"
    try:
        data = read_yaml(path)
    except (LmcxError, yaml.YAMLError, OSError, UnicodeDecodeError):
        return None, f"{CONFIG_FILE} is unreadable"
    if not isinstance(data, dict) or not data:
        return None, f"{CONFIG_FILE} is empty or not a mapping"
    return data, None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def result_settings(resolved: dict[str, Any], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The settings that can change a step's results, as dotted keys: all but NON_RESULT_KEYS and `ignore`
    (settings that cannot make this step's finished outputs stale)."""
    skip = NON_RESULT_KEYS | set(ignore)
    return {k: v for k, v in _flatten(resolved).items() if k not in skip}


def settings_difference(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> str | None:
    """First result-relevant setting that differs, as 'key: old -> new', or None (`ignore`: see
    result_settings)."""
    a, b = result_settings(old, ignore), result_settings(new, ignore)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {shorten(a.get(key))} -> {shorten(b.get(key))}"
    return None


def input_location(value: Any) -> Any:
    """An input path as the location it names (relative ones from the working directory): `runs/s0` and
    `./runs/s0` are one input. Anything but a string is itself."""
    return os.path.realpath(value) if isinstance(value, str) else value


def _same_input(old: Any, new: Any) -> bool:
    """Two input paths name the same location."""
    return old == new or input_location(old) == input_location(new)


def check_settings(run_dir: str | Path, resolved: dict[str, Any], ignore: Iterable[str] = ()) -> None:
    """Refuse to reuse a run directory whose recorded settings differ from these, or cannot be read
    (`ignore`: see settings_difference). Input paths match when they name the same location."""
    run_dir = Path(run_dir)
    old, why = read_settings(run_dir)
    if old is None:
        raise LmcxError(f"{run_dir} holds no usable record of its settings ({why}), so it cannot be reused; pass "
                        "--force to redo it there or --out for a new directory")
    new = dict(resolved)
    for key in INPUT_PATH_KEYS:  # the same location recorded another way is the same setting
        o, n = old.get(key), new.get(key)
        if isinstance(o, list) and isinstance(n, list) and len(o) == len(n):
            new[key] = [ov if _same_input(ov, nv) else nv for ov, nv in zip(o, n)]
        elif key in new and _same_input(o, n):
            new[key] = o
    diff = settings_difference(old, new, ignore)
    if diff:
        raise LmcxError(f"{run_dir} holds a run with other settings ({diff}); pass --force to redo it there "
                        "or --out for a new directory")


# ---------------------------------------------------------------------------------------------
# Locks


def lock_timeout() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_LOCK_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:
        raise LmcxError(f"{LOCK_TIMEOUT_ENV}={shorten(raw)}: expected seconds >= 0 (inf: wait forever)")
    return seconds


def _lock_holder(fd: int) -> str:
    """'process N' (with its state when it is stopped) from the pid a holder wrote into the lock file."""
    try:
        pid = int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return "another process"
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = ""
    return f"process {pid}" + (" (stopped: resume it with `kill -CONT`, or end it)" if state in ("T", "t") else "")


def _open_lock(run_dir: Path) -> int:
    try:
        return os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if (run_dir / LOCK_FILE).is_symlink():
            raise LmcxError(f"{run_dir / LOCK_FILE} is a symbolic link; remove it") from None
        raise LmcxError(f"cannot create run directory {run_dir}: {e.strerror}; choose a writable --out") from None


def _acquire(run_dir: Path, wait: bool) -> int | None:
    """A descriptor holding the lock of `run_dir`, or None when another process holds it and not `wait`.
    Waiting says for whom, and gives up after lock_timeout() seconds."""
    deadline = timeout = None
    while True:
        fd = _open_lock(run_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            if not wait:
                return None
            if deadline is None:
                timeout = lock_timeout()
                deadline = time.monotonic() + timeout
                console.print(f"{run_dir}: waiting for {holder}, which is working on it (giving up after "
                              f"{timeout:g} s; set {LOCK_TIMEOUT_ENV} to change that)", markup=False)
            if time.monotonic() >= deadline:
                raise LmcxError(f"{run_dir}: gave up after {timeout:g} s waiting for {holder}, which holds its lock; "
                                f"end that process if it is hung, or set {LOCK_TIMEOUT_ENV} to wait longer") from None
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            continue
        try:  # the holder we waited for removes the file as it lets go: lock the file that is there now
            same = os.path.samestat(os.fstat(fd), os.stat(run_dir / LOCK_FILE, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # so that a waiting process can say whom it waits for
            return fd
        os.close(fd)


def refuse_symlinks(run_dir: Path) -> None:
    """lmcx writes only into real directories and files: a link could send a write or a delete elsewhere."""
    if run_dir.is_symlink():
        raise LmcxError(f"{run_dir} is a symbolic link where a run directory should be; remove it or choose "
                        "another --out")
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if entry.is_symlink():
                raise LmcxError(f"{entry} is a symbolic link inside a run directory, where lmcx writes its own "
                                "files; remove it")


@contextmanager
def claim(run_dir: str | Path, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on `run_dir` for the block; yields False (without waiting, unless `wait`)
    when another process holds it. The lock dies with the process, so a killed run never blocks; a
    finished block removes the lock file."""
    run_dir = Path(run_dir)
    refuse_symlinks(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmcxError(f"cannot create run directory {run_dir}: {e.strerror}; choose a writable --out") from None
    fd = _acquire(run_dir, wait)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)  # while still holding it, see _acquire
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Steps


def start(run_dir: str | Path, resolved: dict[str, Any], outputs: list[str], marker: str = "metrics.json") -> None:
    """Begin (or restart) a step: drop its old outputs, manifest and marker first, and record the settings."""
    run_dir = Path(run_dir)
    refuse_symlinks(run_dir)
    for name in [MANIFEST_FILE, marker] + [o for o in outputs if o != marker]:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for stale in run_dir.glob(".*.tmp"):  # temporary files of a writer that was killed (io.atomic_path);
        stale.unlink(missing_ok=True)     # we hold the directory's lock, so no live writer owns them
    write_yaml(run_dir / CONFIG_FILE, resolved)


def run_once(run_dir: str | Path, resolved: dict[str, Any], outputs: list[str], step, *, force: bool = False,
             wait: bool = False, keep: tuple[str, ...] = (), marker: str = "metrics.json",
             ignore: Iterable[str] = ()) -> str:
    """Run `step()` into `run_dir` unless it is complete. Returns "done", "skipped" (complete with the same
    settings) or "busy" (another process holds the directory and `wait` is False).
    Outputs named in `keep` survive a restart (e.g. the training state a run resumes from) when the recorded
    settings match; `force` redoes the step from scratch, kept files included. `ignore`: see settings_difference."""
    run_dir = Path(run_dir)
    refuse_symlinks(run_dir)
    if not force and is_complete(run_dir, marker):
        check_settings(run_dir, resolved, ignore)
        return "skipped"
    with claim(run_dir, wait) as claimed:
        if not claimed:
            return "busy"
        if not force:
            reason = incomplete_reason(run_dir, marker)
            if reason is None:  # finished by another process while we waited
                check_settings(run_dir, resolved, ignore)
                return "skipped"
            if (run_dir / marker).exists():
                console.print(f"{run_dir}: not complete after all ({reason}); redoing it", markup=False)
        kept = [] if force else [k for k in keep if (run_dir / k).exists()]
        if kept or (keep and not force and read_settings(run_dir)[0] is not None):
            check_settings(run_dir, resolved, ignore)  # a partial run is continued, never restarted under other settings
        start(run_dir, resolved, [o for o in [*outputs, *keep] if o not in kept], marker)
        step()
        if (run_dir / marker).is_file():
            write_json(run_dir / MANIFEST_FILE, _listing(run_dir))
        return "done"
