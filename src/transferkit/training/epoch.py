"""One epoch of training: micro-batches grouped into optimizer steps, the NaN/Inf guard, the data-wait
clock, an extra loss term on batches of its own (the seam for domain adaptation), and the stop with a
clear message when the GPU runs out of memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from transferkit.core.config import TrainConfig
from transferkit.core.distributed import Dist, loss_scale
from transferkit.core.errors import UserError
from transferkit.core.progress import Reporter
from transferkit.data.sources import Data
from transferkit.models.runtime import Runtime
from transferkit.training.regularize import L2SP
from transferkit.training.strategy import Phase, set_train_mode


@contextlib.contextmanager
def out_of_memory_stops(config: TrainConfig, run_dir: Path, d: Dist, last_step, save_last, optimizer):
    """Turn the GPU running out of memory into a UserError that says what to change. One process saves
    last.ckpt at `last_step()` (the position after the last whole step) first, so `--resume` with more
    accumulation goes on."""
    try:
        yield
        return
    except torch.OutOfMemoryError as err:  # leave the except block: its traceback holds the step's tensors
        first_line = str(err).splitlines()[0]
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    micro = config.batch_size // (config.accumulate * d.world)
    saved = not d.on  # ranks cannot agree on a position once one has failed
    if saved:
        save_last(last_step())
    where = (
        f"saved {run_dir / 'last.ckpt'} at step {last_step().step} of this epoch; resume with the same global "
        f"batch and half the memory per step: `transferkit train --resume {run_dir} --accumulate "
        f"{config.accumulate * 2}`"
        if saved
        else f"resume {run_dir} from its last checkpoint with --accumulate {config.accumulate * 2}"
    )
    raise UserError(
        f"Out of GPU memory training micro-batches of {micro} images ({first_line}). {where}; or start "
        f"a new run with a smaller --batch-size (e.g. {max(1, config.batch_size // 2)})."
    ) from None


@dataclass
class EpochSums:
    """Running totals of the epoch in progress; saved in mid-epoch checkpoints."""

    step: int = 0
    """Batches done."""
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    data_s: float = 0.0
    """Of `seconds`, the time spent waiting for the loader's next batch (every step waits for its loss)."""


class Guard:
    """The NaN/Inf policy for one epoch: stop with the batch's files named, or skip up to a limit."""

    def __init__(self, config: TrainConfig, data: Data, epoch: int, skipped: int):
        self.config, self.data, self.epoch, self.skipped = config, data, epoch, skipped

    def check(self, what: str, value: float, step: int, indices: torch.Tensor) -> bool:
        """True when `value` is finite; False to skip the step; raises UserError to stop."""
        if math.isfinite(value):
            return True
        files = [self.data.splits["train"][i][0] for i in indices.tolist()]
        where = (
            f"{what} is {value} at epoch {self.epoch + 1}, step {step} (batch of {len(files)}: "
            f"{', '.join(files[:8])}{', ...' if len(files) > 8 else ''})"
        )
        if self.config.nan_policy == "skip" and self.skipped < self.config.nan_skip_limit:
            self.skipped += 1
            return False
        limit = (
            f" after skipping {self.skipped} such steps (nan_skip_limit {self.config.nan_skip_limit})"
            if self.config.nan_policy == "skip"
            else ""
        )
        raise UserError(
            f"Training stopped{limit}: {where}. Lower --lr, set --grad-clip 1.0, check those images, "
            "or pass --nan-policy skip."
        )


class StepModel(nn.Module):
    """What a training step runs, as one module for DDP to wrap: the head on cached features
    ("features"), the head on a frozen backbone's features without a backward graph below it
    ("frozen"), or the whole model ("full")."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "full":
            return self.model(x)
        if self.mode == "frozen":
            with torch.no_grad():
                x = self.model.backbone(x)
        return self.model.head(x)


class ExtraLoss(Protocol):
    """A term added to every micro-batch's loss, computed on batches of its own loader: domain adaptation's
    unlabelled target images, for one."""

    def batches(self) -> Iterator:
        """As many batches as asked for (cycle a loader)."""

    def join(self, inputs: torch.Tensor, batch) -> torch.Tensor:
        """The micro-batch's inputs as the model should see them: `inputs` itself, or with its own batch's
        inputs appended (one forward for both, so BatchNorm sees one mixed batch, as in training with both)."""

    def term(self, model: nn.Module, batch, rt: Runtime, outputs: torch.Tensor) -> torch.Tensor:
        """The term for one batch, under the step's autocast; `outputs`: the model's outputs on the rows that
        `join` appended (empty when it appended none)."""

    def parameters(self) -> list[nn.Parameter]:
        """Its own trainable parameters (they join the optimizer at the head's LR), or []."""

    def epoch_metrics(self, model: nn.Module) -> dict:
        """Values for the epoch's metrics row (after validation)."""

    def state_dict(self) -> dict:
        """What last.ckpt keeps of it, for an exact resume."""

    def load_state_dict(self, state: dict) -> None:
        """Take back what state_dict gave."""


def train_one_epoch(
    net: nn.Module,
    model: nn.Module,
    loader,
    optimizer,
    scheduler,
    loss_fn,
    phase: Phase,
    rt: Runtime,
    report: Reporter,
    description: str,
    sums: EpochSums,
    guard: Guard,
    mixer=None,
    l2sp: L2SP | None = None,
    after_step=None,
    d: Dist = Dist(),
    extra: ExtraLoss | None = None,
    move=None,
) -> tuple[EpochSums, int]:
    """One pass over the training data (from optimizer step `sums.step` on); returns the epoch's totals
    (over all ranks) and the run's count of skipped non-finite steps. `net` is the StepModel (DDP-wrapped
    with several processes); `loader.batch_sampler` is the StepBatches that groups its micro-batches into
    steps. `after_step(sums, step_loss)` runs after every step; `extra` adds its term to every loss;
    `move` takes a batch's inputs to the device (default `rt.batch`, for image tensors)."""
    set_train_mode(model, phase)
    move = move or rt.batch
    extra_batches = extra.batches() if extra is not None else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sizes, accumulate = loader.batch_sampler.step_sizes(), loader.batch_sampler.accumulate
    tick = time.perf_counter() - sums.seconds
    report.start_epoch(description, len(sizes))
    report.advance(sums.step)
    micro, step_ok, waited = 0, True, [sums.data_s]
    for inputs, labels, indices in timed(loader, waited):
        inputs, labels = move(inputs), labels.to(rt.device, non_blocking=True)
        targets = labels
        if mixer is not None and len(labels) % 2 == 0:  # timm's Mixup pairs images: needs an even batch
            inputs, targets = mixer(inputs, labels)
        elif mixer is not None:
            targets = torch.nn.functional.one_hot(labels, mixer.num_classes).float()
        if micro == 0:
            optimizer.zero_grad(set_to_none=True)
            step_ok, start = True, (sums.loss_sum, sums.seen)
        last = micro == accumulate - 1
        step = sums.step + 1
        # DDP averages gradients at the step's last micro-batch only
        extra_batch = next(extra_batches) if extra is not None else None
        with contextlib.nullcontext() if last or not d.on else net.no_sync():
            with rt.autocast():
                logits = net(extra.join(inputs, extra_batch) if extra is not None else inputs)
                logits, extra_outputs = logits[: len(labels)], logits[len(labels) :]
                loss = loss_fn(logits.float(), targets)
                if l2sp is not None:
                    loss = loss + l2sp.penalty(model.backbone)
                if extra is not None:
                    loss = loss + extra.term(model, extra_batch, rt, extra_outputs)
            value = loss.item()
            finite = math.isfinite(value)
            # one all-reduce: the micro-batch's loss, images, hits and non-finite count over the ranks
            loss_sum, seen, correct, bad = d.sum(
                [
                    value * len(labels) if finite else 0.0,
                    len(labels),
                    (logits.argmax(1) == labels).sum().item(),
                    0 if finite else 1,
                ]
            )
            step_ok = step_ok and guard.check("loss", math.nan if bad else loss_sum / seen, step, indices)
            if step_ok:
                (loss * loss_scale(len(labels), sizes[sums.step], d)).backward()
        micro += 1
        sums = replace(
            sums, loss_sum=sums.loss_sum + loss_sum, correct=sums.correct + int(correct), seen=sums.seen + int(seen)
        )
        if not last:
            continue
        if step_ok:
            norm = torch.nn.utils.clip_grad_norm_(params, guard.config.grad_clip or math.inf)
            if guard.check("gradient norm", norm.item(), step, indices):
                optimizer.step()
        scheduler.step()
        micro = 0
        sums = replace(sums, step=step, seconds=time.perf_counter() - tick, data_s=waited[0])
        report.batch(sums.loss_sum / sums.seen, sums.correct / sums.seen, sums.seen / sums.seconds)
        if after_step is not None:
            after_step(sums, (sums.loss_sum - start[0]) / max(sums.seen - start[1], 1))
    return sums, guard.skipped


def timed(loader, waited: list[float]):
    """Iterate `loader`, adding the seconds spent waiting for each item to `waited[0]`."""
    items = iter(loader)
    while True:
        tick = time.perf_counter()
        item = next(items, None)
        waited[0] += time.perf_counter() - tick
        if item is None:
            return
        yield item
