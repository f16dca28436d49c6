"""Calibration: expected calibration error, temperature scaling, reliability diagram bins.

A classifier is calibrated when, among images it predicts with confidence p, a fraction p is
right. ECE bins the top-class confidence into equal-width bins and averages |accuracy -
confidence| weighted by the bin's share of images (Guo et al. 2017). Temperature scaling
divides the logits by one scalar T > 0 fitted on validation by minimising the negative log
likelihood; it never changes the predicted class.

A temperature fitted on a few validation images fits those images, not the model: every one right
drives T towards 0, every one wrong towards infinity. So T is searched within `T_BOUNDS`, and
`choose_temperature` recommends it only when it lowers the ECE of validation images it was not
fitted on (k-fold), the way `evaluate --tta` recommends TTA only when it helps on validation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

T_BOUNDS = (0.05, 20.0)
"""The temperatures searched: T = 20 already makes a confident logit gap of 10 a near-coin flip."""
MIN_IMAGES = 20
"""Fewer validation images than this cannot tell a better temperature from noise: none is recommended."""
FOLDS = 5
"""Cross-validation folds of the validation split that judge the temperature."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, -1).numpy()


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict]:
    """Per confidence bin: its range, image count, mean confidence and accuracy (empty bins left out)."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            out.append(
                {
                    "lo": float(lo),
                    "hi": float(hi),
                    "n": int(inside.sum()),
                    "confidence": float(confidence[inside].mean()),
                    "accuracy": float(correct[inside].mean()),
                }
            )
    return out


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    n = len(labels)
    return float(sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability(probs, labels, bins)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T in `bounds` minimising the NLL of softmax(logits / T): golden-section search on log T (the NLL
    is convex in 1/T, so it has one minimum on the line; at a bound when the unbounded one lies beyond)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        top = scaled.max(1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(1))
        return float(np.mean(log_norm - scaled[np.arange(len(y)), y]))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    loss_a, loss_b = nll(a), nll(b)
    for _ in range(80):  # each step keeps 0.618 of the interval: 80 steps leave far below 1e-9 of log T
        if loss_a <= loss_b:
            hi, b, loss_b = b, a, loss_a
            a = hi - ratio * (hi - lo)
            loss_a = nll(a)
        else:
            lo, a, loss_a = a, b, loss_b
            b = lo + ratio * (hi - lo)
            loss_b = nll(b)
    found = (lo + hi) / 2
    for bound in bounds:  # a bound exactly when the minimum lies there or beyond (within rounding)
        if nll(math.log(bound)) <= nll(found) + 1e-12:
            return bound
    return math.exp(found)


def choose_temperature(logits: np.ndarray, labels: np.ndarray, folds: int = FOLDS) -> dict:
    """T fitted on the whole validation split, and whether to use it: `recommended` only when, fitted on
    the other folds, it lowered the ECE of each fold's images pooled (`ece_heldout` before, `_scaled`
    after); `why` says which and why in a sentence."""
    n = len(labels)
    temperature = fit_temperature(logits, labels)
    out = {"temperature": temperature, "bounds": list(T_BOUNDS), "ece_heldout": None, "ece_heldout_scaled": None}
    if n < MIN_IMAGES:
        why = (
            f"not recommended: {n} validation images are too few to judge a temperature (at least "
            f"{MIN_IMAGES}); the probabilities stay as trained"
        )
        return {**out, "recommended": False, "why": why}
    order = np.random.default_rng(0).permutation(n)  # folds that mix the classes, the same on every rebuild
    held_out = np.empty((n, logits.shape[1]))
    for part in np.array_split(order, min(folds, n)):
        rest = np.setdiff1d(order, part)
        held_out[part] = softmax(logits[part], fit_temperature(logits[rest], labels[rest]))
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(held_out, labels)
    recommended = after < before
    verdict = "recommended" if recommended else "not recommended, it did not help there"
    why = (
        f"{verdict}: on validation images it was not fitted on ({min(folds, n)}-fold), ECE {before:.4f} "
        f"as trained, {after:.4f} scaled"
    )
    if temperature in T_BOUNDS:
        why += f"; T stopped at the bound {temperature:g} of [{T_BOUNDS[0]:g}, {T_BOUNDS[1]:g}]"
    return {**out, "ece_heldout": before, "ece_heldout_scaled": after, "recommended": recommended, "why": why}
