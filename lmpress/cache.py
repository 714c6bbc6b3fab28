"""Where lmpress keeps what it builds once and reuses: demo parents, offline task data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$LMPRESS_CACHE`, else `$XDG_CACHE_HOME/lmpress`, else `~/.cache/lmpress`."""
    if os.environ.get("LMPRESS_CACHE"):
        return Path(os.environ["LMPRESS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmpress"
