"""Scanning a dataset's files before training: which cannot be used, and why.

Every image file is opened and decoded once (JPEGs at 1/8 scale, which still reads every
byte, so truncation shows). Decompression bombs are refused from the header alone, before
any pixel is decoded. Files whose bytes repeat a file of an earlier split (train, then val,
then test) are leakage and leave the later split. `transferkit check DATA` prints the same
findings without training.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from transferkit.core.errors import UserError
from transferkit.core.files import write_text

Skipped = tuple[str, str]  # (path, reason)
SPLIT_ORDER = ("train", "val", "test")
HIDDEN = "hidden file"
"""The one reason that is never an error: .DS_Store, Thumbs caches and .git are not data."""


def inspect_file(path: str | Path) -> str | None:
    """Why the image file at `path` cannot be used, or None when it decodes."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        return "missing file"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; all data is still read
                img.load()
    except UnidentifiedImageError:
        return "not an image (Pillow cannot identify its format)"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        return f"decompression bomb refused: {err}"
    except (OSError, ValueError, SyntaxError) as err:
        return f"truncated or corrupt image: {err}"
    return None


def drop_unreadable(splits: dict[str, list], skipped: list[Skipped]) -> dict[str, list]:
    """Remove (and record in `skipped`) every sample whose file cannot be decoded."""
    out = {}
    for split, samples in splits.items():
        kept = []
        for sample in samples:
            reason = inspect_file(sample[0])
            if reason is None:
                kept.append(sample)
            else:
                skipped.append((sample[0], reason))
        out[split] = kept
    return out


def links_outside(
    splits: dict[str, list], root: Path, skipped: list[Skipped], refuse: bool
) -> tuple[dict[str, list], list[tuple[str, str]]]:
    """Samples whose file is reached through a link (of the file or of a folder on its way) that leaves `root`:
    returned as (path, target) pairs; with `refuse`, also moved from the splits to `skipped`."""
    inside = os.path.realpath(root)
    found: list[tuple[str, str]] = []
    out = {}
    for split, samples in splits.items():
        kept = []
        for sample in samples:
            target = os.path.realpath(sample[0])
            if os.path.commonpath([inside, target]) != inside:
                found.append((sample[0], target))
                if refuse:
                    skipped.append((sample[0], f"link to '{target}', outside the data folder (--outside-links refuse)"))
                    continue
            kept.append(sample)
        out[split] = kept
    return out, found


def drop_leaks(splits: dict[str, list], skipped: list[Skipped]) -> dict[str, list]:
    """Remove val/test files with the same bytes as a file of an earlier split (leakage)."""
    seen: dict[str, tuple[str, str]] = {}  # digest -> (first path, its split)
    out = {}
    for split in [s for s in SPLIT_ORDER if s in splits]:
        kept = []
        for sample in splits[split]:
            digest = _digest(sample[0])
            first = seen.get(digest)
            if first is not None and first[1] != split:
                skipped.append((sample[0], f"same content as {first[1]} file {first[0]} (leakage into {split})"))
                continue
            seen.setdefault(digest, (sample[0], split))
            kept.append(sample)
        out[split] = kept
    return out


def enforce(skipped: list[Skipped], policy: str, spec: str) -> None:
    """With policy 'error', any skipped file (hidden ones aside) stops here with the list."""
    skipped = [s for s in skipped if s[1] != HIDDEN]
    if policy == "error" and skipped:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        raise UserError(
            f"{len(skipped)} file(s) of '{spec}' cannot be used:\n{listing}{more}\n"
            "Fix or remove them, or pass --bad-files skip to train without them."
        )


def write_skipped(path: Path, skipped: list[Skipped]) -> None:
    """skipped.txt: one 'path<TAB>reason' line per file left out."""
    write_text(Path(path), "".join(f"{p}\t{r}\n" for p, r in skipped))


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
