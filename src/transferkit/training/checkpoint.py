"""Checkpoints that survive crashes, and loading that never runs code from a file.

`last.ckpt` is the whole state to continue a run from: weights, optimizer, scheduler, plan and
position (phase, epoch, step within the epoch), the best score so far and every random
stream. It holds tensors and plain values only, so it loads with `torch.load(weights_only=True)`.
Writes go to a temp file in the same folder, are fsynced, then renamed over the old file: a
crash at any instant leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.core.files import atomic_write, tensor_bytes
from transferkit.models.weights import torch_load
from transferkit.training.strategy import Phase, make_plan

RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "patience",
        "quiet",
        "device",
        "workers",
        "save_every_steps",
        "keep_top_k",
        "nan_policy",
        "nan_skip_limit",
        "deterministic",
        "trust_checkpoint",
        "cache_dir",
        "threads",
        "compile",
        "accumulate",
        "html_report",
        "tensorboard",
        "profile_steps",
    }
)
"""Config fields a resumed run may change: length, display, hardware and safety settings (the
process count is free too: the global batch, and so every step, stays the same).
Everything else (model, weights, data, classes, strategy, LRs...) would make a different run."""


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp), size=tensor_bytes(state))


def get_rng_state() -> dict:
    """Every process-wide random stream the loop draws from (numpy's as a tensor: weights_only loads
    no arrays). The loader's order and augmentation are seeded per epoch (see `sampling`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


CHECKPOINT_KEYS = (
    "model",
    "optimizer",
    "scheduler",
    "config",
    "plan",
    "phase",
    "epoch",
    "step",
    "sums",
    "best",
    "since_best",
    "top",
    "nan_skipped",
    "rng",
)


def load_resume(run_dir: Path, overrides: dict) -> tuple[TrainConfig, dict, dict]:
    """(config, last.ckpt state, changed fields) to continue `run_dir`.

    The checkpoint's own config is the reference; edits to config.yaml and explicit `overrides`
    are both changes, allowed only within RESUMABLE_CHANGES.
    """
    ckpt = run_dir / "last.ckpt"
    if not ckpt.is_file() or not (run_dir / "config.yaml").is_file():
        raise UserError(
            f"Cannot resume '{run_dir}': it needs config.yaml and last.ckpt from an earlier "
            "`transferkit train` (a run stopped before its first checkpoint must start again)."
        )
    trust = bool(overrides.get("trust_checkpoint"))
    state = torch_load(ckpt, "checkpoint", trust)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(
            f"'{ckpt}' is not a transferkit checkpoint (missing {', '.join(missing)}). Restore the "
            "file, or start the run again without --resume."
        )
    saved = TrainConfig.from_dict(state["config"], source=str(ckpt))
    edited = {k: v for k, v in TrainConfig.load(run_dir / "config.yaml").to_dict().items() if v != getattr(saved, k)}
    wanted = {**edited, **overrides}
    changes = {k: v for k, v in wanted.items() if getattr(saved, k) != v}
    refused = sorted(set(changes) - RESUMABLE_CHANGES)
    if refused:
        listing = ", ".join(f"{k} ({getattr(saved, k)!r} -> {changes[k]!r})" for k in refused)
        raise UserError(
            f"Cannot resume '{run_dir}' with a changed {listing}: that would be a different run. Resume may "
            f"change only {', '.join(sorted(RESUMABLE_CHANGES))}. To train with other settings start a new "
            f"run, e.g. `transferkit train --config {run_dir / 'config.yaml'} --name NEW ...`."
        )
    return saved.replace(**changes), state, changes


def resumed_plan(state: dict, config: TrainConfig, n_groups: int) -> list[Phase]:
    """The saved plan, or (after a change of epochs) the new one, if it keeps the phases already trained; a run
    in its last phase (an lp-ft run fine-tuning) whose new plan would reshape the earlier ones takes the extra
    epochs in that last phase."""
    saved = [Phase.from_dict(p) for p in state["plan"]]
    if config.epochs < state["epoch"]:
        raise UserError(
            f"This run has trained {state['epoch']} epochs; resume it with --epochs {state['epoch']} or "
            f"more (got {config.epochs})."
        )
    if config.epochs == state["config"]["epochs"]:
        return saved
    plan = make_plan(config, n_groups)
    k = state["phase"]

    def shape(phases, upto):  # everything up to the current phase, its length aside
        return [p.to_dict() | ({"epochs": None} if i == upto else {}) for i, p in enumerate(phases[: upto + 1])]

    if shape(plan, k) == shape(saved, k):
        return plan
    extra = config.epochs - state["config"]["epochs"]
    if k == len(saved) - 1 and extra > 0:  # in its last phase: the extra epochs go there
        return saved[:-1] + [replace(saved[-1], epochs=saved[-1].epochs + extra)]
    raise UserError(
        f"Changing epochs from {state['config']['epochs']} to {config.epochs} changes phases this "
        f"run already trained (it is in phase {k + 1} of {len(saved)}, '{saved[k].name}'). "
        "Resume with the original epochs, or start a new run."
    )
