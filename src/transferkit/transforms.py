"""Image transforms built from a backbone's Preprocessing (never hard-coded ImageNet numbers)."""

from __future__ import annotations

from torchvision import transforms as T

from transferkit.model import Preprocessing

TRAIN_SCALE = (0.35, 1.0)
"""RandomResizedCrop area range; timm's 0.08 lower bound is too aggressive for small data."""


def interpolation(name: str) -> T.InterpolationMode:
    return {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
            "nearest": T.InterpolationMode.NEAREST}.get(name, T.InterpolationMode.BILINEAR)


def eval_transform(prep: Preprocessing, resized: bool = False) -> T.Compose:
    """Resize to img_size / crop_pct, center crop img_size, normalise. `resized`: the input comes
    from the decoded-image cache, already resized and cropped (see imagecache), so no resize."""
    resize = int(round(prep.img_size / prep.crop_pct))
    return T.Compose([
        *([] if resized else [T.Resize(resize, interpolation=interpolation(prep.interpolation))]),
        T.CenterCrop(prep.img_size),
        T.ToTensor(),
        T.Normalize(prep.mean, prep.std),
    ])


def train_transform(prep: Preprocessing, augment: str) -> T.Compose:
    """none: the eval transform; basic: random resized crop + flip; strong: basic + TrivialAugment."""
    if augment == "none":
        return eval_transform(prep)
    steps = [T.RandomResizedCrop(prep.img_size, scale=TRAIN_SCALE, interpolation=interpolation(prep.interpolation)),
             T.RandomHorizontalFlip()]
    if augment == "strong":
        steps.append(T.TrivialAugmentWide(interpolation=interpolation(prep.interpolation)))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(prep.mean, prep.std)])
