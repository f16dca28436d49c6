"""The objective: what a training step computes on one micro-batch, as one module for DDP to wrap.

The loop (`epoch.train_one_epoch`) calls `objective(inputs, targets)` and gets a `StepOutput`: the loss
to back-propagate, the number of samples it averages over, and counts whose epoch means go to the
metrics row (`train_<name>`). It never looks at logits, labels or boxes: those belong to the objective,
which a task supplies (`task.Task.objective`). A detector's objective returns the sum of its loss
dict; classification's is `Classification` below.

Terms add to the task's loss: L2-SP (`regularize.L2SP`) and domain adaptation (`adapt.Adaptation`) are
terms. A term may bring rows of its own (adaptation's unlabelled target images) that run in the same
forward as the batch, so BatchNorm normalises the mixed batch; it then sees the pre-logit features and
logits of every row, taken from the model explicitly (`forward_head(pre_logits=True)`), not by hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class StepOutput:
    """One micro-batch's result."""

    loss: torch.Tensor
    """The mean loss over the micro-batch's samples; what backward() sees."""
    size: int
    """Samples in the micro-batch."""
    counts: dict[str, torch.Tensor]
    """Sums over its samples (e.g. correct predictions); the epoch row holds their means as train_<name>."""


@dataclass
class Seen:
    """What a classifier's training forward computed, for the terms: every row's pre-logit features (the
    head's input to its last linear layer) and logits; the first `size` rows are the batch's."""

    features: torch.Tensor
    logits: torch.Tensor
    size: int


class Term(Protocol):
    """A loss added to the task's loss on every micro-batch. A term that is an nn.Module is part of the
    objective: its parameters train at the head's LR and DDP averages their gradients."""

    def start_epoch(self, steps_done: int) -> None:
        """An epoch starts (or resumes after `steps_done` optimizer steps): rewind its own batches."""

    def inputs(self) -> torch.Tensor | None:
        """Rows of its own, on the device, to run in the batch's forward after the batch's rows; or None."""

    def __call__(self, model: nn.Module, seen: Seen) -> torch.Tensor:
        """The term's value under the step's autocast (weighted: it is added as it is)."""

    def parameters(self):
        """Its trainable parameters (none for a plain penalty)."""

    def epoch_metrics(self, model: nn.Module) -> dict:
        """Values for the epoch's metrics row (after validation)."""

    def state_dict(self) -> dict:
        """What last.ckpt keeps of it, for an exact resume."""

    def load_state_dict(self, state: dict) -> None:
        """Take back what state_dict gave."""


ENCODE = ("features", "frozen", "full")
"""What a phase runs below the head: cached features as they are, a frozen backbone without a backward
graph, or the backbone that trains."""


class Classification(nn.Module):
    """Cross-entropy on labelled batches (class weights, label smoothing; mixup's soft targets when a
    `mixer` is given), plus the terms. `encode` (one of ENCODE) and `move` (a batch's inputs to the
    device) are set for each phase before it is wrapped."""

    def __init__(self, model: nn.Module, criterion: nn.Module, mixer=None, terms: tuple = ()):
        super().__init__()
        self.model, self.criterion, self.mixer = model, criterion, mixer
        self.terms = list(terms)
        self.term_modules = nn.ModuleList(term for term in terms if isinstance(term, nn.Module))
        self.encode: str = "full"
        self.move: Callable = lambda inputs: inputs

    def forward(self, inputs, labels: torch.Tensor) -> StepOutput:
        inputs = self.move(inputs)
        labels = labels.to(inputs.device, non_blocking=True)
        targets = labels
        if self.mixer is not None and len(labels) % 2 == 0:  # timm's Mixup pairs images: needs an even batch
            inputs, targets = self.mixer(inputs, labels)
        elif self.mixer is not None:
            targets = F.one_hot(labels, self.mixer.num_classes).float()
        own_rows = [rows for rows in (term.inputs() for term in self.terms) if rows is not None]
        if len(own_rows) > 1:
            raise ValueError("At most one term may bring rows of its own to the forward.")
        features = self.model.forward_head(self.features(torch.cat([inputs, *own_rows])), pre_logits=True)
        all_logits = self.model.head[-1](features)
        logits = all_logits[: len(labels)]
        if self.mixer is None:
            loss = self.criterion(logits.float(), targets)
        else:
            loss = soft_target_cross_entropy(logits.float(), targets)
        seen = Seen(features, all_logits, len(labels))
        for term in self.terms:
            loss = loss + term(self.model, seen)
        return StepOutput(loss, len(labels), {"accuracy": (logits.argmax(1) == labels).sum()})

    def start_epoch(self, steps_done: int) -> None:
        """An epoch starts, or resumes after `steps_done` optimizer steps: the terms rewind their batches."""
        for term in self.terms:
            term.start_epoch(steps_done)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The head's input: cached features as they are, or the backbone's (without a graph when frozen)."""
        if self.encode == "features":
            return inputs
        if self.encode == "frozen":
            with torch.no_grad():
                return self.model.backbone(inputs)
        return self.model.backbone(inputs)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup's; timm's Mixup applies the label smoothing itself)."""
    return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()


def classification(
    model: nn.Module,
    num_classes: int,
    class_counts: list[int] | None = None,
    label_smoothing: float = 0.0,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    terms: tuple = (),
) -> Classification:
    """Classification's objective for `model`: inverse-frequency class weights (mean 1 over the training
    images) when `class_counts` is given, label smoothing, and mixup/cutmix (timm's Mixup) when asked."""
    weight = None
    if class_counts is not None:
        n = torch.tensor(class_counts, dtype=torch.float32)
        weight = (n.sum() / (len(n) * n)).to(next(model.parameters()).device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    mixer = None
    if mixup or cutmix:
        from timm.data import Mixup

        mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
    return Classification(model, criterion, mixer, terms)
