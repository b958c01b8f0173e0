"""Where attnc keeps what it learns about a machine (tuned plans, clock references)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """$ATTNC_CACHE_DIR, else $XDG_CACHE_HOME/attnc, else ~/.cache/attnc."""
    base = os.environ.get("ATTNC_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "attnc"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock for a read-modify-write of the cache file `path` (a `.lock` file beside
    it): processes updating one file (two `attnc tune` runs) take turns instead of writing over
    each other's entries. Where the platform has no fcntl the update runs unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # (Windows)
        yield
        return
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # said, so that a wait for another process never looks like a hang
            print(f"attnc: waiting for {lock}, which another process holds (an `attnc tune` run, say)",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file of its own name in the same folder,
    renamed over it (a reader never sees half a file, two writers never share a temporary)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
