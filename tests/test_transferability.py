"""LogME: the evidence at the returned (alpha, beta) is the paper's closed form, computed here directly
(slogdet, solve) rather than from the library's SVD shortcut; the point is a maximum; informative
features outscore random ones; bad input is a UserError."""

import numpy as np
import pytest

from transferkit.core.errors import UserError
from transferkit.evaluation.transferability import logme, logme_per_class


def evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """L(alpha, beta) = N/2 log beta + D/2 log alpha - N/2 log 2pi - beta/2 ||F m - y||^2 - alpha/2 m'm
    - 1/2 log|A|, with A = alpha I + beta F'F and m = beta A^-1 F'y."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    sign, log_det = np.linalg.slogdet(a)
    assert sign > 0
    return (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * np.sum((f @ m - y) ** 2)
        - alpha / 2 * m @ m
        - log_det / 2
    )


def clustered(n: int, d: int, seed: int, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """3 classes, each a Gaussian blob around its own random mean."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    return strength * rng.normal(size=(3, d))[labels] + rng.normal(size=(n, d)), labels


CASES = {"N > D": clustered(60, 10, seed=0), "N < D": clustered(24, 40, seed=1)}


@pytest.mark.parametrize("case", CASES)
def test_evidence_is_the_closed_form_at_a_local_maximum(case):
    f, labels = CASES[case]
    n = len(labels)
    fits = logme_per_class(f, labels)
    assert [fit.label for fit in fits] == [0, 1, 2]
    for fit in fits:
        y = (labels == fit.label).astype(float)
        assert fit.converged and fit.alpha > 0 and fit.beta > 0
        at_fit = evidence(f, y, fit.alpha, fit.beta)
        assert fit.evidence / n == pytest.approx(at_fit / n, abs=1e-6)
        for a, b in [(1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99)]:  # 1% either way is no better
            assert evidence(f, y, fit.alpha * a, fit.beta * b) <= at_fit
    assert logme(f, labels) == pytest.approx(np.mean([fit.evidence / n for fit in fits]), abs=1e-12)


def test_no_point_of_a_grid_beats_it_even_when_the_supremum_is_on_a_boundary():
    f, labels = clustered(24, 40, seed=0)  # its third class fits without noise: alpha / beta -> 0
    fits = logme_per_class(f, labels)
    assert fits[2].alpha / fits[2].beta < 1e-6
    grid = np.logspace(-4, 4, 17)
    for fit in fits:
        y = (labels == fit.label).astype(float)
        best = max(evidence(f, y, a, b) for a in grid for b in grid)
        assert fit.evidence >= best - 1e-9


def test_features_that_separate_the_classes_score_higher_than_random_ones():
    rng = np.random.default_rng(0)
    labels = np.repeat(["cat", "dog", "fox"], 20)
    separating = 3.0 * np.eye(10)[np.searchsorted(["cat", "dog", "fox"], labels)] + 0.3 * rng.normal(size=(60, 10))
    random = rng.normal(size=(60, 10))
    assert logme(separating, labels) > logme(random, labels) + 1.0
    assert [fit.label for fit in logme_per_class(random, labels)] == ["cat", "dog", "fox"]


@pytest.mark.parametrize(
    "features, labels, words",
    [
        (np.zeros((0, 4)), np.zeros(0), "non-empty"),
        (np.ones(5), np.arange(5) % 2, "(N, D)"),
        (np.ones((5, 3)), np.arange(4) % 2, "one label per feature row"),
        (np.ones((5, 3)), np.zeros(5), "at least 2 classes"),
        (np.full((4, 3), np.nan), np.arange(4) % 2, "NaN"),
        (np.zeros((4, 3)), np.arange(4) % 2, "all zero"),
    ],
)
def test_bad_input_is_a_user_error(features, labels, words):
    with pytest.raises(UserError) as err:
        logme(features, labels)
    assert words in str(err.value)
