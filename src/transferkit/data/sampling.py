"""Epoch order and augmentation randomness as pure functions of (seed, epoch, position).

The training loader does not draw from any process-wide random stream: the order of an epoch
comes from a generator seeded with (seed, epoch), and each image carries its own augmentation
seed. So a run gives the same batches and the same augmented pixels with 0 or 8 loader
workers, and resuming in the middle of an epoch only needs (epoch, batches done).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from transferkit.core.distributed import Dist


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, augmentation seed) pairs for one epoch; `set_epoch` picks the epoch.

    With `weights`, indices are drawn with replacement in proportion to them (balanced
    sampling); otherwise the epoch is a permutation (`shuffle`) or the identity.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, weights: list[float] | None = None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.weights = torch.as_tensor(weights, dtype=torch.float64) if weights is not None else None
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Epoch number (0-based) and how many leading samples to skip (a mid-epoch resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        for position in range(self.skip, self.n):
            yield int(order[position]), int(seeds[position])


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with python, numpy and torch (CPU) seeded from `seed`, then restore the
    caller's streams: augmentation inside never disturbs the training loop's randomness.

    Only torch's CPU generator is seeded (the same stream `torch.manual_seed` gives it): torch.manual_seed
    also queues a seed for each lazily initialised device (CUDA, XPU) with the caller's formatted stack,
    which took 270 us of every image in a loader worker here, more than cropping it."""
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class StepBatches:
    """Batch sampler of one rank: micro-batches of (index, seed) keys, `accumulate` per optimizer step.

    Step k takes positions [k*B, (k+1)*B) of the epoch order (B = batch_size, the global batch);
    its images are split into `accumulate` contiguous parts and rank r takes every world-th key
    of each part. A last step smaller than 2 x world x accumulate (and than B) is dropped: BatchNorm
    needs two images per micro-batch. With one process that drops only a last batch of one.
    """

    def __init__(self, sampler: EpochSampler, batch_size: int, d: Dist = Dist(), accumulate: int = 1):
        self.sampler, self.batch_size, self.d, self.accumulate = sampler, batch_size, d, accumulate
        self.skip_steps = 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        """Epoch number (0-based) and optimizer steps already done in it (a mid-epoch resume)."""
        self.skip_steps = skip_steps
        self.sampler.set_epoch(epoch, skip=skip_steps * self.batch_size)

    def step_sizes(self) -> list[int]:
        """Images in each optimizer step of a whole epoch, across all ranks."""
        n, b = len(self.sampler), self.batch_size
        sizes = [min(b, n - start) for start in range(0, n, b)]
        if len(sizes) > 1 and sizes[-1] < min(b, 2 * self.d.world * self.accumulate):
            sizes.pop()
        return sizes

    def __len__(self) -> int:
        """Micro-batches in a whole epoch."""
        return len(self.step_sizes()) * self.accumulate

    def __iter__(self):
        keys = list(self.sampler)  # from position skip_steps * batch_size on
        sizes = self.step_sizes()[self.skip_steps :]
        start = 0
        for size in sizes:
            step = keys[start : start + size]
            start += size
            for part in np.array_split(np.arange(len(step)), self.accumulate):
                yield [step[i] for i in part[self.d.rank :: self.d.world]]
