"""Where vitsparse keeps its cached artefacts, and how it writes them without leaving half-written files."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "VITSPARSE_CACHE"


def cache_dir() -> Path:
    """User cache dir: ``$VITSPARSE_CACHE``, else ``$XDG_CACHE_HOME/vitsparse``, else ``~/.cache/vitsparse``.

    The directory is not created here; writers create it when they first need it.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vitsparse"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success move it over ``path`` with os.replace, else delete it.

    Readers therefore see either the old file or the complete new one, never a partial write.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
