"""Data sources, splits and the class index.

A spec string resolves to a source: a folder (`train/ val/ test/` subfolders of class
folders, or class folders alone), a CSV file (`path,label[,split]`), `builtin:NAME`
(see `transferkit.data.builtin`) or `cifar10:DIR` (the CIFAR-10 python batches); or text (see
`texts`): a .csv/.tsv/.jsonl table of texts and labels, or class folders of .txt files. Splits that
the source does not define are carved from its training images, stratified and seeded.
The class index is fixed from the training split; val/test map by name.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.errors import UserError
from transferkit.core.files import write_text
from transferkit.data import builtin, check, texts
from transferkit.data.imagecsv import SPLIT_ALIASES, read_image_csv
from transferkit.data.images import EXTENSIONS, file_ref, from_array, is_image_file, open_image
from transferkit.data.sampling import seeded

SPLITS = ("train", "val", "test")

Sample = tuple[str, str]  # (ref, label): a file path, or an in-memory image key
Splits = dict[str, list[Sample]]


@dataclass
class Data:
    """A resolved data source: samples per split, the class index, and how to read its samples."""

    spec: str
    splits: Splits
    classes: list[str]
    how: str
    """How the split was made, as recorded in split.json."""
    arrays: dict[str, np.ndarray] | dict[str, str] | None = field(default=None, repr=False)
    """In-memory samples by ref (builtin and cifar10 images, every text); None when refs are image files."""
    default_img_size: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) for every file left out: unreadable, hidden, unsupported, leaked, empty folders."""
    outside_links: list[tuple[str, str]] = field(default_factory=list)
    """(path, target) for every image file reached through a link that leaves the data folder."""
    kind: str = "image"
    """image | text: which task reads it (see `models.task`)."""
    evaluated: tuple[str, ...] = ()
    """The evaluation splits (val, test) meant to hold images: given by the source, or carved with a fraction
    above 0. One carved empty (every class too small for it) still counts in `missing`."""

    def read(self, ref: str, in_chans: int = 3, min_side: int | None = None):
        """The sample `ref`: a text, or a PIL image in the model's mode (see open_image for min_side)."""
        if self.kind == "text":
            return self.arrays[ref]
        if self.arrays is not None:
            return from_array(self.arrays[ref], in_chans)
        return open_image(ref, in_chans, min_side)

    def counts(self, split: str) -> dict[str, int]:
        out = dict.fromkeys(self.classes, 0)
        for _, label in self.splits[split]:
            out[label] += 1
        return out

    def missing(self) -> dict[str, list[str]]:
        """{class: the evaluation splits (val, test) that have none of its images}: those with images, and
        those meant to have some (`evaluated`) that came out empty, as when every class has one image."""
        scored = [s for s in ("val", "test") if self.splits[s] or s in self.evaluated]
        have = {s: {label for _, label in self.splits[s]} for s in scored}
        out = {c: [s for s in have if c not in have[s]] for c in self.classes}
        return {c: splits for c, splits in out.items() if splits}

    def save_split(self, path: Path) -> None:
        payload = {
            "spec": self.spec,
            "kind": self.kind,
            "how": self.how,
            "classes": self.classes,
            "splits": {k: [list(s) for s in v] for k, v in self.splits.items()},
        }
        write_text(Path(path), json.dumps(payload, indent=1))


def load_data(
    spec: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    shots: int | None = None,
    split_file: str | None = None,
    bad_files: str = "skip",
    outside_links: str = "follow",
    text_column: str = "text",
    label_column: str = "label",
) -> Data:
    """Resolve `spec`, drop unusable files, complete its splits, apply few-shot selection and fix
    the classes. Files are scanned (see `transferkit.data.check`) unless the split comes from a
    split file, which lists files an earlier scan accepted; `bad_files="error"` refuses any.
    `outside_links`: follow | refuse image files linking outside a data folder (listed either way).
    `text_column`, `label_column`: the columns of a text table."""
    if not spec:
        raise UserError(
            "No data given. Pass a folder of class folders, a .csv file, "
            "builtin:faces|textures|digits|fontdigits, or cifar10:DIR."
        )
    skipped: list[tuple[str, str]] = []
    splits, arrays, default_size, how, kind = _resolve(spec, skipped, text_column, label_column)
    outside = []
    if kind == "image" and arrays is None and Path(spec).is_dir():
        splits, outside = check.links_outside(splits, Path(spec), skipped, refuse=outside_links == "refuse")
    if kind == "text":
        texts.check_classes(splits, spec)
        check.enforce(skipped, bad_files, spec)
    evaluated = tuple(s for s in ("val", "test") if splits.get(s))  # given by the source
    if split_file:
        splits, how = _read_split_file(split_file, spec), f"reused from {split_file}"
        evaluated = tuple(s for s in ("val", "test") if splits.get(s))
    else:
        if arrays is None:
            splits = check.drop_unreadable(splits, skipped)
        missing = [s for s in ("val", "test") if not splits.get(s)]
        if missing:
            fractions = {
                "val": val_fraction if "val" in missing else 0.0,
                "test": test_fraction if "test" in missing else 0.0,
            }
            carved = stratified_split(splits["train"], fractions["val"], fractions["test"], seed)
            evaluated += tuple(s for s in missing if fractions[s] > 0)
            splits = {**splits, **{s: carved[s] for s in missing}, "train": carved["train"]}
            how += (
                f"; {' and '.join(missing)} carved from train (seed {seed}, "
                + ", ".join(f"{s} {fractions[s]:g}" for s in missing)
                + ")"
            )
        if arrays is None:
            splits = check.drop_leaks(splits, skipped)
            check.enforce(skipped, bad_files, spec)
    if not splits["train"]:
        raise UserError(
            f"Data '{spec}' has no usable training images."
            + (f" All {len(skipped)} files were skipped, e.g. {skipped[0][0]}: {skipped[0][1]}." if skipped else "")
        )
    classes = sorted({label for _, label in splits["train"]})
    for split in ("val", "test"):
        unknown = sorted({label for _, label in splits.get(split, [])} - set(classes))
        if unknown:
            raise UserError(
                f"The {split} split of '{spec}' has class(es) {', '.join(map(repr, unknown))} "
                f"that the training split lacks. Add training images for them or remove them from {split}."
            )
    if shots is not None:
        splits = {**splits, "train": few_shot(splits["train"], shots, seed, spec)}
        how += f"; {shots}-shot train (seed {seed})"
    splits = {s: splits.get(s, []) for s in SPLITS}
    return Data(
        spec=spec,
        splits=splits,
        classes=classes,
        how=how,
        arrays=arrays,
        default_img_size=default_size,
        skipped=skipped,
        kind=kind,
        outside_links=outside,
        evaluated=tuple(s for s in ("val", "test") if s in evaluated),
    )


def config_data(config, run_split: str | Path | None = None) -> Data:
    """The data a TrainConfig names, split as it says; `run_split`: a run's split.json instead (its
    classes and samples, as that run saw them)."""
    columns = {"text_column": config.text_column, "label_column": config.label_column}
    if run_split is not None:
        return load_data(config.data, split_file=str(run_split), **columns)
    data = load_data(
        config.data,
        seed=config.seed,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        shots=config.shots,
        split_file=config.split_file,
        bad_files=config.bad_files,
        outside_links=config.outside_links,
        **columns,
    )
    problem = too_few_classes(data)
    if problem:
        raise UserError(problem)
    return data


def too_few_classes(data: Data) -> str | None:
    """Why `data` cannot train a classifier when its training split has fewer than 2 classes, else None."""
    if len(data.classes) >= 2:
        return None
    spec, found = data.spec, ", ".join(map(repr, data.classes))
    path = Path(spec).expanduser()
    if data.kind == "text":
        fix = "Give the texts of two classes or more (label column), or class folders of .txt files."
    elif path.suffix.lower() == ".csv":
        fix = "Give rows of two classes or more in its label column."
    elif path.is_dir():
        fix = (
            f"Put each class's images in a folder of its own, e.g. {path / data.classes[0]}/ and {path / 'OTHER'}/ "
            "(under train/ when the data has val/ and test/ folders)."
        )
    else:
        fix = "Give data with images of two classes or more."
    return (
        f"Data '{spec}' has a single class ({found}) in its training split; a classifier needs two or more "
        f"to tell apart. {fix}"
    )


def stratified_split(samples: list[Sample], val_fraction: float, test_fraction: float, seed: int) -> Splits:
    """Split per class with a seeded shuffle; every class keeps at least one training image."""
    rng = np.random.default_rng(seed)
    out: Splits = {"train": [], "val": [], "test": []}
    by_class: dict[str, list[Sample]] = {}
    for sample in sorted(samples):
        by_class.setdefault(sample[1], []).append(sample)
    for members in by_class.values():
        order = [members[i] for i in rng.permutation(len(members))]
        n_test = round(len(order) * test_fraction)
        n_val = round(len(order) * val_fraction)
        while n_test + n_val >= len(order) and n_test + n_val > 0:
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        out["test"] += order[:n_test]
        out["val"] += order[n_test : n_test + n_val]
        out["train"] += order[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def few_shot(train: list[Sample], shots: int, seed: int, spec: str) -> list[Sample]:
    """Keep `shots` seeded-random training samples per class."""
    rng = np.random.default_rng(seed + 1)
    by_class: dict[str, list[Sample]] = {}
    for sample in sorted(train):
        by_class.setdefault(sample[1], []).append(sample)
    kept: list[Sample] = []
    for label, members in by_class.items():
        if shots > len(members):
            smallest = min(len(m) for m in by_class.values())
            raise UserError(
                f"shots={shots} but class '{label}' of '{spec}' has only {len(members)} training "
                f"images. Use shots between 1 and {smallest}."
            )
        kept += [members[i] for i in sorted(rng.choice(len(members), shots, replace=False))]
    return kept


def _resolve(
    spec: str, skipped: list, text_column: str, label_column: str
) -> tuple[Splits, dict | None, int | None, str, str]:
    """(splits, in-memory samples or None, default image size, how the split was made, kind)."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        arrays, splits = builtin.load(name)
        kind = "text" if name in builtin.TEXT_NAMES else "image"
        return splits, arrays, builtin.DEFAULT_IMG_SIZE if kind == "image" else None, "fixed builtin split", kind
    if spec.startswith("cifar10:"):
        splits, arrays = _cifar10(Path(spec.split(":", 1)[1]).expanduser())
        return splits, arrays, None, "CIFAR-10 train/test batches", "image"
    path = Path(spec).expanduser()
    if path.suffix.lower() in texts.TABLES:
        if not path.is_file():
            raise UserError(f"{path.suffix[1:].upper()} file '{path}' does not exist.")
        if texts.is_text_table(path, text_column, label_column):
            splits, by_ref = texts.read_table(path, text_column, label_column, skipped)
            return splits, by_ref, None, f"text table {path}", "text"
        return read_image_csv(path), None, None, f"CSV {path}", "image"
    if path.is_dir():
        if texts.is_text_folder(path):
            splits, by_ref = texts.read_folder(path, skipped)
            if not splits["train"]:
                raise UserError(f"No usable .txt files in '{path}' (expected DIR/CLASS/*.txt).")
            return splits, by_ref, None, "text class folders", "text"
        return (*_folder(path, skipped), "image")
    raise UserError(
        f"Data '{spec}' not found. Give a folder of class folders (DIR/cat/*.jpg, optionally under "
        "train/ val/ test/), a .csv file with path,label[,split] rows, builtin:faces|textures|digits|fontdigits, "
        "or cifar10:DIR; for text, a .csv/.tsv/.jsonl with text and label columns, class folders of .txt files "
        "or builtin:fortunes."
    )


def _images_by_class(root: Path, skipped: list) -> list[Sample]:
    """Image files under root/CLASS/; hidden files, other formats and empty class folders go to `skipped`."""
    samples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = 0
        for file in sorted(class_dir.rglob("*")):
            if not file.is_file():
                continue
            hidden = any(part.startswith(".") for part in file.relative_to(class_dir).parts)
            if hidden:
                skipped.append((file_ref(file), check.HIDDEN))
            elif not is_image_file(file):
                skipped.append(
                    (
                        file_ref(file),
                        f"unsupported format '{file.suffix or file.name}' (images: {' '.join(EXTENSIONS)})",
                    )
                )
            else:
                samples.append((file_ref(file), class_dir.name))
                found += 1
        if not found:
            skipped.append((file_ref(class_dir), "empty class folder (no images); class left out"))
    return samples


def _folder(root: Path, skipped: list) -> tuple[Splits, None, None, str]:
    subdirs = {
        SPLIT_ALIASES[p.name.lower()]: p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_ALIASES
    }
    if "train" in subdirs:
        splits = {name: _images_by_class(path, skipped) for name, path in subdirs.items()}
        how = f"folders {', '.join(sorted(subdirs))}"
    else:
        splits = {"train": _images_by_class(root, skipped)}
        how = "class folders"
    if not splits["train"]:
        where = subdirs.get("train", root)
        raise UserError(
            f"No images found in '{where}'. Expected one folder per class holding image files "
            f"({', '.join(e for e in ('.jpg', '.png', '.webp'))}, ...), e.g. {where}/cat/1.jpg."
        )
    return splits, None, None, how


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of numpy arrays) and refuses anything else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar10(root: Path) -> tuple[Splits, dict[str, np.ndarray]]:
    def batch(name: str) -> dict:
        file = root / name
        if not file.is_file():
            raise UserError(
                f"CIFAR-10 file '{file}' is missing. cifar10:DIR expects the extracted python version "
                "(cifar-10-batches-py with data_batch_1..5, test_batch, batches.meta)."
            )
        try:
            with file.open("rb") as fh:
                return _NumpyOnlyUnpickler(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise UserError(f"'{file}' is not a CIFAR-10 python batch: {err}.") from None

    meta = batch("batches.meta")
    names = [n.decode() if isinstance(n, bytes) else n for n in meta[b"label_names"]]
    arrays: dict[str, np.ndarray] = {}
    splits: Splits = {"train": [], "val": [], "test": []}
    for split, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        for fname in files:
            b = batch(fname)
            images = np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for i, (img, label) in enumerate(zip(images, b[b"labels"])):
                ref = f"cifar10/{fname}/{i}"
                arrays[ref] = img
                splits[split].append((ref, names[label]))
    return splits, arrays


def _read_split_file(path: str, spec: str) -> Splits:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"Split file '{file}' does not exist.")
    try:
        payload = json.loads(file.read_text())
        splits = {k: [tuple(s) for s in v] for k, v in payload["splits"].items()}
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"'{file}' is not a transferkit split.json: {err}.") from None
    if payload.get("spec") != spec:
        raise UserError(f"Split file '{file}' was made for data '{payload.get('spec')}', not '{spec}'.")
    return splits


class ImageDataset:
    """A torch-style dataset over one split: (image tensor, class index, sample index).

    A key is an index, or an (index, seed) pair from `EpochSampler`: the transform then runs
    under that seed, so an image's augmentation depends on the run, not on the worker process.
    `images` (from `imagecache`) replaces decoding the files with reading a uint8 array, handed to the
    transform as a PIL image, or as the (H, W, C) array itself where the transform `takes_arrays`.
    """

    def __init__(
        self,
        data: Data,
        split: str,
        transform,
        in_chans: int = 3,
        images: np.ndarray | None = None,
        min_side: int | None = None,
    ):
        self.data, self.samples, self.transform, self.in_chans = data, data.splits[split], transform, in_chans
        self.class_to_idx = {c: i for i, c in enumerate(data.classes)}
        self.images, self.min_side = images, min_side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        ref, label = self.samples[i]
        if self.images is not None and getattr(self.transform, "takes_arrays", False):
            image = np.asarray(self.images[i])
        elif self.images is not None:
            pixels = np.asarray(self.images[i])
            image = from_array(pixels[..., 0] if self.in_chans == 1 else pixels, self.in_chans)
        else:
            image = self.data.read(ref, self.in_chans, self.min_side)
        if seed is None:
            return self.transform(image), self.class_to_idx[label], i
        with seeded(seed):
            return self.transform(image), self.class_to_idx[label], i


class TextDataset(ImageDataset):
    """A split's texts as (token ids, class index, sample index) items; `transform` is a `texts.TokenIds`.
    `collate` pads a batch to its longest text (the loaders use it)."""

    def __init__(self, data: Data, split: str, transform):
        super().__init__(data, split, transform)

    def collate(self, batch):
        return texts.collate(batch, self.transform.pad_id)
