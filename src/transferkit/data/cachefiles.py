"""Cache files (decoded images, backbone features): their keys, and .npy files that carry their own size and
checksum.

A cache is optional by nature. One found truncated or corrupt (its size or its blake2b checksum differs from
what was recorded beside it when it was written) is built again, with a warning that names it. One that cannot
be written (a full disk, a read-only folder) is built in memory for this run instead, with a warning, and the
run goes on. `transferkit cache` lists what the cache folder holds; `transferkit cache --clear` empties it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferkit.core.distributed import Dist
from transferkit.core.errors import DiskFull
from transferkit.core.files import atomic_write, bytes_text, durable_replace, is_disk_full
from transferkit.data.sources import Data

Fill = Callable[[np.ndarray, list[int]], None]
ADVICE = "free some space, or clear old caches with `transferkit cache --clear` (or point --cache-dir elsewhere)"


def data_digest(data: Data, split: str) -> str:
    """What the images of a split are: file identity (path, size, mtime) or in-memory bytes."""
    h = hashlib.blake2b(digest_size=16)
    for ref, _ in data.splits[split]:
        h.update(ref.encode())
        if data.arrays is not None:
            h.update(np.ascontiguousarray(data.arrays[ref]).tobytes())
        else:
            st = os.stat(ref)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def record_of(path: Path) -> Path:
    """The JSON beside a cache file: what it is (its key's fields), its size in bytes and its checksum."""
    return path.with_suffix(".json")


def open_cache(path: Path, say: Callable[[str], None]) -> np.ndarray | None:
    """The cache at `path` as a read-only memory map when it is whole, else None (build it): a missing file
    silently, a truncated, corrupt or unrecorded one after `say` has named it and why."""
    if not path.exists():
        return None
    problem = _problem(path)
    if problem is None:
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            problem = f"does not open as an array ({err})"
    say(f"[transferkit] warning: cache file '{path}' {problem}; building it again")
    return None


def _problem(path: Path) -> str | None:
    try:
        record = json.loads(record_of(path).read_text())
        size, digest = int(record["bytes"]), str(record["blake2b"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"has no readable record of its size and checksum ({record_of(path).name})"
    found = path.stat().st_size
    if found != size:
        return f"is truncated or damaged: {found:,} bytes where {size:,} were written"
    if checksum(path) != digest:
        return "is corrupt: its checksum differs from the one recorded when it was written"
    return None


def build_cache(
    d: Dist,
    path: Path,
    shape: tuple[int, ...],
    dtype,
    fill: Fill,
    about: dict,
    say: Callable[[str], None],
    rows: int | None = None,
) -> np.ndarray:
    """Build the .npy at `path` together: each rank fills its share of the `rows` items (default shape[0], on
    axis 0; given, on axis 1) through `fill(array, its_rows)`; rank 0 creates the file with its space reserved,
    then records `about`, the size and the checksum beside it and renames it into place. Returns a read-only
    array. Where the file cannot be written, the ranks build it in memory instead (`say` warns). The folder must
    be shared by the ranks (one machine, or a shared --cache-dir)."""
    tmp = path.with_name(f".{path.name}.tmp")
    n = shape[0] if rows is None else rows
    needed = int(np.prod(shape)) * np.dtype(dtype).itemsize
    problem = d.gather(_attempt(tmp, lambda: _create(tmp, shape, dtype), needed) if d.main else None)[0]
    if problem is None:
        array = np.load(tmp, mmap_mode="r+")
        fill(array, d.shard(n))
        array.flush()
        del array
        d.barrier()
        problem = d.gather(_attempt(tmp, lambda: _seal(tmp, path, about), needed) if d.main else None)[0]
        if problem is None:
            return np.load(path, mmap_mode="r")
        kept = np.array(np.load(tmp, mmap_mode="r"))  # filled, but could not be recorded: keep it in memory
        d.barrier()
    else:
        kept = _in_memory(d, shape, dtype, fill, n, axis=0 if rows is None else 1)
    if d.main:
        tmp.unlink(missing_ok=True)
    say(
        f"[transferkit] warning: cannot write the cache file '{path}' ({problem}); this run keeps it in memory "
        f"and goes on. To cache it for later runs, {ADVICE}."
    )
    return kept


def _attempt(tmp: Path, step: Callable[[], None], needed: int) -> str | None:
    """None when `step` wrote its file, else why not (the temp file is left to the caller)."""
    try:
        step()
        return None
    except (OSError, DiskFull) as err:
        if isinstance(err, DiskFull) or is_disk_full(err):
            free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
            return f"the disk is full: it needs {bytes_text(needed)} and {bytes_text(free)} are free there"
        return str(err)


def _create(tmp: Path, shape: tuple[int, ...], dtype) -> None:
    """The .npy file at `tmp`, its whole size reserved on disk: a full disk shows here, not as SIGBUS when the
    memory map is written."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape).flush()
    fd = os.open(tmp, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _seal(tmp: Path, path: Path, about: dict) -> None:
    record = {**about, "bytes": tmp.stat().st_size, "blake2b": checksum(tmp)}
    atomic_write(record_of(path), lambda out: out.write_text(json.dumps(record, indent=1)))
    durable_replace(tmp, path)


def _in_memory(d: Dist, shape: tuple[int, ...], dtype, fill: Fill, n: int, axis: int) -> np.ndarray:
    array = np.zeros(shape, dtype)
    fill(array, d.shard(n))
    if d.on:  # every rank gets every other rank's rows
        parts = d.gather(np.take(array, d.shard(n), axis=axis))
        for rank, part in enumerate(parts):
            where = [slice(None)] * array.ndim
            where[axis] = Dist(rank, d.world).shard(n)
            array[tuple(where)] = part
    array.setflags(write=False)
    return array


KINDS = ("features", "images", "precision.json")
"""What transferkit keeps under the cache root (anything else there is left alone)."""


def cache_usage(root: Path) -> dict[str, tuple[int, int]]:
    """{kind: (files, bytes)} for each of KINDS present under the cache root."""
    out = {}
    for kind in KINDS:
        path = root / kind
        files = [path] if path.is_file() else []
        if path.is_dir():
            files = [f for f in path.rglob("*") if f.is_file()]
        if files:
            out[kind] = (len(files), sum(f.stat().st_size for f in files))
    return out
