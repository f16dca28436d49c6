"""The shippable model: `model.safetensors` + `model.json`. No pickle anywhere.

`model.json` carries everything needed to rebuild and use the network: architecture record,
classes, preprocessing, the strategy that trained it, and its metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

from transferkit.core.errors import UserError
from transferkit.models.classifier import Classifier
from transferkit.models.task import rebuild

FORMAT_VERSION = 1


def save_bundle(directory: Path, model: Classifier, meta: dict) -> None:
    """Write weights, then metadata, each atomically (temp file, fsync, rename): a crash leaves whole files."""
    from safetensors.torch import save_file

    from transferkit.core.files import atomic_write, tensor_bytes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous copies: safetensors stores row-major tensors (a channels_last model has NHWC strides)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(state, str(tmp)), size=tensor_bytes(state))
    text = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1)
    atomic_write(directory / "model.json", lambda tmp: tmp.write_text(text))


def bundle_dir(path: str | Path) -> Path:
    """Accept a bundle folder or a run folder (whose `best/` is the bundle)."""
    path = Path(path)
    for candidate in (path, path / "best"):
        if (candidate / "model.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise UserError(
        f"'{path}' is not a transferkit model: expected model.json and model.safetensors there or "
        "in its best/ folder (a run directory from `transferkit train`)."
    )


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
