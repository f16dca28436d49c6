"""The task seam: what one kind of input needs, behind one small interface — the backbone family that
encodes it (with a new head), its preprocessing, what reads a split's samples, and how a batch of them
reaches the device. The recipe and the loop speak to a `Task` only, so another kind of input plugs in
beside images without branches on the modality in the loop.

Two tasks: images (`ImageTask`) and text (`TextTask`); the data says which (`Data.kind`), and a bundle's
model.json records it (`architecture.task`). `train(task=...)` takes another.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from transferkit.core.config import TrainConfig
from transferkit.core.errors import UserError
from transferkit.core.registry import TASKS
from transferkit.data.loaders import read_images
from transferkit.data.preprocessing import Preprocessing, TextPreprocessing
from transferkit.data.sources import Data, TextDataset
from transferkit.data.texts import TokenIds
from transferkit.data.transforms import DeviceCrop, eval_transform, train_transform
from transferkit.models.classifier import build_classifier, rebuild_classifier
from transferkit.models.objective import Classification, classification
from transferkit.models.runtime import Runtime


@runtime_checkable
class Task(Protocol):
    name: str
    unused: tuple[str, ...]
    """Config fields that mean nothing to this task's inputs: a tuner leaves them out of its space."""

    def build(
        self, config: TrainConfig, num_classes: int, default_size: int | None
    ) -> tuple[nn.Module, dict, Preprocessing]:
        """The classifier (pretrained encoder + new head for `num_classes`), its architecture record and
        the preprocessing its inputs need."""

    def transform(self, prep: Preprocessing, config: TrainConfig, train: bool, on_device: bool, resized: bool = False):
        """One sample's preprocessing: augmented when `train`; `on_device`: `move` finishes it on the device;
        `resized`: the sample comes from a cache that already resized it."""

    def dataset(self, data, split: str, transform, config: TrainConfig, images=None, min_side: int | None = None):
        """A split's samples as (input, class index, sample index) items."""

    def move(self, inputs, rt: Runtime) -> torch.Tensor:
        """A collated batch of inputs as the model's input on `rt.device`."""

    def rebuild(self, record: dict) -> nn.Module:
        """An untrained classifier with the structure of `record` (a bundle's architecture)."""

    def objective(self, model: nn.Module, config: TrainConfig, data: Data, terms: list) -> nn.Module:
        """What a training step computes on `model` (see `models.objective`): forward(inputs, targets)
        returns a StepOutput; `terms` add to its loss."""


class ImageTask:
    """Images: a timm backbone, transforms from its pretrained config, files or decoded-image caches,
    uint8 or float batches (see `Runtime.batch`)."""

    name = "image"
    unused = ()

    def build(self, config: TrainConfig, num_classes: int, default_size: int | None):
        c = config
        return build_classifier(
            c.model,
            "none" if c.strategy == "scratch" else c.weights,
            num_classes,
            in_chans=c.in_chans,
            img_size=c.img_size or default_size,
            head=c.head,
            head_hidden=c.head_hidden,
            head_dropout=c.head_dropout,
            drop_path=c.drop_path,
            trust=c.trust_checkpoint,
        )

    def transform(self, prep: Preprocessing, config: TrainConfig, train: bool, on_device: bool, resized: bool = False):
        if train and resized and crops_on_device(config, on_device):
            return DeviceCrop(prep)
        if train:
            return train_transform(prep, config.augment, normalize=not on_device)
        return eval_transform(prep, resized, normalize=not on_device)

    def dataset(self, data, split: str, transform, config: TrainConfig, images=None, min_side: int | None = None):
        return read_images(data, split, transform, config, images, min_side)

    def move(self, inputs, rt: Runtime) -> torch.Tensor:
        return rt.batch(inputs)

    def rebuild(self, record: dict) -> nn.Module:
        return rebuild_classifier(record)

    def objective(self, model: nn.Module, config: TrainConfig, data: Data, terms: list) -> nn.Module:
        return classification_objective(model, config, data, terms)


class TextTask:
    """Text: a transformers encoder (see `models.text`), the encoder's tokenizer as the transform (no
    augmentation), texts held in memory, batches of token ids padded to their longest text."""

    name = "text"
    unused = ("mixup", "cutmix", "augment", "img_size", "in_chans")

    def build(self, config: TrainConfig, num_classes: int, default_size: int | None):
        from transferkit.models.text import build_text_classifier

        c = config
        return build_text_classifier(
            c.model,
            "none" if c.strategy == "scratch" else c.weights,
            num_classes,
            c.max_length,
            c.head,
            c.head_hidden,
            c.head_dropout,
        )

    def transform(
        self, prep: TextPreprocessing, config: TrainConfig, train: bool, on_device: bool, resized: bool = False
    ):
        return TokenIds(prep.tokenizer, prep.max_length, prep.pad_id)

    def dataset(self, data, split: str, transform, config: TrainConfig, images=None, min_side: int | None = None):
        return TextDataset(data, split, transform)

    def move(self, inputs, rt: Runtime) -> torch.Tensor:
        return rt.batch(inputs)

    def rebuild(self, record: dict) -> nn.Module:
        from transferkit.models.text import rebuild_text_classifier

        return rebuild_text_classifier(record)

    def objective(self, model: nn.Module, config: TrainConfig, data: Data, terms: list) -> nn.Module:
        if config.mixup or config.cutmix:
            raise UserError("--mixup and --cutmix blend images; this data is text: leave them at 0.")
        return classification_objective(model, config, data, terms)


def classification_objective(model: nn.Module, config: TrainConfig, data: Data, terms: list) -> Classification:
    """Cross-entropy on the data's classes: `--class-weights auto` weighs them by inverse frequency in the
    training split; label smoothing; mixup/cutmix."""
    counts = None
    if config.class_weights == "auto":
        train_counts = data.counts("train")
        counts = [train_counts[name] for name in data.classes]
    return classification(
        model, len(data.classes), counts, config.label_smoothing, config.mixup, config.cutmix, tuple(terms)
    )


def crops_on_device(config: TrainConfig, on_device: bool) -> bool:
    """Whether training crops of cached images are cut on the device (`crop_on`): where asked, or by
    default (auto) where the device normalises batches (CUDA), augment is basic and the run is not
    --deterministic. On a GPU the loader workers then keep up better: less of each step waits for data and
    training runs faster (benchmarks/results/gpu-h200-2026-11-27.md; README, On a GPU). On a CPU the main process
    would do the workers' share. A deterministic run on the GPU cropping there has not yet been seen to finish."""
    return config.crop_on == "device" or (
        config.crop_on == "auto" and on_device and config.augment == "basic" and not config.deterministic
    )


def task_for(data: Data) -> Task:
    """The task that reads `data`: text or images."""
    return TASKS.load(data.kind)()


def rebuild(record: dict) -> nn.Module:
    """An untrained classifier for a bundle's architecture record, by the task that made it."""
    return TASKS.load(record.get("task", "image"))().rebuild(record)
