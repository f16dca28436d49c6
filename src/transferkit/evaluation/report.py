"""runs/NAME/report.html: one self-contained page to open in a browser (charts as inline SVG, images embedded).

It holds the config and data summary, learning curves with the strategy's phases shaded, the
test confusion matrix, per-class precision/recall/F1, the most confidently wrong test images
("top losses"), and calibration: expected calibration error and a reliability diagram before
and after temperature scaling fitted on validation. `transferkit report runs/NAME` rebuilds
it from the run directory; `train` writes it at the end of a run.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
from pathlib import Path

import numpy as np

from transferkit.core.errors import UserError
from transferkit.core.files import atomic_write, write_text
from transferkit.core.machine import pick_device
from transferkit.evaluation.calibration import (
    choose_temperature,
    expected_calibration_error,
    reliability,
    softmax,
)
from transferkit.evaluation.charts import Series, chart
from transferkit.evaluation.domain import POINTS
from transferkit.evaluation.metrics import classification_metrics

TOP_LOSSES = 16


def split_logits(run_dir: Path, split: str, data, model) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(logits, labels, refs) of the best model on a split of the run's split.json: those `train` saved, else
    computed by `model()` (the loaded Predictor)."""
    from transferkit.deploy.predictor import sample_batches

    samples = data.splits.get(split) or []
    logits = _saved_logits(run_dir, split, len(samples))
    if logits is None:
        clf = model()
        parts = [clf.predict_logits(images) for images in sample_batches(data, samples, clf.preprocessing)]
        logits = np.concatenate(parts) if parts else np.zeros((0, len(data.classes)), np.float32)
    labels = np.array([data.classes.index(label) for _, label in samples], dtype=np.int64)
    return logits, labels, [ref for ref, _ in samples]


PREDICTIONS = "predictions.npz"
"""The best model's test and validation logits, saved by `train` so the report need not run the model again."""


def save_predictions(run_dir: Path, logits: dict) -> None:
    """run_dir/predictions.npz with the arrays of `logits` that exist (a stale file is removed)."""
    arrays = {split: value for split, value in logits.items() if value is not None}
    (run_dir / PREDICTIONS).unlink(missing_ok=True)
    if arrays:  # to an open file: np.savez would add .npz to the writer's temp name
        atomic_write(run_dir / PREDICTIONS, lambda tmp: _savez(tmp, arrays))


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _saved_logits(run_dir: Path, split: str, n: int) -> np.ndarray | None:
    """The logits `train` saved for `split`, if they cover its n images."""
    try:
        with np.load(run_dir / PREDICTIONS) as saved:
            logits = saved.get(split, None)
    except (OSError, ValueError):
        return None
    return logits if logits is not None and len(logits) == n else None


def epoch_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a last row cut short (the run was killed while appending it) is left out."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise UserError(f"'{path}' line {number} is not a JSON row; the file was edited or damaged.") from None
    return rows


def build_report(run_dir: str | Path, device: str = "cpu", data=None) -> Path:
    """Write run_dir/report.html (and calibration.json); returns the HTML path. `data`: the run's Data when the
    caller has it (train), else read again from the run's split.json."""
    from transferkit.core.config import TrainConfig
    from transferkit.data.sources import config_data
    from transferkit.deploy.predictor import load

    run_dir, device = Path(run_dir), str(pick_device(device))  # a wrong name fails now, not halfway
    for name in ("config.yaml", "split.json", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise UserError(f"'{run_dir}' is not a finished run directory: it has no {name}.")
    if not (run_dir / "best" / "model.json").is_file():
        raise UserError(f"'{run_dir}' has no best/ model yet; train it first (or resume it).")
    config = TrainConfig.load(run_dir / "config.yaml")
    data = data or config_data(config, run_dir / "split.json")
    meta = json.loads((run_dir / "best" / "model.json").read_text())
    if meta["classes"] != data.classes:
        raise UserError(f"The classes in '{run_dir}/split.json' differ from those of the model in '{run_dir}/best'.")
    loaded = []  # the Predictor, loaded only if some logits were not saved by `train`

    def model():
        loaded[:] = loaded or [load(run_dir, device)]
        return loaded[0]

    rows = epoch_rows(run_dir / "metrics.jsonl")
    how = (meta.get("data") or {}).get("how", data.how)  # as trained, not "reused from split.json"
    sections = [_summary(run_dir, config, data, how), _section("Learning curves", _curves(rows))]
    if any("adapt_loss" in r for r in rows):
        sections.append(_adaptation(run_dir, rows))
    test_logits, test_labels, test_refs = split_logits(run_dir, "test", data, model)
    calibration = {}
    if len(test_labels):
        probs = softmax(test_logits)
        preds = probs.argmax(1)
        metrics = classification_metrics(test_labels, preds, data.classes)
        sections += [
            _confusion(metrics, data.classes),
            _per_class(metrics),
            _top_losses(probs, test_labels, test_refs, data, meta["preprocessing"].get("in_chans")),
        ]
        val_logits, val_labels, _ = split_logits(run_dir, "val", data, model)
        calibration = _calibration(test_logits, test_labels, val_logits, val_labels)
        sections.append(_calibration_section(calibration, test_logits, test_labels))
    else:
        sections.append(_section("Test", "<p>This run has no test split.</p>"))
    write_text(run_dir / "calibration.json", json.dumps(calibration, indent=1))
    page = _PAGE.format(title=html.escape(f"transferkit report: {run_dir.name}"), body="\n".join(sections))
    out = run_dir / "report.html"
    write_text(out, page)
    return out


# --- sections -----------------------------------------------------------------------------


def _summary(run_dir: Path, config, data, how: str) -> str:
    counts = "".join(
        f"<tr><td>{html.escape(c)}</td>"
        + "".join(f"<td>{data.counts(s).get(c, 0)}</td>" for s in ("train", "val", "test"))
        + "</tr>"
        for c in data.classes
    )
    skipped = (run_dir / "skipped.txt").read_text().splitlines() if (run_dir / "skipped.txt").is_file() else []
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    best = metrics.get("best") or {}
    runtime = metrics.get("runtime") or {}
    precision = "; ".join(
        f"{'training' if kind == 'train' else 'inference'} {html.escape(str(value))} "
        f"({html.escape(str((runtime.get('precision_reason') or {}).get(kind, '')))})"
        for kind, value in (runtime.get("precision") or {}).items()
    )
    size = f", {config.img_size} px" if config.img_size else ""  # text runs have no image size
    scored = f" (val accuracy {_fmt(best['val_accuracy'])})" if best.get("val_accuracy") is not None else ""
    return _section(
        "Run",
        f"""
<p><b>{html.escape(config.model)}</b>, strategy <b>{html.escape(config.strategy)}</b>{size},
best epoch {best.get("epoch")}{scored}.
Data: {html.escape(str(config.data))} ({html.escape(how)}).</p>
<p class="precision">Precision: {precision or "not recorded"}.</p>
<table class="counts"><tr><th>class</th><th>train</th><th>val</th><th>test</th></tr>{counts}</table>
<p>Skipped files: {len(skipped)}</p>{_pre(chr(10).join(skipped[:20])) if skipped else ""}
<details><summary>config.yaml</summary>{_pre((run_dir / "config.yaml").read_text())}</details>""",
    )


def _confusion(metrics: dict, classes: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    top = max(max(row, default=0) for row in metrics["confusion_matrix"]) or 1
    body = "".join(
        f"<tr><th>{html.escape(c)}</th>" + "".join(_count_cell(v, top) for v in row) + "</tr>"
        for c, row in zip(classes, metrics["confusion_matrix"])
    )
    return _section(
        "Confusion matrix (test)",
        f"""
<p>Accuracy {metrics["accuracy"]:.4f}, macro-F1 {metrics["macro_f1"]:.4f} on {metrics["n"]} images.
Rows: true class; columns: predicted.</p>
<table id="confusion"><tr><th></th>{head}</tr>{body}</table>""",
    )


def _count_cell(count: int, top: int) -> str:
    """A confusion-matrix cell shaded by its count, as a heat map (white text on the darker half)."""
    share = count / top
    colour = "color: white; " if share > 0.5 else ""
    return f'<td class="count" style="{colour}background: rgba(31, 119, 180, {share:.2f})">{count}</td>'


def _per_class(metrics: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>"
        for c, m in metrics["per_class"].items()
    )
    absent = metrics.get("absent") or []
    note = (
        f"<p>No test images for {', '.join(map(html.escape, absent))}: not scored, and not in macro-F1.</p>"
        if absent
        else ""
    )
    return _section(
        "Per class (test)",
        "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
        f"<th>support</th></tr>{rows}</table>{note}",
    )


def _top_losses(probs: np.ndarray, labels: np.ndarray, refs: list[str], data, in_chans: int | None) -> str:
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    wrong = wrong[np.argsort(-probs[wrong].max(1))][:TOP_LOSSES]
    if not len(wrong):
        return _section("Most confidently wrong (test)", "<p>No test sample is misclassified.</p>")
    figures = []
    for i in wrong:
        true, pred = data.classes[labels[i]], data.classes[int(probs[i].argmax())]
        figures.append(
            f'<figure class="top-loss" data-true="{html.escape(true)}" data-pred="{html.escape(pred)}">'
            f"{_sample(data, refs[i], in_chans)}<figcaption>true {html.escape(true)}<br>predicted "
            f"{html.escape(pred)} ({probs[i].max():.2f})<br><small>{html.escape(Path(refs[i]).name)}"
            f"</small></figcaption></figure>"
        )
    return _section("Most confidently wrong (test)", f'<div class="grid">{"".join(figures)}</div>')


def _sample(data, ref: str, in_chans: int | None) -> str:
    """A test sample as the page shows it: a 128 px thumbnail, or the text (its first 400 characters)."""
    sample = data.read(ref, in_chans)
    if isinstance(sample, str):
        return (
            f'<blockquote class="text">{html.escape(sample[:400] + ("..." if len(sample) > 400 else ""))}</blockquote>'
        )
    sample.thumbnail((128, 128))
    buffer = io.BytesIO()
    sample.save(buffer, format="PNG")
    return _img(buffer.getvalue())


def _calibration(test_logits, test_labels, val_logits, val_labels) -> dict:
    out = {"ece_test": expected_calibration_error(softmax(test_logits), test_labels), "temperature": None}
    if len(val_labels):
        choice = choose_temperature(val_logits, val_labels)
        t = choice["temperature"]
        out.update(
            choice,
            ece_val=expected_calibration_error(softmax(val_logits), val_labels),
            ece_val_scaled=expected_calibration_error(softmax(val_logits, t), val_labels),
            ece_test_scaled=expected_calibration_error(softmax(test_logits, t), test_labels),
        )
    return out


def _calibration_section(cal: dict, logits, labels) -> str:
    curves = {"as trained": reliability(softmax(logits), labels)}
    text = f"<p>Expected calibration error on test: {cal['ece_test']:.4f} (15 bins).</p>"
    if cal["temperature"] is not None:
        use = "applied" if cal["recommended"] else "not applied"
        curves[f"T = {cal['temperature']:.2f} ({use})"] = reliability(softmax(logits, cal["temperature"]), labels)
        text += (
            f"<p>Temperature scaling fitted on validation: T = {cal['temperature']:.3f}, "
            f"{html.escape(cal['why'])}. Applied to all of validation, ECE {cal['ece_val']:.4f} → "
            f"{cal['ece_val_scaled']:.4f}; on test {cal['ece_test']:.4f} → {cal['ece_test_scaled']:.4f} "
            "(shown, not used to choose). It never changes the predicted class.</p>"
        )
    else:
        text += "<p>No validation split: no temperature fitted.</p>"
    return _section("Calibration", text + _reliability_chart(curves, "reliability (test)"))


def build_compare_report(result: dict, out: Path) -> Path:
    """out/report.html for a `compare` study: the summary (mean ± std over seeds), the plot, every arm."""
    summary = "".join(
        f"<tr><td>{html.escape(r['strategy'])}</td><td>{r['shots']}</td><td>{r['n_seeds']}</td>"
        f"<td>{r['test_accuracy_mean']:.3f} ± {r['test_accuracy_std']:.3f}</td><td>{r['best_epoch_mean']:.1f}</td>"
        f"<td>{r['trainable_params']:,}</td><td>{r['wall_s_mean']:.1f}</td></tr>"
        for r in result["summary"]
    )
    arms = "".join(
        f"<tr><td>{html.escape(a['strategy'])}</td><td>{a['shots'] or 'all'}</td><td>{a['seed']}</td>"
        f'<td class="arm-accuracy">{a["test_accuracy"]:.3f}</td><td>{a["best_epoch"]}</td>'
        f"<td>{html.escape(Path(a['run']).name)}</td></tr>"
        for a in result["arms"]
    )
    plot = out / "compare.png"
    body = [
        _section(
            "Study",
            f"<p>Data {html.escape(str(result['data']))}; strategies "
            f"{html.escape(', '.join(result['strategies']))}; {result['seeds']} seed(s) per arm, each "
            f"seed the same split and few-shot pick for every strategy; {result['wall_s']:.0f} s.</p>",
        ),
        _section(
            "Test accuracy",
            "<table><tr><th>strategy</th><th>shots</th><th>seeds</th><th>test accuracy</th>"
            "<th>best epoch</th><th>trainable</th><th>s per arm</th></tr>"
            f"{summary}</table>" + (_img(plot.read_bytes()) if plot.is_file() else ""),
        ),
        _section(
            "Arms",
            "<table><tr><th>strategy</th><th>shots</th><th>seed</th><th>test accuracy</th>"
            f"<th>best epoch</th><th>run</th></tr>{arms}</table>",
        ),
    ]
    page = _PAGE.format(title=html.escape(f"transferkit compare: {out.name}"), body="\n".join(body))
    write_text(out / "report.html", page)
    return out / "report.html"


# --- figures and HTML pieces --------------------------------------------------------------


def _adaptation(run_dir: Path, rows: list[dict]) -> str:
    """Domain adaptation: source and target curves per epoch, the epoch the run's rule picked against the
    oracle pick (with --target-eval), and the features before and after training in 2-D."""
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    picked = (metrics.get("best") or {}).get("epoch")
    by_epoch = {r["epoch"]: r for r in rows}
    table = [("rule", html.escape(str(metrics.get("select", "val")))), ("picked epoch", picked)]
    if picked in by_epoch and by_epoch[picked].get("target_accuracy") is not None:
        oracle = max(rows, key=lambda r: r["target_accuracy"])
        table += [
            ("target accuracy at the picked epoch", _fmt(by_epoch[picked]["target_accuracy"])),
            ("oracle pick (needs target labels)", f"epoch {oracle['epoch']}: {_fmt(oracle['target_accuracy'])}"),
        ]
    cells = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in table)
    body = f"<table>{cells}</table>{_adaptation_charts(rows)}"
    points = run_dir / POINTS
    if points.is_file():
        body += _pca_charts(json.loads(points.read_text()))
    return _section("Domain adaptation", body)


def _adaptation_charts(rows: list[dict]) -> str:
    epochs = [r["epoch"] for r in rows]
    panels = []
    for keys in (
        ("val_accuracy", "target_accuracy", "domain_accuracy"),
        ("target_entropy", "proxy_a_distance", "adapt_loss"),
    ):
        series = [
            Series(key.replace("val_", "source val "), epochs, [r.get(key) for r in rows])
            for key in keys
            if any(r.get(key) is not None for r in rows)
        ]
        panels.append(chart(series, "epoch", "", integer_x=True))
    return _row(panels)


def _pca_charts(points: dict) -> str:
    panels = []
    for when in [when for when in ("before", "after") if when in points]:
        series = [
            Series(domain, *np.asarray(points[when][domain], dtype=float).reshape(-1, 2).T.tolist(), "points")
            for domain in ("source", "target")
        ]
        distance = points[when].get("proxy_a_distance")
        panels.append(
            chart(
                series,
                "PC 1",
                "PC 2",
                f"features {when} training (PCA)"
                + (f", proxy A-distance {distance:.2f}" if distance is not None else ""),
                size=(420, 340),
            )
        )
    return _row(panels)


def _curves(rows: list[dict]) -> str:
    """Train and val loss and accuracy per epoch, one shaded band per phase, named at its top left."""
    epochs = [r["epoch"] for r in rows]
    bands = []
    for phase, group in itertools.groupby(rows, key=lambda r: r["phase"]):
        group = list(group)
        bands.append((group[0]["epoch"] - 0.5, group[-1]["epoch"] + 0.5, phase))
    panels = []
    for key in ("loss", "accuracy"):
        series = [Series("train", epochs, [r[f"train_{key}"] for r in rows])]
        if any(r.get(f"val_{key}") is not None for r in rows):
            series.append(Series("val", epochs, [r.get(f"val_{key}") for r in rows]))
        panels.append(chart(series, "epoch", key, bands=bands, integer_x=True))
    return _row(panels)


def _reliability_chart(curves: dict[str, list[dict]], title: str) -> str:
    """A reliability diagram (accuracy against confidence per bin) for each named set of bins."""
    series = [Series("perfect", [0, 1], [0, 1], "dashed", "#888")]
    series += [
        Series(name, [b["confidence"] for b in bins], [b["accuracy"] for b in bins]) for name, bins in curves.items()
    ]
    return chart(series, "confidence", "accuracy", title, xlim=(0, 1), ylim=(0, 1.02), size=(360, 340))


def _row(charts: list[str]) -> str:
    return f'<div class="charts">{"".join(charts)}</div>'


def _img(png: bytes) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 16px; }}
figure {{ margin: 0; width: 140px; font-size: 12px; }}
figure img {{ max-width: 128px; }}
figure:has(blockquote.text) {{ width: 300px; }}
blockquote.text {{ margin: 0 0 4px; white-space: pre-wrap; font-size: 12px; }}
pre {{ background: #f6f6f6; padding: 8px; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
