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
    caller's streams: augmentation inside never disturbs the training loop's randomness."""
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
