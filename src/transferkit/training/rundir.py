"""The run directory: its name, creation (never over a folder that is not a run), and the top-k bundles
kept by validation score.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.deploy.bundle import save_bundle


def score_key(score: dict) -> tuple:
    """Ordering of epoch scores: lower target entropy when the score has one (`--select target-entropy`),
    else higher validation accuracy, then lower validation loss."""
    if "target_entropy" in score:
        return -score["target_entropy"], score["val_accuracy"] or 0.0
    return score["val_accuracy"], -score["val_loss"]


def all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def keep_top(run_dir: Path, top: list[dict], score: dict, k: int, model, meta: dict, write: bool = True) -> list[dict]:
    """Keep the k best epochs as bundles top/epoch-NNN; returns the new ranking (best first).
    `write` False (ranks other than 0) only ranks."""
    ranked = sorted([*top, score], key=score_key, reverse=True)
    if not write:
        return ranked[:k]
    if score in ranked[:k]:
        save_bundle(run_dir / "top" / f"epoch-{score['epoch']:03d}", model, {**meta, "metrics": {"best": score}})
    prune_top(run_dir, ranked[:k])
    return ranked[:k]


def prune_top(run_dir: Path, top: list[dict]) -> None:
    """Delete top/ bundles not in the ranking (pushed out, or written after the checkpoint resumed from)."""
    keep = {f"epoch-{s['epoch']:03d}" for s in top}
    for path in sorted((run_dir / "top").glob("epoch-*")):
        if path.name not in keep:
            shutil.rmtree(path)


def default_name(config: TrainConfig) -> str:
    spec = config.data.rstrip("/")
    stem = spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec.split(":")[-1]).stem or "data"
    return f"{stem}-{config.strategy}"


def make_run_dir(root: Path, name: str, auto: bool, overwrite: bool) -> Path:
    """root/name; an auto-derived name that exists gets a -2, -3... suffix, a chosen one is refused."""
    run_dir = root / name
    if run_dir.exists() and overwrite:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--overwrite would delete '{run_dir}', which is not a transferkit run directory.")
        shutil.rmtree(run_dir)
    if run_dir.exists():
        if auto:
            n = 2
            while (root / f"{name}-{n}").exists():
                n += 1
            run_dir = root / f"{name}-{n}"
        else:
            raise UserError(
                f"Run directory '{run_dir}' already exists. Pick another --name, or pass --overwrite to replace it."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir
