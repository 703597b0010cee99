"""Write a file or a folder so readers see the old one or the whole new one, never a part.

The new content goes to a temp file (or folder) beside the target, which `os.replace` then moves
onto the target; if the writer fails or is interrupted the temp is removed and the target is
untouched. Every package writes through these helpers. They live in runtime/ because it is the
one layer the others may import without breaking its own rule (runtime/ never imports torch), and
this module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

FILE_MODE = 0o644  # mkstemp creates owner-only files; a published file is readable like any other
DIR_MODE = 0o755  # likewise for mkdtemp's owner-only folders


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds move it over `path`, else delete it.

    `fsync=True` flushes the temp file to disk before the rename, so that after a power loss the
    target holds the old or the new content rather than an empty file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: object) -> Path:
    """Write `data` as indented JSON to `path` (flushed to disk, then renamed into place)."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2)
        file.write("\n")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; when the block succeeds it becomes `path`.

    An existing folder at `path` is first renamed aside and deleted only after the new one is in
    place, so `path` is missing for no longer than between two renames. On any error or Ctrl-C the
    temp folder is removed and `path` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
        os.chmod(staging, DIR_MODE)
        if target.exists():
            # renaming a folder onto an empty one is allowed, so the old folder goes into a fresh one
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["atomic_dir", "atomic_path", "write_json_atomic"]
