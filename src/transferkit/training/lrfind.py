"""LR range test (Smith 2015; fastai's lr_find): raise the LR exponentially for a few steps,
watch the smoothed training loss, and suggest an LR.

Suggestion rule: the LR at the minimum of the smoothed loss, divided by 10 (fastai's
'minimum' rule). The model's weights are restored afterwards.

The sweep's length follows the data: `PASSES` passes over the training batches, within
[`MIN_STEPS`, `MAX_STEPS`] (fastai sweeps 100 batches; on a small set that is dozens of passes over
the same images, minutes on a CPU, and the loss then measures memorising them as much as the LR).
`transferkit lr-find` writes its plot and lr_find.json into a folder of its own under runs/.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from transferkit.core.errors import UserError
from transferkit.core.files import write_text
from transferkit.core.progress import Reporter
from transferkit.training.optim import make_optimizer
from transferkit.training.rundir import default_name, make_run_dir
from transferkit.training.strategy import Phase, apply_phase, set_train_mode

RULE = "LR at the minimum of the smoothed loss / 10"
PASSES = 3
"""Passes over the training batches a sweep makes by default."""
MIN_STEPS, MAX_STEPS = 10, 100
"""A sweep's length in batches at least (a shorter curve shows no minimum) and at most (fastai's length)."""


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

    def save(self, folder: Path) -> Path:
        """folder/lr_find.png and folder/lr_find.json (the sweep's LRs, losses and suggestion); the JSON's path."""
        self.plot(folder / "lr_find.png")
        out = folder / "lr_find.json"
        write_text(out, json.dumps({**asdict(self), "rule": RULE, "steps": len(self.lrs)}, indent=1))
        return out


def sweep_steps(batches: int) -> int:
    """The default sweep length for a training split of `batches` batches (see the module docstring)."""
    return min(MAX_STEPS, max(MIN_STEPS, PASSES * batches))


def lr_find(
    model,
    groups: list[list[str]],
    phase: Phase,
    loader,
    loss_fn,
    config,
    rt,
    steps: int | None = None,
    start: float = 1e-7,
    end: float = 1.0,
    move=None,
    report: Reporter | None = None,
) -> LRFindResult:
    """Sweep the head LR from `start` to `end` over `steps` batches (default `sweep_steps` of the loader's
    length) of `phase`'s trainable parameters (`rt`: the run's Runtime, which moves the loader's batches
    to the device; or `move`, a task's). `report` shows the sweep's progress."""
    steps = steps or sweep_steps(len(loader))
    report = report or Reporter(silent=True)
    report.start_epoch("LR sweep", steps)  # a bar while the report shows bars (see `lr_find_run`)
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
        report.advance(1)
        if (step + 1) % max(1, steps // 4) == 0 and step + 1 < steps:  # a few lines for logs and --quiet
            report.info(f"[transferkit] LR sweep {step + 1}/{steps}: lr {lr:.1e}, smoothed loss {smoothed[-1]:.4f}")
        if not math.isfinite(value) or (step > 10 and smoothed[-1] > 4 * min(smoothed)):
            report.info(f"[transferkit] LR sweep stopped at step {step + 1}/{steps}, lr {lr:.1e}: the loss diverged")
            break  # diverged: the rest of the sweep says nothing
    model.load_state_dict(saved)
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    return LRFindResult(lrs, losses, smoothed, suggestion=lrs[best] / 10)


def find_lr(
    config, steps: int | None = None, start: float = 1e-7, end: float = 1.0, report: Reporter | None = None
) -> LRFindResult:
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
        report=report,
    )


def lr_find_run(
    config, steps: int | None = None, start: float = 1e-7, end: float = 1.0, report: Reporter | None = None
) -> tuple[LRFindResult, Path]:
    """`transferkit lr-find`: the sweep of `find_lr`, then its plot and lr_find.json in a new folder
    runs_dir/lr-find-DATA-STRATEGY (-2, -3... when taken), made only once the sweep has finished."""
    if steps is not None and steps < MIN_STEPS:
        raise UserError(f"--steps must be at least {MIN_STEPS} (a shorter sweep shows no minimum); got {steps}.")
    if not 0 < start < end:
        raise UserError(f"--start must be above 0 and below --end; got --start {start:g} and --end {end:g}.")
    report = report or Reporter(silent=True)
    report.start(1)
    try:
        result = find_lr(config, steps=steps, start=start, end=end, report=report)
    finally:
        report.close()
    folder = make_run_dir(Path(config.runs_dir), f"lr-find-{default_name(config)}", auto=True, overwrite=False)
    result.save(folder)
    report.info(
        f"[transferkit] LR sweep of {len(result.lrs)} steps: suggested lr {result.suggestion:.2e} ({RULE}); "
        f"wrote {folder / 'lr_find.png'} and {folder / 'lr_find.json'}"
    )
    return result, folder
