"""What a study leaves in runs/NAME once its workers stop: study.json (every trial), best.yaml (the best
config, re-runnable), best.json (its validation score and its test metrics, scored once) and report.html
(optimisation history, parameter importances and a slice plot, as PNGs)."""

from __future__ import annotations

import base64
import functools
import html
import json
import statistics
import warnings
from pathlib import Path

from transferkit.core.config import TrainConfig
from transferkit.core.files import atomic_write, write_text
from transferkit.core.progress import Reporter
from transferkit.evaluation.runs import evaluate


def summarise(plan, folder: Path, config: TrainConfig, report: Reporter) -> dict:
    """Write the study's files; return study.json's content."""
    import optuna

    study = optuna.load_study(study_name=plan.study, storage=plan.storage)
    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    finished = [r for r in rows if r["state"] in ("complete", "pruned")]
    hits = sum(r["feature_cache"][0] for r in rows)
    misses = sum(r["feature_cache"][1] for r in rows)
    summary = {
        "study": plan.study,
        "storage": plan.storage.split("@")[-1],
        "trials": rows,
        "finished": len(finished),
        "failed": sum(r["state"] == "fail" for r in rows),
        "pruned": sum(r["state"] == "pruned" for r in rows),
        "feature_cache": {"hits": hits, "misses": misses},
        "best": None,
    }
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = max(complete, key=lambda t: (t.value, -t.number))
        summary["best"] = _best(best, folder, config)
        b = summary["best"]
        report.info(
            f"[transferkit] best trial {b['trial']}: val accuracy {b['val_accuracy']:.4f}, test accuracy "
            + (f"{b['test']['accuracy']:.4f}" if b["test"] else "- (no test split)")
            + f" | {params_text(b['params'])}"
        )
        report.info(
            f"[transferkit] best config: {folder / 'best.yaml'} (`transferkit train --config "
            f"{folder / 'best.yaml'}` trains it again)"
        )
    report.info(
        f"[transferkit] {len(finished)} trials finished ({summary['pruned']} pruned), {summary['failed']} "
        f"failed; feature cache: {hits} hits, {misses} misses"
    )
    write_text(folder / "study.json", json.dumps(summary, indent=1))
    write_report(study, folder, summary)
    return summary


def _row(t) -> dict:
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "value": t.value,
        "params": t.params,
        "seconds": t.duration.total_seconds() if t.duration else None,
        "runs": t.user_attrs.get("runs", []),
        "error": t.user_attrs.get("error"),
        "worker": t.user_attrs.get("worker"),
        "feature_cache": t.user_attrs.get("feature_cache", [0, 0]),
        "epochs": len(t.intermediate_values),
    }


def _best(trial, folder: Path, config: TrainConfig) -> dict:
    """best.yaml from the best trial's first run, and that trial's test metrics, scored once (kept in
    best.json for as long as the best trial stays the same)."""
    runs = [Path(r) for r in trial.user_attrs["runs"]]
    ran = TrainConfig.load(runs[0] / "config.yaml")
    best = ran.replace(
        runs_dir=config.runs_dir,
        name=f"{folder.name}-best",
        overwrite=False,
        quiet=config.quiet,
        html_report=config.html_report,
    )
    best.save(folder / "best.yaml")
    path = folder / "best.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if known.get("trial") == trial.number:
        return known
    scored = [evaluate(run, split="test") for run in runs] if _has_test(runs[0]) else []
    test = None
    if scored:
        test = {
            "accuracy": statistics.fmean(m["accuracy"] for m in scored),
            "macro_f1": statistics.fmean(m["macro_f1"] for m in scored),
            "n": scored[0]["n"],
            "runs": [{"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} for m in scored],
        }
    result = {
        "trial": trial.number,
        "val_accuracy": trial.value,
        "params": trial.params,
        "runs": [str(r) for r in runs],
        "config": str(folder / "best.yaml"),
        "test": test,
    }
    write_text(path, json.dumps(result, indent=1))
    return result


def _has_test(run: Path) -> bool:
    return bool(json.loads((run / "split.json").read_text())["splits"].get("test"))


def write_report(study, folder: Path, summary: dict) -> None:
    """report.html: the trial table and Optuna's matplotlib plots (history, importances, slice) as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    images = []
    for name, plot in (
        ("history", plots.plot_optimization_history),
        ("importances", plots.plot_param_importances),
        ("slice", plots.plot_slice),
    ):
        with warnings.catch_warnings():  # Optuna's "experimental" and matplotlib's layout notes
            warnings.simplefilter("ignore")
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:  # too few finished trials for this plot
                images.append((name, None, str(err)))
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.set_size_inches(max(6.0, figure.get_size_inches()[0]), 4.0)
            figure.tight_layout()
            atomic_write(folder / f"{name}.png", functools.partial(figure.savefig, dpi=90, format="png"))
        plt.close(figure)
        images.append((name, folder / f"{name}.png", None))
    rows = "".join(_table_row(r) for r in summary["trials"])
    body = "".join(
        f"<h2>{name}</h2>"
        + (f"<img src='data:image/png;base64,{_b64(path)}'>" if path else f"<p>not drawn: {html.escape(why)}</p>")
        for name, path, why in images
    )
    best = summary["best"]
    head = (
        (
            f"<p>best trial {best['trial']}: val accuracy {best['val_accuracy']:.4f}; params "
            f"{html.escape(json.dumps(best['params']))}</p>"
        )
        if best
        else "<p>no trial completed</p>"
    )
    write_text(
        folder / "report.html",
        f"<!doctype html><meta charset='utf-8'><title>study {html.escape(summary['study'])}</title>"
        f"<h1>study {html.escape(summary['study'])}</h1>{head}<p>{summary['finished']} finished, {summary['pruned']} "
        f"pruned, {summary['failed']} failed; feature cache {summary['feature_cache']['hits']} hits, "
        f"{summary['feature_cache']['misses']} misses</p>{body}<h2>trials</h2><table border=1><tr><th>trial</th>"
        f"<th>state</th><th>val accuracy</th><th>params</th><th>error</th></tr>{rows}</table>",
    )


def _table_row(r: dict) -> str:
    value = "" if r["value"] is None else f"{r['value']:.4f}"
    return (
        f"<tr><td>{r['number']}</td><td>{r['state']}</td><td>{value}</td>"
        f"<td>{html.escape(json.dumps(r['params']))}</td><td>{html.escape(r['error'] or '')}</td></tr>"
    )


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def params_text(params: dict) -> str:
    """A trial's parameters as a log line shows them: 'lr 0.00123, strategy lp-ft' (3 significant digits)."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
