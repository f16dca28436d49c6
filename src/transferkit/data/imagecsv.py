"""Image CSV files: rows of `path,label[,split]`, with or without a header row naming the columns (in any
order); paths relative to the CSV's folder. Errors name the row as `file.csv:LINE`."""

from __future__ import annotations

import csv
from pathlib import Path

from transferkit.core.errors import UserError
from transferkit.data.images import file_ref, is_image_file

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
"""The names a split column may use for each split."""

Splits = dict[str, list[tuple[str, str]]]
"""Each split's (file reference, label) samples."""


CSV_COLUMNS = ("path", "label", "split")
"""The columns of an image CSV, in this order when it has no header row."""


def read_image_csv(path: Path) -> Splits:
    """The samples of an image CSV: `path,label[,split]` rows, with or without a header row (one naming its
    columns, in any order). Errors name the row as `file.csv:LINE`, its line in the file."""
    splits: Splits = {"train": [], "val": [], "test": []}
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:  # -sig: Excel's BOM
        reader = csv.reader(fh)
        rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    columns = {name: i for i, name in enumerate(CSV_COLUMNS)}
    if rows and _is_header(rows, path.parent):
        line, header = rows.pop(0)
        names = [c.strip() for c in header]
        lowered = [c.lower() for c in names]
        absent = [name for name in ("path", "label") if name not in lowered]
        if absent:
            what = {"path": "the image files", "label": "the class names"}
            raise UserError(
                f"{path}:{line}: no column {' or '.join(map(repr, absent))}; columns found: {', '.join(names)}. "
                "An image CSV has the columns path,label[,split] (named by a header row, or in that order "
                f"without one): rename the column{'s' if len(absent) > 1 else ''} holding "
                + " and ".join(what[n] for n in absent)
                + f" to {' and '.join(absent)}."
            )
        columns = {name: lowered.index(name) for name in CSV_COLUMNS if name in lowered}
        if len(names) == 2:  # a header path,label over path,label,split rows: the third cell is the split
            columns.setdefault("split", 2)
    for line, row in rows:
        cells = {name: row[i].strip() if i < len(row) else "" for name, i in columns.items()}
        if not cells["path"] or not cells["label"]:
            raise UserError(
                f"{path}:{line}: expected path,label[,split]; got '{','.join(row)}'. "
                "Give each image's file and class on that line, or remove it."
            )
        file = Path(cells["path"])
        file = file if file.is_absolute() else (path.parent / file)
        split = cells.get("split") or "train"
        if split.lower() not in SPLIT_ALIASES:
            raise UserError(f"{path}:{line}: split '{split}' is not train, val or test; use one of those.")
        splits[SPLIT_ALIASES[split.lower()]].append((file_ref(file), cells["label"]))
    if not splits["train"]:
        raise UserError(f"CSV file '{path}' has no training rows (path,label[,split]).")
    return splits


def _is_header(rows: list[tuple[int, list[str]]], folder: Path) -> bool:
    """Whether the first row names columns rather than an image: it holds a column name (path, label,
    split), or its first cell is neither an existing file nor an image file name while the next row's is."""
    first = [c.strip() for c in rows[0][1]]
    if any(c.lower() in CSV_COLUMNS for c in first):
        return True

    def names_an_image(cell: str) -> bool:
        file = Path(cell) if Path(cell).is_absolute() else folder / cell
        return bool(cell) and (is_image_file(Path(cell)) or file.is_file())

    return not names_an_image(first[0]) and len(rows) > 1 and names_an_image(rows[1][1][0].strip())
