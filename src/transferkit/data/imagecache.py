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

import numpy as np
import torch
from torchvision import transforms as T

from transferkit.core.distributed import Dist
from transferkit.core.machine import cache_root
from transferkit.data.cachefiles import build_cache, data_digest, open_cache
from transferkit.data.preprocessing import Preprocessing
from transferkit.data.sources import Data, ImageDataset
from transferkit.data.transforms import interpolation


def cache_size(prep: Preprocessing) -> int:
    """Side C of the cached square (see the module docstring)."""
    return prep.img_size + 4 * max(0, (prep.resize - prep.img_size) // 4)


def decode_transform(prep: Preprocessing) -> T.Compose:
    return T.Compose(
        [
            T.Resize(prep.resize, interpolation=interpolation(prep.interpolation)),
            T.CenterCrop(cache_size(prep)),
            T.PILToTensor(),
        ]
    )


def cached_images(data: Data, split: str, prep: Preprocessing, config, report, d: Dist = Dist()) -> np.ndarray:
    """uint8 array (N, S, S, C) of the split's decoded images, built on the first call (each rank
    decoding its share)."""
    size = cache_size(prep)
    key_fields = {
        "data": data_digest(data, split),
        "size": size,
        "interpolation": prep.interpolation,
        "in_chans": config.in_chans,
    }
    key = hashlib.blake2b(json.dumps(key_fields, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = cache_root(config) / "images" / f"{key}.npy"
    found = open_cache(path, report.info) if d.main else None
    if d.gather(found is not None)[0]:  # rank 0 decides for all
        return found if d.main else np.load(path, mmap_mode="r")
    dataset = ImageDataset(data, split, decode_transform(prep), config.in_chans, min_side=prep.resize)

    def fill(array: np.ndarray, rows: list[int]) -> None:
        # its own generator: building the cache must not draw from the run's random stream
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=64, sampler=rows, num_workers=config.workers, generator=torch.Generator()
        )
        report.start_epoch(f"decode {split}", len(loader))
        for images, _, index in loader:
            array[index.numpy()] = images.permute(0, 2, 3, 1).numpy()
            report.advance(1)

    return build_cache(d, path, (len(dataset), size, size, config.in_chans), np.uint8, fill, key_fields, report.info)
