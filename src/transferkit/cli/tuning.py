"""`transferkit tune` and `transferkit rank`: thin shells over `transferkit.tuning`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from transferkit.cli import options
from transferkit.cli.startup import loading

TOGGLES = ("feature_cache", "image_cache", "channels_last", "compile", "html_report")
"""Switches whose False is a choice (--no-feature-cache), not "not given"."""


def tune(**flags) -> None:
    """Search the training config with Optuna; each trial is a run in runs/NAME/trials.

    Options given here are fixed for every trial; the rest of the search space is the default one or the
    `search:` section of --config. Writes runs/NAME/best.yaml (`transferkit train --config` it), best.json,
    study.json and report.html. Running the same command again continues the study."""
    with loading(trains=True):
        from transferkit.core.config import TrainConfig
        from transferkit.core.errors import UserError
        from transferkit.core.progress import Reporter
        from transferkit.tuning.space import read_search
        from transferkit.tuning.study import tune as run_tune

    own = {
        k: flags.pop(k)
        for k in (
            "config",
            "trials",
            "timeout",
            "seeds_per_trial",
            "pruner",
            "storage",
            "study",
            "workers",
            "heartbeat",
            "models",
            "top_k",
        )
    }
    own["models"] = model_list(own["models"])
    flags = {k: v for k, v in flags.items() if v is not None and (v is not False or k in TOGGLES)}
    config = own.pop("config")
    cfg = (TrainConfig.load(config, other=("search",)) if config else TrainConfig()).replace(**flags)
    if not cfg.data:
        raise UserError("No data given: `transferkit tune DATA --trials N` (a folder, a .csv, builtin:faces, ...).")
    search, in_file = read_search(config) if config else (None, set())
    summary = run_tune(
        cfg,
        own.pop("trials"),
        fixed=set(flags) | in_file,
        search=search,
        seeds_per_trial=own.pop("seeds_per_trial"),
        report=Reporter(quiet=True),
        **own,
    )
    best = summary["best"] or {}
    test = best.get("test") or {}
    typer.echo(
        json.dumps(
            {
                "study": summary["study"],
                "finished": summary["finished"],
                "failed": summary["failed"],
                "best_trial": best.get("trial"),
                "val_accuracy": best.get("val_accuracy"),
                "test_accuracy": test.get("accuracy"),
                "best_config": best.get("config"),
            }
        )
    )


tune.__signature__ = options.signature(options.TUNE)


def model_list(spec: str | None) -> list[str] | None:
    """--models: comma-separated names, or auto (every backbone with weights on this machine)."""
    if spec is None:
        return None
    if spec.strip() == "auto":
        from transferkit.models.weights import available_models

        return [row["name"] for row in available_models()]
    return [name.strip() for name in spec.split(",") if name.strip()]


def rank(
    data: str = typer.Argument(..., help="Same data specs as `train`."),
    models: str = typer.Option("auto", help="Comma-separated backbones, or auto (those with weights here)."),
    img_sizes: Optional[str] = typer.Option(None, help="Comma-separated sizes in pixels to score each backbone at."),
    shots: Optional[int] = typer.Option(None, help="Keep K training images per class (as train would)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (weights, split, seed, precision...)."),
    out: Path = typer.Option(Path("runs/rank"), help="Folder for rank.json."),
) -> None:
    """Score backbones on DATA before training, by LogME on frozen features; a table, rank.json, advice.

    The features land in the feature cache, so a linear probe or tune trial on the same backbone reuses them."""
    from rich.console import Console
    from rich.table import Table

    with loading():
        from transferkit.core.config import TrainConfig
        from transferkit.core.errors import UserError
        from transferkit.core.progress import Reporter
        from transferkit.tuning.rank import rank as run_rank

    try:
        sizes = [int(s) for s in img_sizes.split(",")] if img_sizes else None
    except ValueError:
        raise UserError(f"--img-sizes must be comma-separated integers, e.g. 64,96; got '{img_sizes}'.") from None
    cfg = TrainConfig.load(config) if config else TrainConfig()
    cfg = cfg.replace(**({"shots": shots} if shots is not None else {}))
    result = run_rank(data, model_list(models), img_sizes=sizes, config=cfg, report=Reporter(quiet=True), out=out)
    texts = result["rows"][0]["img_size"] is None  # texts have no size in pixels
    samples = "texts" if texts else "images"
    # the title is a line of its own: as a table title it wrapped mid-phrase to the table's width
    typer.echo(
        f"LogME on {data}: {result['n_train']} training {samples}, {result['classes']} classes "
        f"(chance {result['chance_logme']:.3f})"
    )
    columns = ("rank", "model", "LogME", "seconds") if texts else ("rank", "model", "px", "LogME", "seconds")
    table = Table()
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in result["rows"]:
        size = [] if texts else [str(r["img_size"])]
        table.add_row(str(r["rank"]), r["model"], *size, f"{r['logme']:.4f}", f"{r['seconds']:.1f}")
    Console(markup=False).print(table)
    advice = result["recommendation"]
    typer.echo(f"recommended strategy: {advice['strategy']}. {advice['why']}")
    typer.echo(f"wrote {out / 'rank.json'}")
