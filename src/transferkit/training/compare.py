"""`compare`: the same data, split and seeds for every strategy arm; which choice wins here?

Every arm is an ordinary training run under `runs_dir/NAME/`; the study adds
`compare.json`, `compare.csv` and `compare.png` (test accuracy against shots per strategy
when several shot counts are given, else validation learning curves).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from pathlib import Path

from transferkit.core.config import STRATEGIES, TrainConfig
from transferkit.core.errors import UserError, did_you_mean
from transferkit.core.files import atomic_write, write_text
from transferkit.core.progress import Reporter
from transferkit.evaluation.report import build_compare_report
from transferkit.training.recipe import train
from transferkit.training.rundir import make_run_dir


def compare(
    data: str,
    strategies: list[str],
    shots: list[int | None] | None = None,
    seeds: int = 1,
    runs_dir: str = "runs",
    name: str | None = None,
    quiet: bool = False,
    **overrides,
) -> dict:
    """Train every (shots, seed, strategy) arm and summarise test accuracy as mean ± std over seeds."""
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise UserError(
                f"Unknown strategy '{strategy}' in --strategies.{did_you_mean(strategy, STRATEGIES)} "
                f"Choose from {', '.join(STRATEGIES)}."
            )
    if seeds < 1:
        raise UserError(f"seeds must be >= 1; got {seeds}.")
    shots = shots or [None]
    stem = data.split(":", 1)[1] if data.startswith("builtin:") else Path(data.rstrip("/")).stem
    root = Path(runs_dir)
    if name is not None and (root / name).exists():  # an earlier study's summary would be replaced
        raise UserError(f"Study folder '{root / name}' already exists: pick another --name, or remove it first.")
    out = make_run_dir(root, name or f"compare-{stem}", auto=True, overwrite=False)  # compare-DATA-2, ...
    report = Reporter(quiet)
    arms, total, started = [], len(shots) * seeds * len(strategies), time.perf_counter()
    for k in shots:
        for seed in range(seeds):
            for strategy in strategies:  # same seed => same split, same few-shot pick, for every strategy
                tick = time.perf_counter()
                arm_name = f"{strategy}-{k or 'all'}shot-seed{seed}"
                config = TrainConfig.from_dict(
                    {
                        "html_report": False,
                        **overrides,
                        "data": data,
                        "strategy": strategy,
                        "shots": k,
                        "seed": seed,
                        "runs_dir": str(out),
                        "name": arm_name,
                        "overwrite": True,
                        "quiet": True,
                        **({"weights": "none"} if strategy == "scratch" else {}),
                    }
                )
                run = train(config, report=Reporter(silent=True))
                curve = [
                    json.loads(line).get("val_accuracy")
                    for line in (run.dir / "metrics.jsonl").read_text().splitlines()
                ]
                arm = {
                    "strategy": strategy,
                    "shots": k,
                    "seed": seed,
                    "test_accuracy": run.metrics["test"]["accuracy"],
                    "best_epoch": run.metrics["best"]["epoch"],
                    "trainable_params": run.metrics["trainable_params"],
                    "wall_s": time.perf_counter() - tick,
                    "run": str(run.dir),
                    "val_curve": curve,
                }
                arms.append(arm)
                report.info(
                    f"[compare] {len(arms)}/{total} {arm_name}: test accuracy {arm['test_accuracy']:.3f} "
                    f"({arm['wall_s']:.0f} s)"
                )
    summary = _summarise(arms, strategies, shots)
    result = {
        "data": data,
        "strategies": strategies,
        "shots": shots,
        "seeds": seeds,
        "summary": summary,
        "arms": arms,
        "wall_s": time.perf_counter() - started,
        "dir": str(out),
    }
    write_text(out / "compare.json", json.dumps(result, indent=1))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(summary[0]))
    writer.writeheader()
    writer.writerows(summary)
    write_text(out / "compare.csv", table.getvalue())
    _plot(result, out / "compare.png")
    build_compare_report(result, out)
    return result


def _summarise(arms: list[dict], strategies: list[str], shots: list) -> list[dict]:
    rows = []
    for k in shots:
        for strategy in strategies:
            group = [a for a in arms if a["strategy"] == strategy and a["shots"] == k]
            accs = [a["test_accuracy"] for a in group]
            rows.append(
                {
                    "strategy": strategy,
                    "shots": k if k is not None else "all",
                    "n_seeds": len(group),
                    "test_accuracy_mean": statistics.fmean(accs),
                    "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "best_epoch_mean": statistics.fmean(a["best_epoch"] for a in group),
                    "trainable_params": group[0]["trainable_params"],
                    "wall_s_mean": statistics.fmean(a["wall_s"] for a in group),
                }
            )
    return rows


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    numeric_shots = [k for k in result["shots"] if k is not None]
    if len(numeric_shots) > 1:
        for strategy in result["strategies"]:
            rows = [r for r in result["summary"] if r["strategy"] == strategy and r["shots"] != "all"]
            ax.errorbar(
                [r["shots"] for r in rows],
                [r["test_accuracy_mean"] for r in rows],
                yerr=[r["test_accuracy_std"] for r in rows],
                marker="o",
                capsize=3,
                label=strategy,
            )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(numeric_shots, [str(k) for k in numeric_shots])
        ax.set_xlabel("training images per class (shots)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
    else:
        for strategy in result["strategies"]:
            arm = next(a for a in result["arms"] if a["strategy"] == strategy and a["seed"] == 0)
            ax.plot(range(1, len(arm["val_curve"]) + 1), arm["val_curve"], marker=".", label=strategy)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (seed 0)")
    ax.set_title(f"transferkit compare: {result['data']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
