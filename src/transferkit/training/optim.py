"""Optimizer and LR schedule for one phase."""

from __future__ import annotations

import math

import torch

from transferkit.core.config import TrainConfig
from transferkit.training.strategy import Phase, param_groups


def make_optimizer(
    model,
    groups: list[list[str]],
    phase: Phase,
    config: TrainConfig,
    lr: float | None = None,
    extra: list | None = None,
) -> torch.optim.Optimizer:
    """A fresh optimizer over exactly the parameters this phase trains (head LR = `lr` or config.lr);
    `extra`: an extra loss's own parameters (a domain discriminator), trained at the head's LR."""
    pg = param_groups(model, groups, phase, lr if lr is not None else config.lr, config.weight_decay)
    if extra:
        pg.append({"params": list(extra), "lr": pg[0]["lr"], "weight_decay": config.weight_decay})
    if config.l2sp:  # L2-SP replaces decay toward zero on the backbone (the head keeps its decay)
        head = {id(p) for p in model.head.parameters()}
        for group in pg:
            if not any(id(p) in head for p in group["params"]):
                group["weight_decay"] = 0.0
    if config.optimizer == "sgd":
        return torch.optim.SGD(pg, lr=pg[0]["lr"], momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(pg, lr=pg[0]["lr"])


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ~0 to each group's LR, then cosine decay to 0 at `total_steps`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
