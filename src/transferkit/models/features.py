"""Feature cache: a frozen backbone's features are computed once, not once per epoch.

When a phase trains only the head on a backbone in eval mode (linear-probe, the probe phase
of lp-ft, the first phase of gradual), the backbone is a fixed function: its features for an
image never change. They are extracted once (eval mode, no grad, batched), stored as a .npy
under the cache folder and memory-mapped, so runs, strategies and `compare` arms reuse them.

The cache key covers everything the features depend on: the backbone's weights (a digest of
its state_dict), the preprocessing and transform, the channel mode, and the data (each file's
path, size and mtime, or the bytes of in-memory images). Change any of them and the key changes.
With `feature_views` K > 0, K augmented views per image are cached (the training transform
under seeds of (seed, view, image)) and each step draws one of them per image.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from transferkit.core.config import TrainConfig
from transferkit.core.distributed import Dist
from transferkit.core.machine import cache_root
from transferkit.data.cachefiles import build_cache, data_digest, open_cache
from transferkit.data.loaders import read_images
from transferkit.data.sampling import EpochSampler
from transferkit.data.sources import Data
from transferkit.models.fuse import fold_batchnorm
from transferkit.models.runtime import Runtime


def backbone_digest(backbone: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in backbone.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_features(
    backbone: torch.nn.Module,
    data: Data,
    split: str,
    transform,
    transform_id: dict,
    config,
    rt: Runtime,
    report,
    views: int = 0,
    min_side: int | None = None,
    d: Dist = Dist(),
    stats: dict | None = None,
    reader=None,
) -> np.ndarray:
    """Features of `split` as an array (N, D), or (views, N, D) with augmented views; computed on a miss,
    each rank extracting its share. `min_side`: the decode hint of open_image (part of `transform_id`);
    `stats`: its "feature_cache_hits" or "feature_cache_misses" count goes up by one; `reader`: the task's
    `dataset` (default: images)."""
    key_fields = {
        "backbone": backbone_digest(backbone),
        "data": data_digest(data, split),
        "split": split,
        "transform": transform_id,
        "in_chans": config.in_chans,
        "views": views,
        "seed": config.seed if views else None,
        "precision": rt.precision["infer"],
    }
    key = hashlib.blake2b(json.dumps(key_fields, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = cache_root(config) / "features" / f"{key}.npy"
    found = open_cache(path, report.info) if d.main else None
    hit = d.gather(found is not None)[0]  # rank 0 decides for all
    if stats is not None:
        key = "feature_cache_hits" if hit else "feature_cache_misses"
        stats[key] = stats.get(key, 0) + 1
    if hit:
        return found if d.main else np.load(path, mmap_mode="r")
    n = len(data.splits[split])
    rows = d.shard(n)
    mine = [
        extract(backbone, data, split, transform, config, rt, report, view, min_side, rows, reader)
        for view in (range(views) if views else [None])
    ]
    dim = next(x for x in d.gather(mine[0].shape[-1] if rows else None) if x is not None)

    def fill(array: np.ndarray, rows: list[int]) -> None:
        for view, part in enumerate(mine):
            (array[view] if views else array)[rows] = part

    return build_cache(
        d, path, (views, n, dim) if views else (n, dim), np.float32, fill, key_fields, report.info, rows=n
    )


@torch.inference_mode()
def extract(
    backbone: torch.nn.Module,
    data: Data,
    split: str,
    transform,
    config,
    rt: Runtime,
    report,
    view: int | None,
    min_side: int | None,
    rows: list[int],
    reader=None,
) -> np.ndarray:
    """One pass of the backbone over `rows` of a split in eval mode; `view` seeds the augmentation of
    each image."""
    dataset = (reader or read_images)(data, split, transform, config, min_side=min_side)
    sampler = rows
    if view is not None:  # in order, each image under its own seed for this view
        seeded = EpochSampler(len(dataset), config.seed + 7919, shuffle=False)
        seeded.set_epoch(view)
        keys = list(seeded)
        sampler = [keys[i] for i in rows]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        generator=torch.Generator(),
        collate_fn=getattr(dataset, "collate", None),
    )
    # (its own generator: a cache miss must not draw from the run's random stream)
    was_training = backbone.training
    backbone.eval()  # fold_batchnorm hands back the backbone itself where folding is off by more than its rtol
    net = None
    out = []
    report.start_epoch(f"features {split}" + (f" view {view + 1}" if view is not None else ""), len(loader))
    for images, _, _ in loader:
        images = rt.batch(images)
        if net is None:  # BN folded into the convs: measured faster (README, Speed)
            net = fold_batchnorm(backbone, images[:2])
        with rt.autocast("infer"):
            out.append(net(images).float().cpu())
        report.advance(1)
    backbone.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


class FeatureLoader:
    """Batches of (features, labels, indices), like the image loader: `batch_sampler` yields lists of keys
    (an index, or an (index, seed) pair from a StepBatches, which then drives the epochs)."""

    def __init__(self, features: np.ndarray, labels: list[int], batches):
        self.features, self.labels, self.batch_sampler = features, torch.as_tensor(labels), batches

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for batch in self.batch_sampler:
            keys = [k if isinstance(k, tuple) else (k, 0) for k in batch]
            index = np.array([i for i, _ in keys], dtype=np.int64)
            if self.features.ndim == 3:  # augmented views: each image's seed picks one
                rows = self.features[np.array([s % self.features.shape[0] for _, s in keys]), index]
            else:
                rows = self.features[index]
            yield torch.from_numpy(np.array(rows, dtype=np.float32)), self.labels[index], torch.from_numpy(index)


def feature_loaders(
    model,
    data: Data,
    prep,
    config: TrainConfig,
    rt: Runtime,
    report,
    image_loader,
    task,
    d: Dist = Dist(),
    stats: dict | None = None,
):
    """(train, val) loaders over cached backbone features, in the sample loader's batch order; the ranks
    extract their shares of the features together. `task` makes the transforms and datasets (see
    `models.task`); `stats`: cache hits and misses (see cached_features)."""
    labels = {s: [data.classes.index(label) for _, label in data.splits[s]] for s in ("train", "val")}
    on_device = rt.normalizes_on_device
    plain, evaluated = {"eval": prep.to_dict()}, task.transform(prep, config, False, on_device)
    if config.feature_views:
        transform = task.transform(prep, config, True, on_device)
        transform_id = {"train": prep.to_dict(), "augment": config.augment}
    else:
        transform, transform_id = evaluated, plain
    train = FeatureLoader(
        cached_features(
            model.backbone,
            data,
            "train",
            transform,
            transform_id,
            config,
            rt,
            report,
            config.feature_views,
            prep.resize,
            d,
            stats,
            task.dataset,
        ),
        labels["train"],
        image_loader.batch_sampler,
    )
    val = None
    if labels["val"]:
        shard = d.shard(len(labels["val"]))
        batches = [shard[i : i + config.batch_size] for i in range(0, len(shard), config.batch_size)]
        val = FeatureLoader(
            cached_features(
                model.backbone,
                data,
                "val",
                evaluated,
                plain,
                config,
                rt,
                report,
                min_side=prep.resize,
                d=d,
                stats=stats,
                reader=task.dataset,
            ),
            labels["val"],
            batches,
        )
    return train, val
