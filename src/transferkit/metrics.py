"""Classification metrics from predictions: accuracy, macro-F1, per-class P/R, confusion matrix."""

from __future__ import annotations

import numpy as np


def classification_metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    """All test metrics as plain JSON-ready values (scikit-learn does the counting)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    idx = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=idx, zero_division=0
    )
    return {
        "accuracy": float(np.mean(labels == preds)) if len(labels) else float("nan"),
        "macro_f1": float(np.mean(f1)) if len(labels) else float("nan"),
        "n": int(len(labels)),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(labels, preds, labels=idx).tolist(),
    }
