"""Atomic artefact writes: write under a temporary name in the same folder, then rename.

A crash (or a full disk) can then never leave a half-written file under its final name, and
re-running a step simply overwrites or skips finished files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def tmp_name(path: Path) -> Path:
    """A unique temporary sibling of `path` that keeps its suffix (GDAL picks drivers by suffix)."""
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it onto `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if tmp.is_dir():
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        else:
            with open(tmp, "rb") as f:  # flush data to disk before the rename makes it visible
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(x: Any) -> Any:
    """Plain JSON values: numpy scalars -> Python, Path -> str, NaN/inf -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return str(x) if isinstance(x, Path) else x


def atomic_write_json(path: str | Path, doc: Any) -> None:
    """`doc` as strict, indented JSON (see `json_safe`), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
