"""A model over a loader: loss, accuracy, the full metrics and the logits in the split's order (validation,
test, evaluate). Several processes each run their shard and the results are gathered.
"""

from __future__ import annotations

import numpy as np
import torch

from transferkit.core.distributed import Dist
from transferkit.evaluation.metrics import classification_metrics
from transferkit.models.fuse import fold_batchnorm
from transferkit.models.runtime import Runtime


@torch.inference_mode()
def evaluate_loader(
    model,
    loader,
    loss_fn,
    rt: Runtime,
    classes: list[str] | None = None,
    d: Dist = Dist(),
    fold: bool = False,
    move=None,
) -> dict:
    """Loss and accuracy on a loader; with `classes`, the full metrics (F1, per class, confusion); "logits":
    (n, classes) in the split's order (for the report; pop it before writing JSON). With several processes
    each evaluates its shard and the results are gathered: the same on every rank. `fold`: run a copy with
    BatchNorm folded into the convolutions (measured faster: README, Speed; for a model in eval mode for good).
    `move` takes a batch's inputs to the device (default `rt.batch`)."""
    model.eval()
    net, loss_sum, parts = None, 0.0, []
    for images, labels, index in loader:
        images, labels = (move or rt.batch)(images), labels.to(rt.device, non_blocking=True)
        if net is None:
            net = fold_batchnorm(model, images[:2]) if fold else model
        with rt.autocast("infer"):
            logits = net(images).float()
        loss_sum += loss_fn(logits, labels).item() * len(labels)
        parts.append((logits.cpu().numpy(), labels.cpu().numpy(), np.asarray(index)))
    ranks = d.gather((loss_sum, parts))
    gathered = [part for _, rank_parts in ranks for part in rank_parts]
    loss_total = sum(rank_sum for rank_sum, _ in ranks)
    order = np.argsort(np.concatenate([index for _, _, index in gathered]), kind="stable")
    logits = np.concatenate([lg for lg, _, _ in gathered])[order]
    y_true = np.concatenate([lb for _, lb, _ in gathered]).astype(np.int64)[order]
    y_pred = logits.argmax(1)
    out = {"loss": loss_total / len(y_true), "accuracy": float((y_pred == y_true).mean())}
    if classes is not None:
        out.update(classification_metrics(y_true, y_pred, classes))
    return {**out, "logits": logits}
