"""One epoch of training: micro-batches grouped into optimizer steps, the NaN/Inf guard, the data-wait
clock, and the stop with a clear message when the GPU runs out of memory. What a micro-batch computes is
the objective's (`models.objective`): the loop sees a loss, a sample count and named counts.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from transferkit.core.config import TrainConfig
from transferkit.core.distributed import Dist, loss_scale
from transferkit.core.errors import UserError
from transferkit.core.progress import Reporter
from transferkit.data.sources import Data
from transferkit.models.runtime import Runtime


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
    """Optimizer steps done."""
    loss_sum: float = 0.0
    seen: int = 0
    """Samples done."""
    counts: dict[str, float] = field(default_factory=dict)
    """The objective's counts summed (e.g. accuracy: correct predictions); see `models.objective`."""
    seconds: float = 0.0
    data_s: float = 0.0
    """Of `seconds`, the time spent waiting for the loader's next batch (every step waits for its loss)."""

    @classmethod
    def from_dict(cls, saved: dict) -> EpochSums:
        """From last.ckpt; one written before objectives kept classification's hits as `correct`."""
        saved = dict(saved)
        if "correct" in saved:
            saved["counts"] = {"accuracy": float(saved.pop("correct"))}
        return cls(**saved)

    def add(self, loss_sum: float, seen: float, counts: dict[str, float]) -> EpochSums:
        added = {name: self.counts.get(name, 0.0) + value for name, value in counts.items()}
        return replace(self, loss_sum=self.loss_sum + loss_sum, seen=self.seen + int(seen), counts=added)

    def means(self) -> dict[str, float]:
        """Each count per sample (accuracy for classification's hits)."""
        return {name: value / max(self.seen, 1) for name, value in self.counts.items()}


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


@dataclass
class Update:
    """How a phase's optimizer steps: the optimizer, its LR schedule, the gradient-norm clip."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    grad_clip: float | None = None


@dataclass
class EpochContext:
    """What an epoch runs under and reports to: the runtime (autocast), the process group, the NaN
    guard, the progress display, and `after_step(sums, step_loss)`, called after every step."""

    rt: Runtime
    d: Dist
    guard: Guard
    report: Reporter
    after_step: Callable[[EpochSums, float], None] | None = None


def train_one_epoch(objective: nn.Module, loader, update: Update, sums: EpochSums, context: EpochContext) -> EpochSums:
    """One pass over the training data (from optimizer step `sums.step` on); returns the epoch's totals
    over all ranks. `objective(inputs, targets)` gives each micro-batch's `StepOutput` (DDP-wrapped with
    several processes); `loader.batch_sampler` is the StepBatches that groups micro-batches into steps."""
    rt, d, guard = context.rt, context.d, context.guard
    params = [p for group in update.optimizer.param_groups for p in group["params"]]
    sizes, accumulate = loader.batch_sampler.step_sizes(), loader.batch_sampler.accumulate
    tick = time.perf_counter() - sums.seconds
    micro, step_ok, waited = 0, True, [sums.data_s]
    for inputs, targets, indices in timed(loader, waited):
        if micro == 0:
            update.optimizer.zero_grad(set_to_none=True)
            step_ok, start = True, (sums.loss_sum, sums.seen)
        last = micro == accumulate - 1
        step = sums.step + 1
        # DDP averages gradients at the step's last micro-batch only
        with contextlib.nullcontext() if last or not d.on else objective.no_sync():
            with rt.autocast():
                out = objective(inputs, targets)
            value = out.loss.item()
            finite = math.isfinite(value)
            names = sorted(out.counts)
            counts = torch.stack([out.counts[name] for name in names]).tolist() if names else []
            # one all-reduce: the micro-batch's loss, samples, non-finite count and counts over the ranks
            loss_sum, seen, bad, *counts = d.sum([value * out.size if finite else 0.0, out.size, 1 - finite, *counts])
            step_ok = step_ok and guard.check("loss", math.nan if bad else loss_sum / seen, step, indices)
            if step_ok:
                (out.loss * loss_scale(out.size, sizes[sums.step], d)).backward()
        micro += 1
        sums = sums.add(loss_sum, seen, dict(zip(names, counts)))
        if not last:
            continue
        if step_ok:
            norm = torch.nn.utils.clip_grad_norm_(params, update.grad_clip or math.inf)
            if guard.check("gradient norm", norm.item(), step, indices):
                update.optimizer.step()
        update.scheduler.step()
        micro = 0
        sums = replace(sums, step=step, seconds=time.perf_counter() - tick, data_s=waited[0])
        context.report.batch(sums.loss_sum / sums.seen, sums.means(), sums.seen / sums.seconds)
        if context.after_step is not None:
            context.after_step(sums, (sums.loss_sum - start[0]) / max(sums.seen - start[1], 1))
    return sums


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
