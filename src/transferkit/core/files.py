"""Writes that survive a crash: to a temp file, fsynced, renamed over the target, folder fsynced.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync the temp file, then rename it over `path` (and fsync the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    durable_replace(tmp, path)


def durable_replace(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, fsync the folder (so the rename itself survives a crash)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # POSIX
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
