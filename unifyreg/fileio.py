"""Atomic file writes: a kill never leaves a truncated file behind.

One writer, :func:`atomic_file`: the content goes to a temporary file in the target's
directory, is flushed to disk, gets the mode a plain ``open`` would give (``0o666`` minus
the process umask: ``tempfile.mkstemp`` alone would leave ``0o600``, unreadable to a
TensorBoard or a colleague running as another user), and is renamed over the target.
Every text, JSON and figure file unifyreg writes goes through it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_directory", "atomic_file", "atomic_write_json", "atomic_write_text"]


def _default_file_mode() -> int:
    """``0o666`` minus the current umask (what ``open(path, "w")`` creates)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Yield a handle (``mode`` ``"w"`` or ``"wb"``) whose content replaces ``path`` when
    the block ends without error; on an error the target is left as it was and the
    temporary file removed. An ``OSError`` without a file name (a full disk: ``ENOSPC``
    from a write or the final flush) gets ``path`` as its ``filename``, so its message
    names the file that could not be written."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`); returns the path."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """``atomic_write_text`` of ``data`` as JSON with sorted keys: indented by ``indent``
    spaces, or on one line without spaces (``indent=None``: for large machine-read files,
    written about twice as fast)."""
    if indent is None:
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    else:
        text = json.dumps(data, indent=indent, sort_keys=True)
    return atomic_write_text(path, text + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh staging directory next to ``path``; on success it replaces ``path``
    by renames, so ``path`` is either the old complete directory or the new complete one
    (a kill between the two renames leaves the old one as ``.<name>.<id>.old``). On an
    error the staging directory is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    staging = path.with_name(f".{path.name}.{token}.tmp")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.{token}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)
