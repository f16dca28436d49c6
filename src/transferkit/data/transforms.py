"""Image transforms built from a backbone's Preprocessing (never hard-coded ImageNet numbers)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from transferkit.data.preprocessing import Preprocessing

TRAIN_SCALE = (0.35, 1.0)
"""RandomResizedCrop area range; timm's 0.08 lower bound is too aggressive for small data."""


def interpolation(name: str) -> T.InterpolationMode:
    return {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
            "nearest": T.InterpolationMode.NEAREST}.get(name, T.InterpolationMode.BILINEAR)


def eval_transform(prep: Preprocessing, resized: bool = False, normalize: bool = True) -> T.Compose:
    """Resize to img_size / crop_pct, center crop img_size, normalise. `resized`: the input comes
    from the decoded-image cache, already resized and cropped (see imagecache), so no resize.
    `normalize` False: end in uint8 `pixels` for `Runtime.batch` to finish on the device (loaders do)."""
    resize = int(round(prep.img_size / prep.crop_pct))
    return T.Compose([
        *([] if resized else [T.Resize(resize, interpolation=interpolation(prep.interpolation))]),
        T.CenterCrop(prep.img_size),
        *_finish(prep, normalize),
    ])


def train_transform(prep: Preprocessing, augment: str, normalize: bool = True) -> T.Compose:
    """none: the eval transform; basic: random resized crop + flip; strong: basic + TrivialAugment."""
    if augment == "none":
        return eval_transform(prep, normalize=normalize)
    steps = [T.RandomResizedCrop(prep.img_size, scale=TRAIN_SCALE, interpolation=interpolation(prep.interpolation)),
             T.RandomHorizontalFlip()]
    if augment == "strong":
        steps.append(T.TrivialAugmentWide(interpolation=interpolation(prep.interpolation)))
    return T.Compose([*steps, *_finish(prep, normalize)])


def _finish(prep: Preprocessing, normalize: bool) -> list:
    return [T.ToTensor(), T.Normalize(prep.mean, prep.std)] if normalize else [pixels]


def pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image as a contiguous uint8 (H, W, C) tensor: a quarter of float32's bytes to collate, share
    between processes, pin and copy to the device, and no arithmetic in the loader workers
    (`Runtime.batch` normalises on the device)."""
    array = np.array(image)
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array)

