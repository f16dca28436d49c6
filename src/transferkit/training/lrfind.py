"""LR range test (Smith 2015; fastai's lr_find): raise the LR exponentially for a few steps,
watch the smoothed training loss, and suggest an LR.

Suggestion rule: the LR at the minimum of the smoothed loss, divided by 10 (fastai's
'minimum' rule). The model's weights are restored afterwards.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from transferkit.training.optim import make_optimizer
from transferkit.training.strategy import Phase, apply_phase, set_train_mode

RULE = "LR at the minimum of the smoothed loss / 10"


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses, alpha=0.3, label="loss")
        ax.plot(self.lrs, self.smoothed, label="smoothed loss")
        ax.axvline(self.suggestion, color="red", linestyle="--", label=f"suggested {self.suggestion:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("head learning rate")
        ax.set_ylabel("training loss")
        ax.set_title(f"LR finder ({RULE})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def lr_find(
    model,
    groups: list[list[str]],
    phase: Phase,
    loader,
    loss_fn,
    config,
    rt,
    steps: int = 100,
    start: float = 1e-7,
    end: float = 1.0,
    move=None,
) -> LRFindResult:
    """Sweep the head LR from `start` to `end` over `steps` batches of `phase`'s trainable parameters
    (`rt`: the run's Runtime, which moves the loader's batches to the device; or `move`, a task's)."""
    beta = min(0.98, 1 - 4 / steps)  # EMA smoothing; shorter sweeps need less lag
    saved = copy.deepcopy(model.state_dict())
    apply_phase(model, groups, phase)
    set_train_mode(model, phase)
    optimizer = make_optimizer(model, groups, phase, config, lr=start)
    relative = [g["lr"] / start for g in optimizer.param_groups]
    gamma = (end / start) ** (1.0 / max(steps - 1, 1))
    lrs, losses, smoothed = [], [], []
    average = 0.0
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step, (images, labels, _) in zip(range(steps), batches):
        lr = start * gamma**step
        for group, rel in zip(optimizer.param_groups, relative):
            group["lr"] = lr * rel
        images, labels = (move or rt.batch)(images), labels.to(rt.device)
        loss = loss_fn(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        average = beta * average + (1 - beta) * value
        lrs.append(lr)
        losses.append(value)
        smoothed.append(average / (1 - beta ** (step + 1)))
        if not math.isfinite(value) or (step > 10 and smoothed[-1] > 4 * min(smoothed)):
            break  # diverged: the rest of the sweep says nothing
    model.load_state_dict(saved)
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    return LRFindResult(lrs, losses, smoothed, suggestion=lrs[best] / 10)


def find_lr(config, steps: int = 100, start: float = 1e-7, end: float = 1.0) -> LRFindResult:
    """The LR range test for a config, on its training split, without writing a run."""
    from torch import nn

    from transferkit.core.machine import default_workers, pick_device, seed_everything
    from transferkit.data.loaders import make_loader
    from transferkit.data.sources import config_data
    from transferkit.models.classifier import layer_groups
    from transferkit.models.runtime import Runtime
    from transferkit.models.task import task_for
    from transferkit.training.strategy import make_plan

    seed_everything(config.seed)
    device = pick_device(config.device)
    data = config_data(config)
    task = task_for(data)
    model, _, prep = task.build(config, len(data.classes), data.default_img_size)
    config = config.replace(
        lr=1e-3,
        lr_min=None,
        workers=config.workers
        if config.workers is not None
        else default_workers(data.arrays is not None, device.type == "cuda"),
    )
    groups = layer_groups(model.backbone)
    rt = Runtime(device, normalize=prep.mean_std)
    loader = make_loader(
        data,
        "train",
        task.transform(prep, config, True, rt.normalizes_on_device),
        config,
        shuffle=True,
        min_side=prep.resize,
        reader=task.dataset,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return lr_find(
        model.to(device),
        groups,
        make_plan(config, len(groups))[0],
        loader,
        loss_fn,
        config,
        rt,
        steps=steps,
        start=start,
        end=end,
        move=functools.partial(task.move, rt=rt),
    )
