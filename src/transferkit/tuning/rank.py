"""`rank`: which pretrained backbone suits this data, before any training (LogME, see
`evaluation.transferability`).

Each candidate (backbone x image size) is built exactly as a training run builds it, its frozen features
of the training split are extracted once under the eval transform, and LogME scores them against the
labels. The features go to the same cache entry a linear probe's training reads (`models.features`), so
a later linear-probe run, lp-ft run or tune trial with the same backbone, weights, size and split opens
them instead of extracting them again. Writes `rank.json` when given a folder.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from transferkit.core.config import TrainConfig
from transferkit.core.distributed import Dist
from transferkit.core.errors import UserError
from transferkit.core.files import write_text
from transferkit.core.machine import default_workers, pick_device, seed_everything
from transferkit.core.progress import Reporter
from transferkit.data.sources import Data, config_data
from transferkit.evaluation.transferability import logme
from transferkit.models.classifier import layer_groups
from transferkit.models.features import cached_features
from transferkit.models.task import task_for
from transferkit.models.weights import resolve_arch
from transferkit.training.precision import runtime_for
from transferkit.training.strategy import make_plan

FEW_PER_CLASS = 20
"""Below this many training images per class the recommendation is a linear probe (see `recommend`)."""
INFORMATIVE_GAIN = 0.2
"""LogME above chance (see `recommend`) from which the features count as carrying the labels. Measured at
64 px with lite0 and lite1: random Gaussian features of the same shape score below chance, real features
above this margin on every builtin set tried, least on few-shot ones (fewer images: a lower evidence per
image)."""


def rank(
    data: str,
    models: list[str],
    *,
    img_sizes: list[int] | None = None,
    config: TrainConfig | None = None,
    report: Reporter | None = None,
    out: Path | None = None,
) -> dict:
    """Score every backbone in `models` (at every size in `img_sizes`) on the training split of `data` by
    LogME, best first, with a strategy recommendation; `out`: a folder to write rank.json to.

    `config` supplies everything else a training run would use (weights, split fractions and seed, shots,
    in_chans, precision, batch size, cache folder); its model, img_size and strategy are replaced per
    candidate. `img_sizes` None: the config's img_size, else the data's or the backbone's default.
    Each row's `seconds` is the wall time of that candidate: building it, extracting (or opening cached)
    features and scoring them. Higher LogME is better; scores compare backbones on the same data only.
    `chance_logme`: the score of a constant feature, the labels explained by their class shares alone.
    """
    if not models:
        raise UserError("rank needs at least one model name to score.")
    for name in models:
        resolve_arch(name)  # an unknown name fails here, naming the model, before any work
    base = (config or TrainConfig()).replace(data=data, strategy="linear-probe", feature_views=0)
    report = report or Reporter(silent=True)
    source = config_data(base)
    labels = [source.classes.index(label) for _, label in source.splits["train"]]
    candidates = [(name, size) for name in models for size in (img_sizes or [base.img_size])]
    rows, once = [], SaidOnce(report)
    for i, (name, size) in enumerate(candidates, 1):
        row = score_candidate(base.replace(model=name, img_size=size), source, labels, report, once)
        rows.append(row)
        report.info(
            f"[rank] {i}/{len(candidates)} {name}{_at(row)}: LogME {row['logme']:.4f} "
            f"({row['seconds']:.1f} s, {row['n_train']} {_samples(row)}, {row['feature_dim']} features)"
        )
    rows.sort(key=lambda r: r["logme"], reverse=True)
    for place, row in enumerate(rows, 1):
        row["rank"] = place
    chance = logme(np.ones((len(labels), 1)), np.array(labels))
    result = {
        "data": data,
        "weights": base.weights,
        "shots": base.shots,
        "seed": base.seed,
        "classes": len(source.classes),
        "n_train": len(labels),
        "chance_logme": chance,
        "rows": rows,
        "recommendation": recommend(len(labels), len(source.classes), rows[0], chance),
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_text(Path(out) / "rank.json", json.dumps(result, indent=1))
    return result


def score_candidate(
    config: TrainConfig, data: Data, labels: list[int], report: Reporter, said: Reporter | None = None
) -> dict:
    """One backbone at one size, built and run as a linear probe's training builds and runs it (same
    seed, weights, preprocessing, precision and eval transform: the same feature cache key). `said`
    reports the precision choice (default `report`)."""
    tick = time.perf_counter()
    device = pick_device(config.device)
    seed_everything(config.seed)  # as train does before building: a weights=none backbone matches too
    task = task_for(data)
    model, _, prep = task.build(config, len(data.classes), data.default_img_size)
    workers = (
        config.workers
        if config.workers is not None
        else default_workers(data.arrays is not None, device.type == "cuda")
    )
    config = config.replace(img_size=prep.img_size, workers=workers)
    plan = make_plan(config, len(layer_groups(model.backbone)))
    rt = runtime_for(config, model, prep, plan, device, workers, Dist(), said or report)
    rt.prepare(model)
    # feature_loaders' train split without feature_views: eval transform, identified by the preprocessing
    transform = task.transform(prep, config, False, rt.normalizes_on_device)
    with rt.threads_applied():
        features = cached_features(
            model.backbone,
            data,
            "train",
            transform,
            {"eval": prep.to_dict()},
            config,
            rt,
            report,
            min_side=prep.resize,
            reader=task.dataset,
        )
    score = logme(features, np.asarray(labels))
    return {
        "model": config.model,
        "img_size": prep.img_size,
        "logme": score,
        "seconds": time.perf_counter() - tick,
        "n_train": len(labels),
        "feature_dim": int(features.shape[1]),
    }


def recommend(n_train: int, n_classes: int, top: dict, chance: float) -> dict:
    """linear-probe or finetune, with one sentence why. A rule of thumb from transfer-learning practice
    (Kornblith et al. 2019, Kumar et al. 2022), not a measurement on this data:

    - fewer than FEW_PER_CLASS training images per class: linear-probe on the top backbone's features
      (already cached by `rank`); fine-tuning that few images tends to overfit and distort good features.
      lp-ft is the next step when the probe leaves accuracy to gain.
    - otherwise: finetune (top layer groups, discriminative LRs); with enough images, adapting the
      backbone usually beats keeping it frozen.

    The top score shapes the sentence, not the choice: its gain is its LogME minus `chance`, the LogME
    of a constant feature (the labels explained by their class shares alone). Below INFORMATIVE_GAIN the
    features barely beat chance: more labelled images (or another backbone) help more than any strategy.
    """
    per_class, gain = n_train / n_classes, top["logme"] - chance
    informative = gain >= INFORMATIVE_GAIN
    fit = f"{top['model']}{_at(top)} scores LogME {top['logme']:.3f}, {gain:+.2f} over chance, " + (
        "so its frozen features already carry the labels"
        if informative
        else "so its frozen features barely carry the labels"
    )
    if per_class < FEW_PER_CLASS:
        strategy = "linear-probe"
        why = (
            f"With {per_class:.0f} training {_samples(top)} per class (< {FEW_PER_CLASS}) fine-tuning would "
            f"likely overfit, and {fit}: "
            + (
                "train a linear probe on them, then try lp-ft."
                if informative
                else "a linear probe is the safest start, but expect more from more labelled images."
            )
        )
    else:
        strategy = "finetune"
        why = (
            f"With {per_class:.0f} training {_samples(top)} per class (>= {FEW_PER_CLASS}) there is enough "
            f"data to adapt the backbone, and {fit}: "
            + (
                "a linear probe on them is a quick baseline to beat."
                if informative
                else "fine-tuning should gain the most."
            )
        )
    return {
        "strategy": strategy,
        "why": why,
        "images_per_class": per_class,
        "gain_over_chance": gain,
        "rule": f"heuristic: linear-probe below {FEW_PER_CLASS} training images per class, else finetune",
    }


def _at(row: dict) -> str:
    """' at 64 px' for images; nothing for texts, which have no size (their img_size is None)."""
    return f" at {row['img_size']} px" if row["img_size"] else ""


def _samples(row: dict) -> str:
    """What the scored data is made of: images, or texts (no img_size)."""
    return "images" if row["img_size"] else "texts"


class SaidOnce:
    """`report`, less a message said before but for its figures: each candidate's precision line, the
    same choice for every backbone but for its measured speeds, is said once; a different choice is said."""

    def __init__(self, report: Reporter):
        self.report, self.said = report, set()

    def info(self, message: str) -> None:
        shape = re.sub(r"\d[\d.,]*", "#", message)
        if shape not in self.said:
            self.said.add(shape)
            self.report.info(message)
