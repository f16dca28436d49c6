"""Re-run a finished run's best model on one of its saved splits."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from transferkit.core.checks import check_precision
from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.core.files import write_text
from transferkit.core.machine import default_workers, pick_device
from transferkit.data.loaders import make_loader
from transferkit.data.preprocessing import preprocessing_from_dict
from transferkit.data.sources import config_data
from transferkit.data.target import labelled_set
from transferkit.deploy.bundle import load_bundle
from transferkit.deploy.predictor import Predictor, sample_batches
from transferkit.evaluation.passes import evaluate_loader
from transferkit.models.precision import Workload
from transferkit.models.runtime import inference_runtime
from transferkit.models.runtime import resolve as resolve_runtime
from transferkit.models.task import task_for


def evaluate(
    run: str | Path,
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    tta: str = "none",
    precision: str = "auto",
    data: str | None = None,
) -> dict:
    """Metrics of `run`'s best bundle on `split` of the split.json saved with the run, or on every image of
    the labelled set `data` (a folder of class folders, builtin:NAME...; its classes among the run's). With `tta`
    (flip | flip-crop), also the split's accuracy under test-time augmentation, and validation
    accuracy without and with it: `tta.recommended` is true only when TTA is better on validation.
    `precision`: auto (see `precision`), fp32 or bf16; the result names the one used."""
    run = Path(run)
    check_precision(precision)
    if not (run / "config.yaml").is_file() or not (run / "split.json").is_file():
        raise UserError(
            f"'{run}' is not a run directory: it needs config.yaml and split.json (as written by `transferkit train`)."
        )
    config = TrainConfig.load(run / "config.yaml")
    if batch_size:
        config = config.replace(batch_size=batch_size)
    model, meta = load_bundle(run)
    spec, split = data, split if data is None else "test"
    data = config_data(config, run / "split.json") if spec is None else labelled_set(spec, meta["classes"], "--data")
    if split not in data.splits or not data.splits[split]:
        raise UserError(f"Run '{run}' has no {data.kind}s in split '{split}'.")
    if data.classes != meta["classes"]:
        raise UserError(f"The classes in '{run}/split.json' differ from those of the model in '{run}/best'.")
    device = pick_device(device)  # this machine's workers, not the run's
    config = config.replace(workers=default_workers(data.arrays is not None, device.type == "cuda"))
    prep = preprocessing_from_dict(meta["preprocessing"])
    workload = Workload.of(model, config.model, prep, config.batch_size, config.channels_last)
    serve = inference_runtime(precision, device, workload, meta.get("precision"))
    rt = replace(
        resolve_runtime(config.replace(precision="fp32"), serve.device, config.workers),
        precision=serve.precision,
        reasons=serve.reasons,
        normalize=prep.mean_std,
    )
    task = task_for(data)
    loader = make_loader(
        data,
        split,
        task.transform(prep, config, False, rt.normalizes_on_device),
        config,
        min_side=prep.resize,
        reader=task.dataset,
    )
    with rt.threads_applied():
        metrics = evaluate_loader(
            rt.prepare(model),
            loader,
            nn.CrossEntropyLoss(),
            rt,
            data.classes,
            fold=True,
            move=functools.partial(task.move, rt=rt),
        )
    metrics.pop("logits")
    metrics.update(
        split=split if spec is None else spec,
        classes=data.classes,  # the confusion matrix's rows and columns, in order
        kind=data.kind,  # image | text
        precision=rt.precision["infer"],
        precision_reason=rt.reasons["infer"],
    )
    if tta != "none":
        metrics["tta"] = _tta(Predictor(model, meta, str(rt.device), rt.precision["infer"]), data, split, tta)
    write_text(run / (f"eval_{split}.json" if spec is None else "eval_data.json"), json.dumps(metrics, indent=1))
    return metrics


def _tta(clf: Predictor, data, split: str, tta: str) -> dict:
    """Accuracy of `split` with TTA; validation accuracy without and with it, and whether TTA helps there."""

    def accuracy(name: str, mode: str) -> float | None:
        samples = data.splits.get(name) or []
        if not samples:
            return None
        preds = np.concatenate(
            [
                clf.predict_proba(images, tta=mode).argmax(1)
                for images in sample_batches(data, samples, clf.preprocessing)
            ]
        )
        return float(np.mean([clf.classes[p] == label for p, (_, label) in zip(preds, samples)]))

    plain, with_tta = accuracy("val", "none"), accuracy("val", tta)
    return {
        "mode": tta,
        f"{split}_accuracy": accuracy(split, tta),
        "val_accuracy": plain,
        "val_accuracy_tta": with_tta,
        "recommended": bool(plain is not None and with_tta > plain),
    }
