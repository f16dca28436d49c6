"""`transferkit tune` and `transferkit rank`: thin shells over `transferkit.tuning`."""

from __future__ import annotations

import json

import typer

from transferkit.cli import options

TOGGLES = ("feature_cache", "image_cache", "channels_last", "compile", "html_report")
"""Switches whose False is a choice (--no-feature-cache), not "not given"."""


def tune(**flags) -> None:
    """Search the training config with Optuna; each trial is a run in runs/NAME/trials.

    Options given here are fixed for every trial; the rest of the search space is the default one or the
    `search:` section of --config. Writes runs/NAME/best.yaml (`transferkit train --config` it), best.json,
    study.json and report.html. Running the same command again continues the study."""
    from transferkit.core.config import TrainConfig
    from transferkit.core.errors import UserError
    from transferkit.core.progress import Reporter
    from transferkit.tuning.space import read_search
    from transferkit.tuning.study import tune as run_tune

    own = {k: flags.pop(k) for k in ("config", "trials", "timeout", "seeds_per_trial", "pruner", "storage", "study",
                                     "workers", "heartbeat")}
    flags = {k: v for k, v in flags.items() if v is not None and (v is not False or k in TOGGLES)}
    config = own.pop("config")
    cfg = (TrainConfig.load(config, other=("search",)) if config else TrainConfig()).replace(**flags)
    if not cfg.data:
        raise UserError("No data given: `transferkit tune DATA --trials N` (a folder, a .csv, builtin:faces, ...).")
    search, in_file = read_search(config) if config else (None, set())
    summary = run_tune(cfg, own.pop("trials"), fixed=set(flags) | in_file, search=search,
                       seeds_per_trial=own.pop("seeds_per_trial"), report=Reporter(quiet=True), **own)
    best = summary["best"] or {}
    test = best.get("test") or {}
    typer.echo(json.dumps({"study": summary["study"], "finished": summary["finished"], "failed": summary["failed"],
                           "best_trial": best.get("trial"), "val_accuracy": best.get("val_accuracy"),
                           "test_accuracy": test.get("accuracy"), "best_config": best.get("config")}))


tune.__signature__ = options.signature(options.TUNE)
