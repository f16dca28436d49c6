"""Classification metrics from predictions: accuracy, macro-F1, per-class P/R, confusion matrix.

Counted with numpy from the confusion matrix rather than by scikit-learn: importing
sklearn.metrics (or torchmetrics, slower still) was a measurable share of a linear-probe run
(README, Speed: fixed costs), and every `train` and `evaluate` pays it. tests/test_metrics.py
checks every value against scikit-learn's.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[true, predicted], shape (n_classes, n_classes)."""
    flat = np.asarray(labels, np.int64) * n_classes + np.asarray(preds, np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    """All test metrics as plain JSON-ready values. Per-class scores and macro-F1 cover the classes present in
    `labels` (a class never predicted scores 0, not NaN); `absent` names the classes with no image here, which
    have nothing to score (counted as 0 they would pull macro-F1 down for a split, not for the model)."""
    cm = confusion_matrix(labels, preds, len(classes))
    hits, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, hits / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return {
        "accuracy": float(hits.sum() / len(labels)) if len(labels) else float("nan"),
        "macro_f1": float(np.mean(f1[present])) if len(labels) else float("nan"),
        "n": int(len(labels)),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
            if s
        },
        "absent": [c for c, s in zip(classes, support) if not s],
        "confusion_matrix": cm.tolist(),
    }
