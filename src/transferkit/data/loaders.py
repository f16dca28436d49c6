"""DataLoaders over a split: training loaders yield the micro-batches of whole optimizer steps (the same
images whatever the process count, see `sampling`), eval loaders this rank's shard in order.
"""

from __future__ import annotations

import signal

import numpy as np
import torch

from transferkit.core.config import TrainConfig
from transferkit.core.distributed import Dist
from transferkit.core.machine import pick_device
from transferkit.data.sampling import EpochSampler, StepBatches
from transferkit.data.sources import Data, ImageDataset


def read_images(
    data: Data,
    split: str,
    transform,
    config: TrainConfig,
    images: np.ndarray | None = None,
    min_side: int | None = None,
) -> ImageDataset:
    """A split's images, from the files or from `images` (its decoded-image cache); `min_side`: see
    open_image."""
    return ImageDataset(data, split, transform, config.in_chans, images, min_side)


def make_loader(
    data: Data,
    split: str,
    transform,
    config: TrainConfig,
    shuffle: bool = False,
    images: np.ndarray | None = None,
    min_side: int | None = None,
    d: Dist = Dist(),
    reader=read_images,
):
    """Training (`shuffle`) loaders yield this rank's micro-batches from a StepBatches over an
    EpochSampler: call `loader.batch_sampler.set_epoch(e)` before each epoch. Eval loaders read
    this rank's shard of the split in order. `reader(data, split, transform, config, images, min_side)`
    makes the dataset (a task's `dataset`); `images`: the split's decoded-image cache."""
    dataset = reader(data, split, transform, config, images, min_side)
    common = {
        "num_workers": config.workers,
        "generator": torch.Generator().manual_seed(config.seed),
        "pin_memory": pick_device(config.device).type == "cuda",
        "persistent_workers": config.workers > 0,
        "worker_init_fn": _init_worker,
        "collate_fn": getattr(dataset, "collate", None),
    }
    if not shuffle:
        return torch.utils.data.DataLoader(
            dataset, batch_size=config.batch_size, sampler=d.shard(len(dataset)), **common
        )
    weights = None
    if config.sampler == "balanced":
        counts = data.counts(split)
        weights = [1.0 / counts[label] for _, label in dataset.samples]
    sampler = EpochSampler(len(dataset), config.seed, shuffle=True, weights=weights)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(sampler, config.batch_size, d, config.accumulate), **common
    )


def _init_worker(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which stops cleanly (see preempt)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
