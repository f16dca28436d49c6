"""Decoding images into the mode the model expects, whatever the file holds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transferkit.core.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def file_ref(path: Path) -> str:
    """A file's own absolute path: a link is named by itself, not by where it points."""
    return os.path.abspath(path)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS and not path.name.startswith(".")


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode to RGB (in_chans=3) or L (in_chans=1).

    Transparent pixels are composited on white, 16/32-bit images are rescaled (not clipped)
    to 8 bits, and CMYK/palette images go through PIL's own conversions.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB" if in_chans == 3 else "L")


def open_image(path: str | Path, in_chans: int = 3, min_side: int | None = None) -> Image.Image:
    """Open an image file with its EXIF orientation applied, in the model's mode.

    `min_side`: the smallest short side the caller needs. JPEGs are then decoded at the
    largest 1/2, 1/4 or 1/8 scale that keeps it (libjpeg's DCT scaling): a 12-megapixel photo
    for a 110 px resize decodes about 8x faster. Every reader of a run passes the same value,
    so training, evaluation and prediction see the same pixels.
    """
    try:
        with Image.open(path) as img:
            if min_side:
                img.draft(None, (min_side, min_side))
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_mode(img, in_chans)
    except FileNotFoundError:
        raise UserError(f"Image '{path}' does not exist.") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).rstrip(".")  # Pillow's own messages end in a period or not
        raise UserError(f"Cannot read image '{path}': {reason}. Remove or replace the file.") from None


def from_array(array: np.ndarray, in_chans: int = 3) -> Image.Image:
    """Wrap a uint8 HxW or HxWxC array as a PIL image in the model's mode."""
    return to_mode(Image.fromarray(array), in_chans)
