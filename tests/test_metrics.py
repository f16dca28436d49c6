"""The numpy metrics equal scikit-learn's (the reference), including classes never predicted or absent."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from transferkit.evaluation.metrics import classification_metrics


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 7))
    classes = [f"c{i}" for i in range(n_classes)]
    labels = rng.integers(0, n_classes - (seed % 2), 50)  # odd seeds: the last class absent from the labels
    preds = np.where(rng.random(50) < 0.6, labels, rng.integers(0, max(n_classes - 1, 1), 50))  # and rarely predicted
    got = classification_metrics(labels, preds, classes)
    idx = list(range(n_classes))
    present = sorted(set(labels.tolist()))  # macro-F1 and per-class scores: over the classes with images here
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=idx, zero_division=0)
    assert got["confusion_matrix"] == confusion_matrix(labels, preds, labels=idx).tolist()
    assert got["accuracy"] == pytest.approx(np.mean(labels == preds))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, preds, labels=present, average="macro", zero_division=0))
    assert list(got["per_class"]) == [classes[i] for i in present]
    assert got["absent"] == [c for i, c in enumerate(classes) if i not in present]
    assert (seed % 2 == 1) == bool(got["absent"])
    for i in present:
        c = classes[i]
        assert [got["per_class"][c][k] for k in ("precision", "recall", "f1")] == pytest.approx([p[i], r[i], f[i]])
        assert got["per_class"][c]["support"] == s[i]


def test_no_labels_give_nan_accuracy():
    got = classification_metrics(np.array([], np.int64), np.array([], np.int64), ["a", "b"])
    assert np.isnan(got["accuracy"])
    assert got["n"] == 0
