"""Decoded-image cache: each file is decoded and resized once, then read from a memory map.

For phases that run the backbone, every epoch used to decode every JPEG again. The cache
holds each image as uint8, resized so its short side is the eval resize size
(img_size / crop_pct) and center-cropped to a square of side C, in one memory-mapped array
per split. C is the largest side <= that size with C - img_size divisible by 4: then the
eval center crop taken from the square is exactly the crop a direct decode gives (torchvision
rounds crop offsets half-to-even, and an even shift keeps the rounding). Training augments
from the square (random resized crops then come from the central square, which is what a
square training resolution sees of most images anyway). Folders larger than RAM work: only
touched pages are read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from transferkit.checkpoint import atomic_write
from transferkit.data import Data, ImageDataset
from transferkit.features import cache_root, data_digest
from transferkit.model import Preprocessing
from transferkit.transforms import interpolation


def cache_size(prep: Preprocessing) -> int:
    """Side C of the cached square (see the module docstring)."""
    return prep.img_size + 4 * max(0, (prep.resize - prep.img_size) // 4)


def decode_transform(prep: Preprocessing) -> T.Compose:
    return T.Compose([T.Resize(prep.resize, interpolation=interpolation(prep.interpolation)),
                      T.CenterCrop(cache_size(prep)), T.PILToTensor()])


def cached_images(data: Data, split: str, prep: Preprocessing, config, report) -> np.ndarray:
    """uint8 array (N, S, S, C) of the split's decoded images, built on the first call."""
    size = cache_size(prep)
    key_fields = {"data": data_digest(data, split), "size": size, "interpolation": prep.interpolation,
                  "in_chans": config.in_chans}
    key = hashlib.blake2b(json.dumps(key_fields, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = cache_root(config) / "images" / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            pass  # unreadable: build again
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = ImageDataset(data, split, decode_transform(prep), config.in_chans, min_side=prep.resize)
    # its own generator: building the cache must not draw from the run's random stream
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=config.workers,
                                         generator=torch.Generator())

    def write(tmp: Path) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                          shape=(len(dataset), size, size, config.in_chans))
        report.start_epoch(f"decode {split}", len(loader))
        for images, _, index in loader:
            array[index.numpy()] = images.permute(0, 2, 3, 1).numpy()
            report.batch(0.0, 0.0, 0.0)
        array.flush()
        del array

    atomic_write(path, write)
    return np.load(path, mmap_mode="r")
