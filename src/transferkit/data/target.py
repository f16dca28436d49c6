"""The target domain of domain adaptation: unlabelled images to adapt to (`--target`), and labelled ones
kept for measuring only (`--target-eval`), whose labels never reach a loss or the checkpoint choice.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transferkit.core.errors import UserError
from transferkit.data import check
from transferkit.data.images import EXTENSIONS, file_ref, is_image_file
from transferkit.data.sources import SPLITS, Data, load_data

UNLABELLED = ""
"""The target's one placeholder class: its samples carry no label."""


def load_target(spec: str, source: Data, say=lambda note: print(note, file=sys.stderr)) -> Data:
    """Every image of `spec`, without labels, as the 'train' split of a Data with one placeholder class: a
    folder (images anywhere below it: class folder names are ignored), or a builtin set, CSV or CIFAR
    folder as `train` reads them (their labels dropped). Unreadable files are skipped and listed as for the
    source; a target that is the source itself gets a warning through `say` (nothing to adapt to)."""
    skipped: list[tuple[str, str]] = []
    path = Path(spec).expanduser()
    if ":" in spec and not path.exists() or path.suffix.lower() == ".csv":
        found = load_data(spec, val_fraction=0.0, test_fraction=0.0)
        refs, arrays, skipped = [ref for s in SPLITS for ref, _ in found.splits[s]], found.arrays, found.skipped
    elif path.is_dir():
        files = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in file.relative_to(path).parts):
                skipped.append((file_ref(file), check.HIDDEN))
            elif not is_image_file(file):
                skipped.append(
                    (
                        file_ref(file),
                        f"unsupported format '{file.suffix or file.name}' (images: {' '.join(EXTENSIONS)})",
                    )
                )
            else:
                files.append((file_ref(file), UNLABELLED))
        refs, arrays = [ref for ref, _ in check.drop_unreadable({"train": files}, skipped)["train"]], None
    else:
        raise UserError(
            f"Target '{spec}' not found: give a folder of unlabelled images (subfolders are read, "
            "their names ignored) or a builtin set such as builtin:digits."
        )
    if not refs:
        raise UserError(
            f"Target '{spec}' has no usable images"
            + (f": all {len(skipped)} files were skipped, e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else "")
            + ". Adaptation needs target images."
        )
    source_refs = {ref for s in SPLITS for ref, _ in source.splits[s]}
    if source_refs and set(refs) <= source_refs:
        say(
            f"[transferkit] warning: every target image of '{spec}' is also a source image: there is no other "
            "domain to adapt to."
        )
    return Data(
        spec=spec,
        splits={"train": [(ref, UNLABELLED) for ref in refs], "val": [], "test": []},
        classes=[UNLABELLED],
        how=f"unlabelled target {spec}",
        arrays=arrays,
        skipped=skipped,
    )


def labelled_set(spec: str, classes: list[str], option: str = "--target-eval") -> Data:
    """Every image of the labelled set `spec` (all its splits) as the 'test' split, its labels indexed as
    the model's `classes` (a class the model lacks is an error naming `option`): `--target-eval`'s images,
    or any folder `evaluate --data` scores."""
    found = load_data(spec, val_fraction=0.0, test_fraction=0.0)
    samples = [sample for s in SPLITS for sample in found.splits[s]]
    extra = sorted({label for _, label in samples} - set(classes))
    if extra:
        raise UserError(
            f"{option} '{spec}' has class(es) {', '.join(map(repr, extra))} that the source "
            f"lacks (its classes: {', '.join(classes)}); a model cannot score them. Remove those "
            "folders."
        )
    return Data(
        spec=spec,
        splits={"train": [], "val": [], "test": samples},
        classes=list(classes),
        how=f"labelled set {spec} (scored only)",
        arrays=found.arrays,
        skipped=found.skipped,
    )
