"""Regularizers toward the pretrained solution.

L2-SP (Li, Grandvalet & Davoine 2018; TLlib's `SPRegularization`): penalise the squared
distance of the backbone weights from their pretrained values, not from zero, so that
fine-tuning keeps what pretraining learned. Plain weight decay on the backbone would pull
toward zero instead, so it is switched off for the backbone when L2-SP is on.
"""

from __future__ import annotations

import torch
from torch import nn


class L2SP:
    """alpha/2 x sum ||w - w_pretrained||^2 over the backbone parameters that train; a term of the
    objective (`models.objective.Term`) with no rows, parameters or state of its own."""

    def __init__(self, backbone: nn.Module, alpha: float):
        self.alpha = alpha
        self.reference = {name: p.detach().clone() for name, p in backbone.named_parameters()}

    def penalty(self, backbone: nn.Module) -> torch.Tensor:
        terms = [((p - self.reference[name]) ** 2).sum() for name, p in backbone.named_parameters() if p.requires_grad]
        if not terms:
            return torch.zeros(())
        return 0.5 * self.alpha * torch.stack(terms).sum()

    def start_epoch(self, steps_done: int) -> None:
        pass

    def inputs(self) -> None:
        return None

    def __call__(self, model: nn.Module, seen) -> torch.Tensor:
        return self.penalty(model.backbone)

    def parameters(self) -> list:
        return []

    def epoch_metrics(self, model: nn.Module) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}  # the reference is the pretrained weights, taken again before a resume loads the model

    def load_state_dict(self, state: dict) -> None:
        pass
