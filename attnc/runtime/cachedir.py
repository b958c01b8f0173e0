"""Where attnc keeps what it learns about a machine (tuned plans, clock references)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$ATTNC_CACHE_DIR, else $XDG_CACHE_HOME/attnc, else ~/.cache/attnc."""
    base = os.environ.get("ATTNC_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "attnc"
