"""The shippable model: `model.safetensors` + `model.json`. No pickle anywhere.

`model.json` carries everything needed to rebuild and use the network: architecture record,
classes, preprocessing, the strategy that trained it, and its metrics.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from transferkit.core.errors import UserError
from transferkit.core.files import aside, replace_folder
from transferkit.models.classifier import Classifier
from transferkit.models.task import rebuild

FORMAT_VERSION = 1


def save_bundle(directory: Path, model: Classifier, meta: dict) -> None:
    """Write the bundle whole or not at all: weights and metadata into a sibling temp folder (each file fsynced),
    which then takes the folder's place (the old one moved aside, then removed). A fault while writing (a crash,
    a full disk) leaves the previous bundle as it was and no temp folder."""
    from safetensors.torch import save_file

    from transferkit.core.files import atomic_write, tensor_bytes, write_text

    directory = Path(directory)
    fresh = aside(directory, "tmp")
    shutil.rmtree(fresh, ignore_errors=True)  # what an earlier crash left
    fresh.mkdir(parents=True)
    # contiguous copies: safetensors stores row-major tensors (a channels_last model has NHWC strides)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    text = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1)
    try:
        atomic_write(
            fresh / "model.safetensors",
            lambda tmp: save_file(state, str(tmp)),
            size=tensor_bytes(state),
            shown=directory / "model.safetensors",
        )
        write_text(fresh / "model.json", text, shown=directory / "model.json")
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    replace_folder(fresh, directory)


def bundle_dir(path: str | Path) -> Path:
    """Accept a bundle folder or a run folder (whose `best/` is the bundle; or the previous one, moved aside, when
    a crash came between the two renames of save_bundle)."""
    path = Path(path)
    for candidate in (path, path / "best", aside(path / "best", "old")):
        if (candidate / "model.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise UserError(
        f"'{path}' is not a transferkit model: expected model.json and model.safetensors there or "
        "in its best/ folder (a run directory from `transferkit train`)."
    )


def weights_digest(directory: Path) -> str:
    """sha256 of a bundle's model.safetensors: which weights an export was made from."""
    digest = hashlib.sha256()
    with open(directory / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(path: str | Path) -> dict:
    directory = bundle_dir(path)
    try:
        meta = json.loads((directory / "model.json").read_text())
        meta["architecture"], meta["classes"], meta["preprocessing"]  # noqa: B018 - presence check
    except (ValueError, KeyError) as err:
        raise UserError(f"'{directory / 'model.json'}' is damaged or not a transferkit model.json ({err}).") from None
    return meta


def load_bundle(path: str | Path) -> tuple[Classifier, dict]:
    """Rebuild the classifier from `model.json` and load its safetensors weights (eval mode, CPU)."""
    from safetensors.torch import load_model

    directory = bundle_dir(path)
    meta = read_meta(directory)
    model = rebuild(meta["architecture"])
    try:
        load_model(model, str(directory / "model.safetensors"))
    except Exception as err:  # safetensors raises several types for damaged or mismatched files
        raise UserError(f"Cannot load '{directory / 'model.safetensors'}': {err}") from None
    return model.eval(), meta
