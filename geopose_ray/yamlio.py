"""The one reader of the project's YAML inputs (config files, search spaces, a checkpoint's
config.yaml): each caller used to write its own try / except, and their messages drifted apart.
Here a missing, unreadable or malformed file is refused alike: `InputError` naming the file, so
the command exits 2 with one line (`errors.run_cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from geopose_ray.errors import InputError


def read_yaml_mapping(
    path: str | Path, what: str, not_mapping: str, empty_ok: bool = False
) -> dict[str, Any]:
    """The mapping a YAML file holds. InputError naming `path`: `cannot read <what> (...)` when
    the file is missing, unreadable or not YAML; `not_mapping` when it holds something else (a
    list, a scalar; an empty file too, unless `empty_ok`, which reads it as {})."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InputError(path, f"cannot read {what} ({e.__class__.__name__}: {_one_line(e)})") from None
    if doc is None and empty_ok:
        return {}
    if not isinstance(doc, dict):
        raise InputError(path, not_mapping)
    return doc


def _one_line(e: Exception) -> str:
    """What went wrong, on one line: the OS's reason (the path is already named), or what the
    YAML parser expected and where (its own message spans several lines and quotes the text)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        return e.problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")
    return " ".join(str(e).split())
