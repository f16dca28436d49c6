"""Measures of a domain shift on features and predictions, none of them needing target labels: the mean
prediction entropy, the proxy A-distance (Ben-David et al. 2007), and a 2-D PCA of source and target
features for the report.
"""

from __future__ import annotations

import numpy as np

from transferkit.evaluation.calibration import softmax

POINTS = "adapt-features.json"
"""In the run directory: the 2-D PCA of source and target features before and after training (written by
training.adapt, drawn by the report)."""


def mean_entropy(logits: np.ndarray) -> float:
    """Mean entropy (nats) of the softmax of `logits` (n, classes): low when the model is confident."""
    p = softmax(logits)
    return float(-(p * np.log(p + 1e-12)).sum(1).mean())


def proxy_a_distance(source: np.ndarray, target: np.ndarray, seed: int = 0) -> float | None:
    """2 (1 - 2 err), err the 2-fold cross-validated error of a logistic regression telling source from
    target features on equal-sized samples: 0 when the domains cannot be told apart, 2 when they always can.
    None with fewer than 10 images on a side."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.preprocessing import StandardScaler

    n = min(len(source), len(target), 1000)
    if n < 10:
        return None
    rng = np.random.default_rng(seed)
    x = np.concatenate([source[rng.permutation(len(source))[:n]], target[rng.permutation(len(target))[:n]]])
    y = np.repeat([0, 1], n)
    x = StandardScaler().fit_transform(x)
    accuracy = cross_val_score(LogisticRegression(max_iter=500, C=0.1), x, y, cv=2).mean()
    return float(max(0.0, 2 * (1 - 2 * (1 - accuracy))))


def pca_2d(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source and target features projected on the first two principal components of both together."""
    x = np.concatenate([source, target]).astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    points = x @ vt[:2].T
    return points[: len(source)], points[len(source) :]
