"""Keys and checks for cache files: a digest of a split's files (path, size, mtime) or in-memory images,
and whether an .npy on disk is whole.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from transferkit.data.sources import Data


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


def readable_npy(path: Path) -> bool:
    """A cache file that exists and opens (an unreadable one is built again and replaced)."""
    try:
        np.load(path, mmap_mode="r")
        return True
    except (OSError, ValueError):
        return False
