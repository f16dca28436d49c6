"""Text data: tables (.csv, .tsv, .jsonl) with a text and a label column, or folders of class folders
holding .txt files; and the dataset that turns a split's texts into token ids for the model.

A table's rows are texts; an optional `split` column (train/val/test) places them, else val and test are
carved from train like images. Rows that cannot be used are left out and listed as bad image files are
(skipped.txt): bytes that are not UTF-8, an empty text, an empty label. A CSV is text when its header
names the text column (default `text`); otherwise it is the image CSV (path,label[,split]).
Texts live in memory, addressed by refs (`FILE:ROW` or the .txt file's path), like builtin images.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import torch

from transferkit.core.errors import UserError, did_you_mean
from transferkit.data.images import file_ref

TABLES = (".csv", ".tsv", ".jsonl")
Splits = dict[str, list[tuple[str, str]]]


def is_text_table(path: Path, text_column: str, label_column: str = "label") -> bool:
    """.tsv and .jsonl are always text; a .csv when its header names `text_column`. A header with the label
    column but neither the text column nor `path` is a text table whose text column has another name."""
    if path.suffix.lower() != ".csv":
        return path.suffix.lower() in TABLES
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        header = [c.strip() for c in next(csv.reader(fh), [])]
    if label_column in header and text_column not in header and "path" not in header:
        raise UserError(
            f"'{path}' has columns {', '.join(header)} but no '{text_column}' column for its texts"
            f"{did_you_mean(text_column, header)}: name it with --text-column (an image CSV has "
            "path,label columns)."
        )
    return text_column in header


def is_text_folder(root: Path, look: int = 50) -> bool:
    """Class folders (under train/ or not) whose files are mostly .txt, judged on the first `look` files
    (an image folder of a million files is not walked twice)."""
    found = (f for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))
    files = list(itertools.islice(found, look))
    return bool(files) and sum(f.suffix.lower() == ".txt" for f in files) > len(files) / 2


def read_table(path: Path, text_column: str, label_column: str, skipped: list) -> tuple[Splits, dict[str, str]]:
    """(splits, texts by ref) of a .csv/.tsv/.jsonl file; unusable rows go to `skipped`."""
    rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _delimited_rows(path)
    splits: Splits = {"train": [], "val": [], "test": []}
    texts: dict[str, str] = {}
    columns: set[str] = set()
    for n, row in rows:
        columns |= set(row)
        ref = f"{file_ref(path)}:{n}"
        if text_column not in row or label_column not in row:
            continue
        text, label, split = (
            str(row.get(k) if row.get(k) is not None else "").strip() for k in (text_column, label_column, "split")
        )
        bad = _bad_bytes(text + label + split)
        if bad:
            skipped.append((ref, bad))
        elif not text:
            skipped.append((ref, "empty text"))
        elif not label:
            skipped.append((ref, f"empty {label_column}"))
        elif split and split.lower() not in _SPLITS:
            skipped.append((ref, f"split '{split}' is not train, val or test"))
        else:
            texts[ref] = text
            splits[_SPLITS[split.lower() or "train"]].append((ref, label))
    for name in (text_column, label_column):
        if columns and name not in columns:
            option = "--text-column" if name == text_column else "--label-column"
            raise UserError(
                f"'{path}' has no column '{name}'{did_you_mean(name, sorted(columns))}; its columns: "
                f"{', '.join(sorted(columns))}. Name yours with {option}."
            )
    if not splits["train"]:
        raise UserError(
            f"'{path}' has no usable training texts"
            + (
                f": all {len(skipped)} rows were left out, e.g. row {skipped[0][0].rsplit(':', 1)[1]}: {skipped[0][1]}."
                if skipped
                else "."
            )
        )
    return splits, texts


def read_folder(root: Path, skipped: list) -> tuple[Splits, dict[str, str]]:
    """(splits, texts by ref) of root/[split/]class/*.txt; files that are not UTF-8 or are empty go to
    `skipped`."""
    parts = {_SPLITS[p.name.lower()]: p for p in root.iterdir() if p.is_dir() and p.name.lower() in _SPLITS}
    if "train" not in parts:
        parts = {"train": root}
    splits: Splits = {"train": [], "val": [], "test": []}
    texts: dict[str, str] = {}
    for split, folder in parts.items():
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for file in sorted(f for f in class_dir.rglob("*.txt") if f.is_file() and not f.name.startswith(".")):
                ref = file_ref(file)
                try:
                    text = file.read_bytes().decode("utf-8").strip()
                except UnicodeDecodeError as err:
                    skipped.append((ref, f"not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start})"))
                    continue
                if not text:
                    skipped.append((ref, "empty text"))
                    continue
                texts[ref] = text
                splits[split].append((ref, class_dir.name))
    return splits, texts


def read_texts(path: Path, text_column: str = "text") -> list[tuple[str, str]]:
    """(name, text) of every text in a .txt file (one) or a table (each row's `text_column`, label or not)."""
    if path.suffix.lower() == ".txt":
        try:
            return [(str(path), path.read_bytes().decode("utf-8").strip())]
        except UnicodeDecodeError as err:
            raise UserError(
                f"'{path}' is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})."
            ) from None
    rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _delimited_rows(path)
    out = []
    for n, row in rows:
        if text_column not in row:
            raise UserError(
                f"'{path}' has no column '{text_column}'{did_you_mean(text_column, sorted(row))}; "
                f"its columns: {', '.join(sorted(row))}."
            )
        text = str(row[text_column] or "")
        bad = _bad_bytes(text)
        if bad:
            raise UserError(f"Row {n} of '{path}' is {bad}.")
        out.append((f"{path}:{n}", text))
    return out


def check_classes(splits: Splits, spec: str) -> None:
    """Every class needs two texts or more: one to learn from and one to check on."""
    counts: dict[str, int] = {}
    for samples in splits.values():
        for _, label in samples:
            counts[label] = counts.get(label, 0) + 1
    lonely = sorted(label for label, n in counts.items() if n < 2)
    if lonely:
        raise UserError(
            f"Class(es) {', '.join(map(repr, lonely[:10]))} of '{spec}' have a single text; each class "
            "needs two or more (one to train on, one to validate). Add texts or remove those rows."
        )


_SPLITS = {
    "": "train",
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def _delimited_rows(path: Path):
    """(line number, row dict) of a CSV/TSV read with undecodable bytes kept as surrogates (see _bad_bytes)."""
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        if reader.fieldnames:
            reader.fieldnames = [f.strip() for f in reader.fieldnames]
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}


def _jsonl_rows(path: Path):
    with path.open("rb") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            text = line.decode("utf-8", errors="surrogateescape")
            try:
                row = json.loads(text)
            except ValueError as err:
                raise UserError(
                    f"Line {n} of '{path}' is not JSON ({err}); a .jsonl file holds one object per line, "
                    'e.g. {"text": "...", "label": "..."}.'
                ) from None
            if not isinstance(row, dict):
                raise UserError(f"Line {n} of '{path}' is {type(row).__name__}, not an object with text and label.")
            yield n, row


def _bad_bytes(text: str) -> str | None:
    """Why a decoded row is unusable: bytes that are not UTF-8 come back as lone surrogates."""
    for _i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            return f"not UTF-8 (byte 0x{ord(ch) - 0xDC00:02x})"
    return None


class TokenIds:
    """A text as token ids: the tokenizer's encoding cut at `max_length` (special tokens included)."""

    def __init__(self, tokenizer_json: str, max_length: int, pad_id: int):
        from tokenizers import Tokenizer

        self.pad_id = pad_id
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)

    def __call__(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)

    def batch(self, texts: list[str]) -> torch.Tensor:
        return pad([self(t) for t in texts], self.pad_id)


def pad(ids: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """(N, longest) ids, right-padded with `pad_id`: dynamic padding, each batch as long as its longest text."""
    return torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id)


def collate(batch: list[tuple[torch.Tensor, int, int]], pad_id: int):
    """A loader's batch of (ids, class, index) items as (padded ids, classes, indices)."""
    ids, labels, index = zip(*batch)
    return pad(list(ids), pad_id), torch.tensor(labels), torch.tensor(index)
