"""Writes that survive a crash and a full disk: to a temp file, fsynced, renamed over the target, folder fsynced.

A write that fails leaves the previous file as it was and no temp file behind; a full disk is a `DiskFull`
error that names the file, the bytes it needed and the bytes free.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from transferkit.core.errors import DiskFull

FULL = (
    "No space left on device",
    "os error 28",
    "unexpected pos",
    "PytorchStreamWriter failed writing file",
    "database or disk is full",
)
"""How a full disk reads when it is not an OSError: safetensors' Rust error, torch's zip writer, SQLite (a tuning
study's storage)."""


def atomic_write(path: Path, write, size: int | None = None, shown: Path | None = None) -> None:
    """Call `write(tmp_path)`, fsync the temp file, then rename it over `path` (and fsync the folder).

    `size`: the bytes the file will take, where known, for the message if the disk is full; `shown`: the file
    that message names (default `path`; a file written into a temp folder names where it is going)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    free = shutil.disk_usage(path.parent).free  # before the write: what it had to fit in
    full = False
    try:
        write(tmp)
        durable_replace(tmp, path)
    except BaseException as err:
        if not is_disk_full(err):
            _remove(tmp)
            raise
        full = True  # raised below, outside this block: the failed writer (and its open file) is let go first
    if full:
        written = sum(f.stat().st_size for f in _files(tmp))
        _remove(tmp)
        raise disk_full(shown or path, size or written, free, at_least=size is None)


def write_text(path: Path, text: str, shown: Path | None = None) -> None:
    """`path.write_text(text)` through `atomic_write`: a crash or a full disk leaves the old file or none."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), size=len(text.encode()), shown=shown)


def _files(path: Path) -> list[Path]:
    """The file at `path`, or every file under the folder at `path`; none when nothing is there."""
    if path.is_dir():
        return [f for f in path.rglob("*") if f.is_file()]
    return [path] if path.exists() else []


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or what caused it, is the disk (or the user's quota) being full."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(err) for sign in FULL):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full(path: Path, needed: int, free: int | None = None, at_least: bool = False) -> DiskFull:
    """The error for a write of `needed` bytes to `path` that found the disk full (`free`: bytes free when it began;
    by default, now)."""
    if free is None:
        folder = next((p for p in (Path(path).parent, *Path(path).parents) if p.exists()), Path("."))
        free = shutil.disk_usage(folder).free
    need = "could not finish"
    if needed:
        need = f"needed {'more than ' if at_least else ''}{bytes_text(needed)}"
    return DiskFull(
        f"The disk is full: writing '{path}' {need} and {bytes_text(free)} were free there. The previous "
        f"{Path(path).name}, if any, is intact and no temporary file is left. Free some space (old runs; "
        "the caches: `transferkit cache --clear`), or write the run elsewhere with --runs-dir; then "
        "continue with --resume (where no last.ckpt was written yet: the same command with --overwrite)."
    )


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (what torch.save or safetensors will write, near enough)."""
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return obj.numel() * obj.element_size() if hasattr(obj, "element_size") else 0


def bytes_text(n: int, exact: bool = True) -> str:
    """'13.1 MB (13,736,245 bytes)'; GB from 10 GB on; `exact` False: without the bytes."""
    unit, scale = ("GB", 2**30) if n >= 10 * 2**30 else ("MB", 2**20)
    return f"{n / scale:.1f} {unit}" + (f" ({n:,} bytes)" if exact else "")


def durable_replace(tmp: Path, path: Path) -> None:
    """fsync `tmp` (a file, or every file in a folder), rename it over `path`, fsync the folder (so the rename
    itself survives a crash). A folder takes the place of the old one as `replace_folder` says."""
    for file in _files(tmp):
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    if tmp.is_dir():
        replace_folder(tmp, path)
    else:
        os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # POSIX
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_folder(fresh: Path, directory: Path) -> None:
    """Put the folder `fresh` in the place of `directory`: the old one moved aside to `.NAME.old` (where a crash
    between the two renames leaves it whole), then removed."""
    old = aside(directory, "old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(fresh, directory)
    shutil.rmtree(old, ignore_errors=True)


def aside(directory: Path, kind: str) -> Path:
    """The hidden sibling `.NAME.KIND` of a folder: where it is built (tmp) or the previous one waits (old)."""
    return directory.with_name(f".{directory.name}.{kind}")
