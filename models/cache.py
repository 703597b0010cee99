"""Where vitsparse keeps its cached artefacts (written through vitsparse.runtime.atomic)."""

from __future__ import annotations

import os
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
