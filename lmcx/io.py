"""Reading and writing files safely.

Writes: every output is written to a temporary file and renamed into place, so a killed process never
leaves a file that looks complete but is not; the file gets the mode the umask allows, like any other.
Reads: JSON and YAML are parsed strictly and within bounds, because a file is data, not instructions: a
duplicate key is an error (never "the last one wins"), and size, nesting and alias expansion are capped
so that no input can exhaust memory or the stack.
"""
from __future__ import annotations

import csv
import json
import math
import os
import reprlib
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import LmcxError

MAX_YAML_BYTES = 1 << 20  # configs and recorded settings are a few KiB
MAX_JSON_BYTES = 64 << 20  # permutation files of wide models, barrier files
MAX_DEPTH = 32  # nesting of a YAML document (lmcx's settings nest 3 levels)
MAX_VALUES = 10_000  # values of a YAML document once its aliases are expanded
ECHO_CHARS = 200  # at most this much of an input is quoted back in a message


_ECHO = reprlib.Repr()  # Python 3.11's Repr takes no settings in its constructor
_ECHO.maxlevel, _ECHO.maxstring, _ECHO.maxother = 4, ECHO_CHARS, ECHO_CHARS


def shorten(value: Any, limit: int = ECHO_CHARS) -> str:
    """repr of `value` for a message: one line, about `limit` characters at most. reprlib stops early, so a
    huge value (an expanded YAML alias bomb) never costs more than its first few items to show."""
    text = value if isinstance(value, str) and value.isprintable() else _ECHO.repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it onto `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise LmcxError(f"cannot write {path}: {e.strerror or e}; choose a writable output directory") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and safetensors, which recreates the file) make 0600 files: give the mode the umask allows
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise LmcxError(f"cannot write {path}: {e.strerror or e}; check free disk space and permissions") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows of dicts; the header is the union of keys in first-seen order."""
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Bounded, strict reading


def read_bounded(path: str | Path, limit: int, what: str) -> str:
    """The text of `path`, refusing files over `limit` bytes (read up to the limit only: a device or a
    pipe that never ends costs no more). Raises OSError / UnicodeDecodeError for unreadable files."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LmcxError(f"{what} {path} is larger than {limit // 1024} KiB, far more than lmcx writes or reads "
                        "there; pass the right file")
    return data.decode("utf-8")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {shorten(repr(key))} in one object (a later value would silently "
                             "replace the earlier one)")
        out[key] = value
    return out


def loads_json(text: str) -> Any:
    """json.loads that refuses duplicate keys and deep nesting; raises ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return loads_json(read_bounded(path, MAX_JSON_BYTES, "JSON file"))
    except FileNotFoundError:
        raise LmcxError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise LmcxError(f"{path} is a directory, expected a JSON file") from None
    except OSError as e:
        raise LmcxError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise LmcxError(f"{path} is not valid JSON ({e}); delete it and re-run the step that writes it") from None


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    source = "YAML"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # merge keys (<<) may be overridden on purpose; complex keys fail below
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise LmcxError(f"{self.source}: duplicate key {shorten(repr(key))} at line {line} (first at line "
                                    f"{seen[key]}); a later key would silently replace the earlier one: merge them")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _measure(value: Any, depth: int, sizes: dict[int, int], open_ids: set[int], source: str) -> int:
    """Values in `value` once aliases are expanded; refuses too deep, too many, or self-containing."""
    if not isinstance(value, (dict, list)):
        return 1
    if depth > MAX_DEPTH:
        raise LmcxError(f"{source} is nested more than {MAX_DEPTH} levels deep; lmcx settings nest a few levels")
    if id(value) in open_ids:
        raise LmcxError(f"{source} holds a value that contains itself (a recursive YAML alias)")
    if id(value) not in sizes:
        open_ids.add(id(value))
        total = 1
        for child in value.values() if isinstance(value, dict) else value:
            total += _measure(child, depth + 1, sizes, open_ids, source)
            if total > MAX_VALUES:
                raise LmcxError(f"{source} expands to more than {MAX_VALUES} values (YAML aliases?); lmcx "
                                "settings are a few dozen")
        open_ids.discard(id(value))
        sizes[id(value)] = total
    return sizes[id(value)]


def load_yaml(text: str, source: str) -> Any:
    """yaml.safe_load of `text` within bounds (size, nesting, alias expansion) and without duplicate keys.
    Bound violations raise LmcxError naming `source`; invalid YAML raises yaml.YAMLError as usual."""
    if len(text) > MAX_YAML_BYTES:
        raise LmcxError(f"{source} is larger than {MAX_YAML_BYTES // 1024} KiB; lmcx settings are a few KiB")
    loader = _StrictLoader(text)
    loader.source = source
    try:
        data = loader.get_single_data()
    except RecursionError:
        raise LmcxError(f"{source} is nested more than {MAX_DEPTH} levels deep; lmcx settings nest a few "
                        "levels") from None
    finally:
        loader.dispose()
    _measure(data, 0, {}, set(), source)
    return data


def read_yaml(path: str | Path) -> Any:
    """load_yaml of a file read within MAX_YAML_BYTES. Raises LmcxError (bounds, duplicate keys), yaml.YAMLError,
    OSError or UnicodeDecodeError: callers say what the file should have been."""
    return load_yaml(read_bounded(path, MAX_YAML_BYTES, "YAML file"), str(path))
