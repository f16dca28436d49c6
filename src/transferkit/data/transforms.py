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
    return {
        "bicubic": T.InterpolationMode.BICUBIC,
        "bilinear": T.InterpolationMode.BILINEAR,
        "nearest": T.InterpolationMode.NEAREST,
    }.get(name, T.InterpolationMode.BILINEAR)


def eval_transform(prep: Preprocessing, resized: bool = False, normalize: bool = True) -> T.Compose:
    """Resize to img_size / crop_pct, center crop img_size, normalise. `resized`: the input comes
    from the decoded-image cache, already resized and cropped (see imagecache), so no resize.
    `normalize` False: end in uint8 `pixels` for `Runtime.batch` to finish on the device (loaders do)."""
    resize = int(round(prep.img_size / prep.crop_pct))
    return T.Compose(
        [
            *([] if resized else [T.Resize(resize, interpolation=interpolation(prep.interpolation))]),
            T.CenterCrop(prep.img_size),
            *_finish(prep, normalize),
        ]
    )


def train_transform(prep: Preprocessing, augment: str, normalize: bool = True) -> T.Compose:
    """none: the eval transform; basic: random resized crop + flip; strong: basic + TrivialAugment."""
    if augment == "none":
        return eval_transform(prep, normalize=normalize)
    steps = [_random_crop(prep), T.RandomHorizontalFlip()]
    if augment == "strong":
        steps.append(T.TrivialAugmentWide(interpolation=interpolation(prep.interpolation)))
    return T.Compose([*steps, *_finish(prep, normalize)])


def _random_crop(prep: Preprocessing) -> T.RandomResizedCrop:
    return T.RandomResizedCrop(prep.img_size, scale=TRAIN_SCALE, interpolation=interpolation(prep.interpolation))


class DeviceCrop:
    """Basic augmentation drawn in the loader workers and made on the device (`--crop-on device`): an
    image from the decoded-image cache (all the same square size) becomes its uint8 pixels and a row
    (x1, y1, x2, y2, flip, size) saying which crop to resize to size x size and whether to mirror it.
    The draws are RandomResizedCrop's and RandomHorizontalFlip's, in their order, so a seed gives the
    crop and flip that `train_transform` gives; `resized_crops` then cuts and resizes the whole batch at
    once on the device. Resizing is bilinear, averaging ceil(crop / size)^2 samples per output pixel
    where the crop shrinks (roi_align), not the backbone's interpolation with its antialias filter.
    It reads the cache's (H, W, C) arrays as they are (`takes_arrays`): no PIL image made and read
    back, which was most of its time per image (README, Speed)."""

    takes_arrays = True

    def __init__(self, prep: Preprocessing):
        self.crop = _random_crop(prep)

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        array = np.array(image)  # a copy: the cache's memory map stays read-only
        top, left, height, width = self.crop.get_params(
            torch.from_numpy(array).permute(2, 0, 1), self.crop.scale, self.crop.ratio
        )
        flip = float(torch.rand(1) < 0.5)
        box = [left, top, left + width, top + height, flip, self.crop.size[0]]
        return torch.from_numpy(array), torch.tensor(box, dtype=torch.float32)


def resized_crops(images: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    """The crops of a float (N, C, H, W) batch that `DeviceCrop` rows (N, 6, on the CPU as the loader made
    them) say, resized and mirrored on the batch's device: (N, C, size, size). One roi_align: its aligned
    sampling points are bilinear resize's (align_corners False) inside the crop; the outermost output
    pixels of a growing crop blend in the image just outside it, where a resize of the cut-out crop would
    repeat its edge.

    torchvision's op is called directly: `torchvision.ops.roi_align` swaps in a Python version on CUDA
    under deterministic algorithms (`--deterministic`) that samples every input pixel for every output
    pixel (N x C x size^2 x H x W values); the kernel's forward pass is deterministic already (no atomics;
    only its backward, never run here, is not)."""
    size = int(crops[0, 5])  # read on the CPU: no wait for the device
    crops = crops.to(images.device, non_blocking=True)
    index = torch.arange(len(crops), device=crops.device, dtype=crops.dtype)[:, None]
    out = torch.ops.torchvision.roi_align(images, torch.cat([index, crops[:, :4]], 1), 1.0, size, size, -1, True)
    return torch.where(crops[:, 4].bool()[:, None, None, None], out.flip(-1), out)


def _finish(prep: Preprocessing, normalize: bool) -> list:
    return [T.ToTensor(), T.Normalize(prep.mean, prep.std)] if normalize else [pixels]


def pixels(image: Image.Image) -> torch.Tensor:
    """A PIL image as a contiguous uint8 (H, W, C) tensor: a quarter of float32's bytes to collate, share
    between processes, pin and copy to the device, and no arithmetic in the loader workers
    (`Runtime.batch` normalises on the device)."""
    array = np.array(image)
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array)
