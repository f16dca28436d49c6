"""`transferkit predict` and `transferkit export`: a trained model put to use, in PyTorch or as an exported file."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from transferkit.cli.startup import loading


def predict(
    model: Path = typer.Argument(..., help="A run directory or a bundle folder (model.json + model.safetensors)."),
    inputs: Optional[list[str]] = typer.Argument(
        None,
        help="Image files and/or folders; for a text model, texts, "
        ".txt files or .csv/.tsv/.jsonl tables (column text).",
    ),
    split: Optional[str] = typer.Option(None, help="Predict the run's own saved split (train|val|test) instead."),
    limit: Optional[int] = typer.Option(None, help="At most this many inputs."),
    top_k: int = typer.Option(5, help="Classes to show per image."),
    format: str = typer.Option("table", "--format", help="table | json | csv."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    tta: str = typer.Option("none", help="none | flip | flip-crop: average over augmented views."),
    backend: str = typer.Option(
        "torch",
        help="torch | onnx | tflite | tflite-fp16 | tflite-int8 | saved_model (the run's export, run by "
        "onnxruntime, the LiteRT interpreter or TensorFlow).",
    ),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 (auto: bf16 only where measured faster here)."),
) -> None:
    """Top-k class predictions for images or texts, with class names."""
    with loading():
        from transferkit.core.errors import UserError
        from transferkit.deploy.predictor import load

    if format not in ("table", "json", "csv"):
        raise UserError(f"--format must be table, json or csv; got '{format}'.")
    if top_k < 1:
        raise UserError(f"--top-k must be 1 or more; got {top_k}.")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be 1 or more; got {limit}.")
    if split and inputs:
        raise UserError("Give inputs or --split, not both: --split predicts the run's own saved split.")
    if split and split not in ("train", "val", "test"):
        raise UserError(f"--split must be train, val or test; got '{split}'.")
    clf = load(model, device=device, backend=backend, precision=precision)
    truth: dict[str, str] = {}
    if split:
        items, truth = _split_inputs(model, split)
    elif inputs:
        items = clf.named_inputs(inputs)
    else:
        raise UserError(
            "Nothing to predict: give image files or folders (texts, .txt files or tables for a text "
            "model), or --split test."
        )
    items = items[:limit] if limit else items
    skipped: list[tuple[str, str]] = []
    results = clf.predict_named(items, top_k=top_k, tta=tta, skipped=skipped)
    for r in results:
        if r["input"] in truth:
            r["true"] = truth[r["input"]]
    if skipped:
        listing = "".join(f"\n  {name}: {reason}" for name, reason in skipped[:20])
        more = f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        typer.echo(
            f"[transferkit] warning: skipped {len(skipped)} input(s) that cannot be read; predicted the other "
            f"{len(results)}:{listing}{more}",
            err=True,
        )
    _print_predictions(results, format)


def _split_inputs(model: Path, split: str) -> tuple[list[tuple[str, object]], dict[str, str]]:
    """(name, input) of every sample of the run's saved `split`, the classes interleaved, and the true class
    by name. Files are named relative to the current folder where they lie below it."""
    from transferkit.core.config import TrainConfig
    from transferkit.core.errors import UserError
    from transferkit.data.sources import config_data

    run = next((p for p in (model, model.parent) if (p / "config.yaml").is_file()), None)
    if run is None:
        raise UserError(f"--split needs a run directory (with config.yaml and split.json); '{model}' is not one.")
    config = TrainConfig.load(run / "config.yaml")
    data = config_data(config, run / "split.json")
    if not data.splits.get(split):
        raise UserError(f"The run '{run}' has no {data.kind}s in its {split} split.")
    by_class: dict[str, list] = {}
    for sample in data.splits[split]:
        by_class.setdefault(sample[1], []).append(sample)
    # interleave the classes so that --limit shows a few of each
    samples = [s for group in itertools.zip_longest(*by_class.values()) for s in group if s is not None]
    # image files go by path (the predictor reads them, and skips one that no longer opens); in-memory images
    # and texts by their array or text
    named = [(_shown(ref), ref if data.arrays is None else data.arrays[ref]) for ref, _ in samples]
    return named, {name: label for (name, _), (_, label) in zip(named, samples)}


def _shown(ref: str) -> str:
    """A file's path relative to the current folder when it lies below it (as file arguments show), else as is."""
    try:
        return str(Path(ref).relative_to(Path.cwd()))
    except ValueError:
        return ref


def _print_predictions(results: list[dict], format: str) -> None:
    if format == "json":
        typer.echo(json.dumps(results, indent=1))
    elif format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["input", "label", "score", *(["true"] if results and "true" in results[0] else []), "top_k"])
        for r in results:
            writer.writerow(
                [
                    r["input"],
                    r["label"],
                    f"{r['score']:.6f}",
                    *([r["true"]] if "true" in r else []),
                    ";".join(f"{t['label']}:{t['score']:.4f}" for t in r["top_k"]),
                ]
            )
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console(markup=False)  # as wide as the terminal; names as they are, no rich markup
        # an input's name stays on one line while it takes at most half the width, the others wrap; a longer
        # one folds, whole, onto more lines
        longest = max((len(r["input"]) for r in results), default=0)
        table = Table()
        table.add_column("input", overflow="fold", min_width=min(longest, console.width // 2))
        for col in ("prediction", "score", *(["true"] if results and "true" in results[0] else []), "top-k"):
            table.add_column(col)
        for r in results:
            table.add_row(
                r["input"],
                r["label"],
                f"{r['score']:.3f}",
                *([r["true"]] if "true" in r else []),
                ", ".join(f"{t['label']} {t['score']:.2f}" for t in r["top_k"]),
            )
        console.print(table)


def export(
    run: Path = typer.Argument(..., help="A run directory or a bundle folder."),
    format: str = typer.Option("onnx", "--format", help="onnx | torchscript | tflite | saved_model."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default RUN/export)."),
    tolerance: Optional[float] = typer.Option(
        None,
        help="Largest |logit difference| the parity check accepts (default 1e-4; 1e-3 for tflite and "
        "saved_model; 0.05 with preprocessing); with --fp16/--int8 the largest test-accuracy drop (default 0.02).",
    ),
    with_preprocessing: bool = typer.Option(
        False,
        "--with-preprocessing",
        help="ONNX, SavedModel: take uint8 HxWx3 images; resize, crop, normalize in the graph.",
    ),
    fp16: bool = typer.Option(False, "--fp16", help="TFLite: float16 weights (half the file)."),
    int8: bool = typer.Option(
        False, "--int8", help="TFLite: int8 weights and activations, calibrated on train images."
    ),
    calibration: int = typer.Option(100, help="--int8: how many train images calibrate the ranges."),
) -> None:
    """Export the best model with model.json beside it, then check it against PyTorch."""
    with loading():
        from transferkit.core.errors import UserError
        from transferkit.deploy.export import export as run_export

    if fp16 and int8:
        raise UserError("--fp16 and --int8 exclude each other: pick one.")
    result = run_export(
        run,
        format,
        out,
        tolerance,
        with_preprocessing=with_preprocessing,
        quantize="fp16" if fp16 else "int8" if int8 else "none",
        calibration=calibration,
    )
    line = (
        f"{result['path']}: parity on {result['images']} inputs: max |logit diff| "
        f"{result['max_abs_logit_diff']:.2e}, top-1 agreement {result['top1_agreement']:.3f}"
    )
    if "test_accuracy" in result:
        acc = result["test_accuracy"]
        line += (
            f"; test accuracy {acc['pytorch']:.3f} (PyTorch) -> {acc['export']:.3f} ({result['precision']}), "
            f"change {acc['change']:+.3f} on {acc['images']} images"
        )
    typer.echo(line)
