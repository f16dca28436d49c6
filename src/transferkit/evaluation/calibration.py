"""Calibration: expected calibration error, temperature scaling, reliability diagram bins.

A classifier is calibrated when, among images it predicts with confidence p, a fraction p is
right. ECE bins the top-class confidence into equal-width bins and averages |accuracy -
confidence| weighted by the bin's share of images (Guo et al. 2017). Temperature scaling
divides the logits by one scalar T > 0 fitted on validation by minimising the negative log
likelihood; it never changes the predicted class.
"""

from __future__ import annotations

import numpy as np
import torch


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


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (LBFGS on log T)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())
