"""Writes that are whole or absent: a crash, a kill or a full disk never leaves a half-written file behind.

- `write_atomic` / `write_jsonl_atomic`: to a temporary name in the same folder, flushed to disk, renamed over the
  target, the folder flushed too (a rename is only durable once its directory is); on any failure the temporary
  file is removed and the target is untouched.
- `append_line`: one line appended with a single write; a write that fails or comes up short (a full disk) is cut
  back, so the file still ends at a line boundary.
- `fsync_tree`: everything under a folder on disk, before a checkpoint's completion mark is renamed in.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (renames, new files) durable; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to disk."""
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                fd = os.open(Path(root) / name, os.O_RDONLY)
            except FileNotFoundError:  # another process's temporary file, renamed away meanwhile
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def _replace_with(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)  # a failed write() names no file; the error line should
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path`: the old content or the new, never a mix or a stub."""
    _replace_with(path, lambda handle: handle.write(text))


def write_jsonl_atomic(path: Path, rows: Iterable[Any]) -> None:
    """One JSON object per line, written like `write_atomic`: the file is complete or absent."""

    def write(handle: Any) -> None:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    _replace_with(path, write)


def append_line(path: Path, line: str) -> None:
    """Append `line` (a newline is added) with one write; on failure the file is cut back to where it ended."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"wrote {written} of {len(data)} bytes to {path.name} (is the disk full?)")
        except BaseException:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)
