"""Transferability before training: how well a frozen backbone's features suit a labelled data set.

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML
2021) scores features F (N, D) against each class's one-hot column y by the log marginal likelihood of
Bayesian linear regression y = F w + noise, with prior w ~ N(0, 1/alpha I) and noise ~ N(0, 1/beta):

    L(alpha, beta) = N/2 log beta + D/2 log alpha - N/2 log 2 pi - beta/2 ||F m - y||^2 - alpha/2 m'm
                     - 1/2 log|A|,   A = alpha I + beta F'F,   m = beta A^-1 F'y

maximised over (alpha, beta) by MacKay's fixed point (alpha = gamma / m'm, beta = (N - gamma) /
||F m - y||^2, gamma = sum of beta s_i / (alpha + beta s_i) over the eigenvalues s_i of F'F). The score
is the mean over classes of L / N: higher means the features predict the labels with a simpler linear
model, which the paper found to track fine-tuned accuracy across backbones.

One thin SVD of F serves every class and every iteration: with F = U S V', everything above is a sum
over the D eigenvalues of F'F (S^2, then zeros beyond the rank when N < D) of the projections U'y.
Unlike the authors' code, the evidence is evaluated exactly at the returned (alpha, beta) (no 1e-5
added to the sums), log|A| counts the D - N eigenvalues alpha of A when N < D, and the iteration runs to
a tolerance rather than a fixed 11 steps. With N < D the supremum may lie on a boundary (alpha / beta -> 0:
the labels are interpolated without noise); the iteration then stops when the evidence stops growing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from transferkit.core.errors import UserError

TOLERANCE = 1e-5
"""Stop when alpha / beta changes by less than this, relatively (a stationary point)..."""
STALL = 1e-10
"""...or when the evidence per sample changes by less than this (its supremum lies on a boundary)."""
MAX_ITERATIONS = 100
"""Measured on lite0/lite1 features of the builtin sets at 64 px: 12-45 iterations per class; on
10-shot digits (N = 100 < D = 1280) a few classes ran out, their evidence per sample < 3e-5 below
the maximum found on a fine grid."""
_FLOOR = 1e-300  # keeps a degenerate class (labels orthogonal to every feature) from dividing by zero


@dataclass(frozen=True)
class ClassEvidence:
    """One class's fit: the maximising prior and noise precisions and the log evidence there."""

    label: object
    alpha: float
    """Prior precision of the weights."""
    beta: float
    """Precision of the noise."""
    evidence: float
    """log p(y | F, alpha, beta), summed over the N samples (the score uses evidence / N)."""
    iterations: int
    converged: bool
    """False: MAX_ITERATIONS ran out first; the evidence is still exact at (alpha, beta), a little below
    the maximum."""


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of `features` (N, D) for class `labels` (N,): the mean over classes of the maximum
    log evidence per sample. Comparable between backbones on the same labels, not across data sets."""
    fits = logme_per_class(features, labels)
    n = len(labels)
    return float(np.mean([fit.evidence / n for fit in fits]))


def logme_per_class(features: np.ndarray, labels: np.ndarray) -> list[ClassEvidence]:
    """Each class's (alpha, beta, evidence) at the maximum, in the order of np.unique(labels)."""
    f, labels = _checked(features, labels)
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # the min(N, D) leading eigenvalues of F'F; the other D - N (when N < D) are 0
    fits = []
    for label in np.unique(labels):
        y = (labels == label).astype(np.float64)
        x = u.T @ y  # y's coordinates along the left singular vectors
        outside = max(float(y @ y - x @ x), 0.0)  # ||y||^2 outside the span of F's columns
        fit = _maximise(x**2, sigma, outside, n, d)
        fits.append(ClassEvidence(label.item() if hasattr(label, "item") else label, *fit))
    return fits


def _maximise(
    x2: np.ndarray, sigma: np.ndarray, outside: float, n: int, d: int
) -> tuple[float, float, float, int, bool]:
    """MacKay's fixed point from alpha = beta = 1 (the paper's start): (alpha, beta, evidence, iterations,
    converged). Converged: alpha / beta settled (a stationary point), or the evidence stalled while alpha /
    beta runs off to 0 or infinity (its supremum on a boundary: the labels fitted without noise, which
    happens when N < D, or the features ignored)."""
    alpha = beta = 1.0
    evidence = _evidence(alpha, beta, x2, sigma, outside, n, d)
    for iteration in range(1, MAX_ITERATIONS + 1):
        t = alpha / beta
        gamma = float(np.sum(sigma / (t + sigma)))  # effective number of well-determined weights (zeros add 0)
        # n - gamma term by term: no cancellation when gamma comes close to n (N <= D and a tiny t)
        rest = n - len(sigma) + float(np.sum(t / (t + sigma)))
        m2, res2 = _norms(t, x2, sigma, outside)
        step = gamma / max(m2, _FLOOR), rest / max(res2, _FLOOR)
        if not (np.isfinite(step).all() and min(step) > 0):  # past what float64 holds on a boundary
            return alpha, beta, evidence, iteration - 1, True
        before, (alpha, beta) = evidence, step
        evidence = _evidence(alpha, beta, x2, sigma, outside, n, d)
        if abs(alpha / beta - t) <= TOLERANCE * t or abs(evidence - before) <= STALL * n:
            return alpha, beta, evidence, iteration, True
    return alpha, beta, evidence, MAX_ITERATIONS, False


def _norms(t: float, x2: np.ndarray, sigma: np.ndarray, outside: float) -> tuple[float, float]:
    """(m'm, ||F m - y||^2) at alpha / beta = t, from the spectrum: m = V diag(s / (t + s^2)) U'y."""
    m2 = float(np.sum(sigma * x2 / (t + sigma) ** 2))
    res2 = float(np.sum(x2 * (t / (t + sigma)) ** 2)) + outside
    return m2, res2


def _evidence(alpha: float, beta: float, x2: np.ndarray, sigma: np.ndarray, outside: float, n: int, d: int) -> float:
    """L(alpha, beta) of the module docstring: log|A| sums log(alpha + beta s_i) over the eigenvalues of F'F
    in `sigma`, and log(alpha) for each of the d - len(sigma) zero ones."""
    m2, res2 = _norms(alpha / beta, x2, sigma, outside)
    log_det = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(sigma)) * np.log(alpha)
    return float(
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - log_det / 2
    )


def _checked(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features as float64 (N, D) and labels as (N,), or a UserError naming what is wrong."""
    f, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    if f.ndim != 2 or f.size == 0:
        raise UserError(f"LogME needs a non-empty (N, D) feature matrix; got shape {f.shape}.")
    if labels.ndim != 1 or len(labels) != len(f):
        raise UserError(f"LogME needs one label per feature row: {len(f)} rows but labels of shape {labels.shape}.")
    if len(np.unique(labels)) < 2:
        raise UserError(
            f"LogME needs labels of at least 2 classes to score features against; got {len(np.unique(labels))}."
        )
    if not np.all(np.isfinite(f)):
        raise UserError("The features hold NaN or infinite values; check the backbone's weights and inputs.")
    if not np.any(f):
        raise UserError("The features are all zero: they cannot be scored (check the backbone's weights).")
    return f, labels
