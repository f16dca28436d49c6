"""Small real datasets that ship inside installed packages, so everything works offline.

Each has a fixed, documented split (it never depends on the run's seed), so results are
comparable across runs and machines:

- `digits`: scikit-learn's 1,797 handwritten digits, 8x8 grayscale, 10 classes. Stratified
  split with seed 0: 70% train, 10% val, 20% test (359 test images). Raw pixels already
  do well here: a sanity check, not a showcase for transfer.
- `faces`: scikit-image's LFW subset, 25x25 grayscale, 100 faces and 100 non-faces.
  Stratified split with seed 0: 45 train, 15 val, 40 test per class (80 test images).
- `fontdigits`: digits 0-9 drawn from the 12 DejaVu fonts that ship inside matplotlib (sans, serif,
  mono; bold, oblique), 32 px white on black, each with a random size, rotation (+-15 degrees) and
  shift (seed 0): 120 per class, stratified 70% train, 10% val, 20% test. With `--target
  builtin:digits` (handwritten, 8 px) it is a real domain shift that works offline: printed source,
  handwritten target.
- `textures`: scikit-image's 512x512 `brick`, `grass` and `gravel` photos cut into a 9x9 grid
  of 56 px patches. Grid rows 0-3 train (36 per class), row 4 val (9), rows 5-8 test (36 per
  class, 108 in all): train and test patches come from disjoint halves of each photo.

- `fortunes` (text): English epigrams from five topic files of Debian's `fortunes` package
  (computers, food, law, medicine, science; `apt-get install fortunes`, which `make` does where it
  can), at most 150 per topic drawn with seed 0 (medicine has 74), stratified 70% train, 10% val, 20%
  test. Short, real, and hard: a topic is often a matter of a word or two.

Images are uint8 arrays addressed by refs such as `faces/17`, texts strings addressed the same way
(`fortunes/3`); `split.json` stores the refs.
"""

from __future__ import annotations

import numpy as np

from transferkit.core.errors import UserError, did_you_mean

NAMES = ("digits", "faces", "textures", "fontdigits", "fortunes")
TEXT_NAMES = ("fortunes",)
FORTUNES = (
    "/usr/share/games/fortunes",
    "/usr/share/fortune",
    "/usr/local/share/games/fortunes",
    "/opt/homebrew/share/games/fortunes",
    "/usr/local/share/fortune",
)
"""Where fortune files live: Debian/Ubuntu, Fedora, /usr/local, Homebrew."""
FORTUNE_TOPICS = ("computers", "food", "law", "medicine", "science")
DEFAULT_IMG_SIZE = 96
"""Builtin images are 8-56 px; 96 px keeps CPU training fast and worked best for transfer."""

Splits = dict[str, list[tuple[str, str]]]


def load(name: str) -> tuple[dict, Splits]:
    """Return (images or texts by ref, fixed splits) for a builtin dataset."""
    if name not in NAMES:
        raise UserError(
            f"Unknown builtin dataset 'builtin:{name}'.{did_you_mean(name, NAMES)} "
            f"Available: {', '.join('builtin:' + n for n in NAMES)}."
        )
    return {
        "digits": _digits,
        "faces": _faces,
        "textures": _textures,
        "fontdigits": _fontdigits,
        "fortunes": _fortunes,
    }[name]()


def _fixed_stratified(
    name: str, images: np.ndarray, labels: list[str], counts: dict[str, int] | None, fractions=None
) -> tuple[dict[str, np.ndarray], Splits]:
    """Split per class with seed 0: exact per-class `counts` for val/test, or `fractions`."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    splits: Splits = {"train": [], "val": [], "test": []}
    for cls in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == cls]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        if counts is not None:
            n_val, n_test = counts["val"], counts["test"]
        else:
            n_val, n_test = round(len(idx) * fractions[0]), round(len(idx) * fractions[1])
        parts = {"test": idx[:n_test], "val": idx[n_test : n_test + n_val], "train": idx[n_test + n_val :]}
        for split, members in parts.items():
            for i in sorted(members):
                ref = f"{name}/{i}"
                arrays[ref] = images[i]
                splits[split].append((ref, cls))
    return arrays, splits


def _fortunes():
    from pathlib import Path

    folder = next((Path(f) for f in FORTUNES if all((Path(f) / t).is_file() for t in FORTUNE_TOPICS)), None)
    if folder is None:
        raise UserError(
            "builtin:fortunes reads the topic files of the fortunes package, found in none of "
            f"{', '.join(FORTUNES)}. Install it: `apt-get install fortunes` (Debian, Ubuntu), "
            "`dnf install fortune-mod`, `brew install fortune`."
        )
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for topic in FORTUNE_TOPICS:
        raw = (folder / topic).read_bytes().decode("utf-8", errors="replace")
        entries = [e.strip() for e in raw.replace("\r\n", "\n").split("\n%\n") if e.strip().strip("%")]
        for i in sorted(rng.permutation(len(entries))[:150]):
            texts.append(entries[i])
            labels.append(topic)
    return _fixed_stratified("fortunes", texts, labels, None, fractions=(0.1, 0.2))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return _fixed_stratified("digits", images, [str(t) for t in d.target], None, fractions=(0.1, 0.2))


def _faces():
    from skimage.data import lfw_subset

    images = (lfw_subset() * 255).round().astype(np.uint8)
    labels = ["face"] * 100 + ["non-face"] * 100  # documented order of lfw_subset
    return _fixed_stratified("faces", images, labels, {"val": 15, "test": 40})


def _textures():
    from skimage import data

    patch, grid = 56, 9
    arrays: dict[str, np.ndarray] = {}
    splits: Splits = {"train": [], "val": [], "test": []}
    for cls in ("brick", "grass", "gravel"):
        photo = getattr(data, cls)()
        for row in range(grid):
            split = "train" if row < 4 else "test"  # the photo's top rows train, its bottom rows test
            if row == 4:
                split = "val"
            for col in range(grid):
                ref = f"textures/{cls}/{row}-{col}"
                arrays[ref] = np.ascontiguousarray(
                    photo[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
                )
                splits[split].append((ref, cls))
    return arrays, splits


def _fontdigits():
    import os

    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    fonts = [f for f in sorted(os.listdir(folder)) if f.startswith("DejaVu") and "Display" not in f]
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(1200):
        digit = str(i % 10)
        font = ImageFont.truetype(os.path.join(folder, fonts[rng.integers(len(fonts))]), int(rng.integers(20, 28)))
        image = Image.new("L", (32, 32), 0)
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = draw.textbbox((0, 0), digit, font=font)
        draw.text(((32 - right + left) / 2 - left, (32 - bottom + top) / 2 - top), digit, fill=255, font=font)
        shift = (float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2)))
        images.append(np.asarray(image.rotate(float(rng.uniform(-15, 15)), Image.BILINEAR, translate=shift)))
        labels.append(digit)
    return _fixed_stratified("fontdigits", np.stack(images), labels, None, fractions=(0.1, 0.2))
