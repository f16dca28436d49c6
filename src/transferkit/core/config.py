"""The training configuration: a dataclass of options per section (data, model, strategy, optim,
regularise, adapt, runtime, output), each field with its default and its help beside it; `TrainConfig`
is all of them, validated on construction (core.checks: choices and ranges, by field name).

YAML is only its serialised form: every run saves the fully resolved config as
`config.yaml`, and `--config` reads it back. Unknown keys fail with a close-match
suggestion; out-of-range values fail with the valid range.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from transferkit.core.checks import (  # noqa: F401 (the choices, importable from here as before)
    ADAPTS,
    AUGMENTS,
    BAD_FILES,
    CLASS_WEIGHTS,
    DEVICES,
    HEADS,
    LR_SCALINGS,
    NAN_POLICIES,
    OPTIMIZERS,
    PRECISIONS,
    SAMPLERS,
    STRATEGIES,
    validate,
)
from transferkit.core.errors import UserError, did_you_mean


@dataclass
class DataOptions:
    """What the data is and how it is split and augmented (config.yaml's `data` section)."""

    data: str = ""
    """Data spec: an image folder, a CSV file (path,label[,split]), builtin:NAME or cifar10:DIR."""
    val_fraction: float = 0.1
    """Share of each class held out for validation when the data has no val split."""
    test_fraction: float = 0.1
    """Share of each class held out for testing when the data has no test split."""
    shots: int | None = None
    """Keep only this many training images per class (few-shot); None keeps all."""
    split_file: str | None = None
    """Reuse the split.json of an earlier run instead of making a new split."""
    bad_files: str = "skip"
    """skip: leave out unreadable/leaked files and list them in skipped.txt; error: refuse to train."""
    outside_links: str = "follow"
    """Image files that are links to outside the data folder: follow (as torchvision does; listed in a
    warning) | refuse (left out, listed in skipped.txt)."""
    augment: str = "basic"
    """none | basic (random resized crop + flip) | strong (basic + TrivialAugment)."""
    sampler: str = "shuffle"
    """shuffle | balanced: draw training images with probability 1/class size (with replacement)."""
    text_column: str = "text"
    """Text data (.csv/.tsv/.jsonl): the column holding each text."""
    label_column: str = "label"
    """Text data: the column holding each text's class (a `split` column, if any, says train/val/test)."""


@dataclass
class ModelOptions:
    """The model and its input (config.yaml's `model` section)."""

    model: str = "efficientnet_lite0"
    """Any timm model name; efficientnet_lite0/1/2 have ImageNet weights that work offline."""
    weights: str = "auto"
    """auto (bundled or cached, never downloads) | imagenet (may download) | none | a file path."""
    head: str = "linear"
    """linear | mlp (one hidden layer with ReLU and dropout) | bottleneck (mlp with BatchNorm; for --target)."""
    head_hidden: int = 512
    """Hidden width of the mlp head."""
    head_dropout: float = 0.0
    """Dropout before the head's last linear layer; try 0.2-0.5 on small data."""
    in_chans: int = 3
    """Input channels: 3 converts every image to RGB; 1 keeps grayscale and adapts the stem."""
    img_size: int | None = None
    """Training/eval resolution in pixels; default from the dataset (builtins) or the backbone."""
    max_length: int = 128
    """Text: tokens per text at most (longer texts are cut); batches are padded to their longest text."""
    trust_checkpoint: bool = False
    """Allow --weights/--resume files that need full unpickling (can run code: only files you trust)."""


@dataclass
class StrategyOptions:
    """What trains, when, for how long (config.yaml's `strategy` section)."""

    strategy: str = "finetune"
    """What trains, when, at which LR: a name in core.registry.STRATEGIES (linear-probe, finetune, ...)."""
    unfreeze_groups: int = 3
    """finetune: how many layer groups, counted from the top, train."""
    backbone_lr_mult: float = 0.1
    """Backbone LR = lr x this (discriminative LRs); the head trains at lr."""
    layer_decay: float | None = None
    """Layer-wise LR decay (timm/BEiT): group i of n trains at lr x decay^(n-i); try 0.75.
    Overrides backbone_lr_mult."""
    lr_min: float | None = None
    """fastai's slice(lr_min, lr): LRs spaced geometrically from lr_min (stem) to lr (head)."""
    gradual_every: int = 1
    """gradual: epochs between unfreezing the next layer group from the top (head alone first)."""
    lp_epochs: int | None = None
    """lp-ft: epochs of the linear-probe phase; default half of epochs."""
    ft_lr_scale: float = 0.1
    """lp-ft: the fine-tune phase trains everything at lr x this (Kumar et al. 2022: small LR)."""
    plan: list | None = None
    """An explicit plan instead of a named strategy: a list of phases (see transferkit.training.strategy.Phase)."""
    epochs: int = 10
    """Training epochs."""
    patience: int = 0
    """Stop after this many epochs without a better validation score; 0 never stops early."""
    select: str = "auto"
    """Which epoch is best: val (source validation accuracy) | target-entropy (lowest mean prediction entropy
    on the unlabelled --target images: no target label needed) | auto (val; with --target, the rule measured
    best in benchmarks/results/adapt.md)."""


@dataclass
class OptimOptions:
    """How it is optimised (config.yaml's `optim` section)."""

    optimizer: str = "adamw"
    """adamw | sgd (with momentum)."""
    lr: float | str = 1e-3
    """Peak learning rate of the head; 1e-3 suits AdamW, try 1e-2 for SGD; 'auto' runs the LR finder."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to norms and biases."""
    momentum: float = 0.9
    """SGD momentum."""
    warmup_epochs: float = 1.0
    """Linear warmup length before the cosine decay, in epochs (fractions allowed)."""
    batch_size: int = 32
    """Images per optimizer step; 32 was fastest per image on a 2-core CPU."""
    accumulate: int = 1
    """Micro-batches per optimizer step: batch_size (the global batch) = micro-batch x processes x accumulate."""
    lr_scaling: str = "none"
    """none | linear | sqrt: scale lr by batch_size / lr_base_batch (or its root) once, at the start of a run."""
    lr_base_batch: int = 32
    """The batch size the given lr is meant for, when lr_scaling is linear or sqrt."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None does not clip."""


@dataclass
class RegulariseOptions:
    """Regularisers (config.yaml's `regularise` section)."""

    label_smoothing: float = 0.1
    """Cross-entropy label smoothing; 0 turns it off."""
    l2sp: float = 0.0
    """L2-SP coefficient: pull backbone weights toward the pretrained ones (not zero); try 0.01-0.1."""
    drop_path: float = 0.0
    """Stochastic depth rate for models that support timm's drop_path_rate; try 0.1 for full fine-tuning."""
    mixup: float = 0.0
    """Mixup alpha (timm Mixup); 0 turns it off, 0.2-0.8 is typical."""
    cutmix: float = 0.0
    """CutMix alpha (timm Mixup); 0 turns it off, 1.0 is typical."""
    class_weights: str = "none"
    """none | auto: weight the loss by inverse class frequency in the training split."""


@dataclass
class AdaptOptions:
    """Domain adaptation to an unlabelled target (config.yaml's `adapt` section)."""

    target: str | None = None
    """Unlabelled target images to adapt to: a folder (subfolder names ignored) or e.g. builtin:digits."""
    target_eval: str | None = None
    """Labelled target images for measuring only (class folders): their labels never reach a loss or the
    checkpoint choice."""
    adapt: str = "auto"
    """With a target: a method in core.registry.ADAPTATIONS, or auto (the measured default)."""
    adapt_weight: float = 1.0
    """Weight of the adaptation loss against the classification loss."""


@dataclass
class RuntimeOptions:
    """How it runs on this machine (config.yaml's `runtime` section)."""

    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda."""
    precision: str = "auto"
    """auto: per kind of work (training, inference), bf16 on CUDA and where a CPU with native bf16 measured it
    >= 1.15x faster for this model (timed once, cached); else fp32. The choice and why: runs/NAME/runtime.json."""
    channels_last: bool = True
    """NHWC memory format for model and images: measured faster for training and inference on a CPU
    (README, Speed); convnets on CUDA with bf16 gain too (README, On a GPU)."""
    compile: bool = False
    """torch.compile the model (slow to warm up; measured no faster on a CPU: README, Speed)."""
    workers: int | None = None
    """DataLoader worker processes; None picks by core count and data source."""
    threads: int | None = None
    """torch threads; None: the cores minus the loader workers on CPU (see `runtime`)."""
    sync_bn: bool = False
    """With several processes, BatchNorm in train mode uses statistics of the global micro-batch (SyncBatchNorm)."""
    seed: int = 0
    """Seeds the split, the few-shot choice, initialisation and data order."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): identical results on the same hardware, maybe slower."""
    feature_cache: bool = True
    """Phases that train only the head on a frozen backbone train on cached features (computed once)."""
    feature_views: int = 0
    """Feature cache: 0 caches the un-augmented image; K > 0 caches K augmented views per image."""
    image_cache: bool = True
    """Phases that run the backbone read images decoded once into a memory map, not the files each epoch."""
    crop_on: str = "auto"
    """Where augment basic's random resized crop and flip of cached images are made: workers (the loader
    processes) | device (drawn in the workers, cut and resized in one batched op on the run's device; see
    transforms.DeviceCrop) | auto: device on CUDA with augment basic, unless deterministic (measured
    faster: README, On a GPU), else workers (see models.task.crops_on_device)."""
    cache_dir: str | None = None
    """Where cached features and decoded images go; default $TRANSFERKIT_CACHE or ~/.cache/transferkit."""
    nan_policy: str = "stop"
    """stop: a NaN/Inf loss or gradient ends the run, naming the step and the batch's files; skip: skip the step."""
    nan_skip_limit: int = 10
    """nan_policy skip: stop after this many skipped steps in a run."""


@dataclass
class OutputOptions:
    """What the run writes (config.yaml's `output` section)."""

    runs_dir: str = "runs"
    """Folder that holds run directories."""
    name: str | None = None
    """Run directory name under runs_dir; default derived from data and strategy."""
    overwrite: bool = False
    """Allow reusing an existing run directory name."""
    quiet: bool = False
    """Plain log lines instead of progress bars."""
    save_every_steps: int = 0
    """Also write last.ckpt every N optimizer steps (mid-epoch resume); 0 = at epoch ends only."""
    keep_top_k: int = 0
    """Keep the K best epochs as bundles in top/ besides best/; 0 keeps only best/."""
    html_report: bool = True
    """Write runs/NAME/report.html at the end (curves, confusion matrix, top losses, calibration)."""
    tensorboard: bool = False
    """Write TensorBoard event files to runs/NAME/tensorboard."""
    profile_steps: int = 0
    """torch.profiler over this many training steps (after 2 warm-up steps): runs/NAME/profile.txt and
    profile-trace.json (see training.profile); 0 = off."""


SECTION_OPTIONS = {
    "data": DataOptions,
    "model": ModelOptions,
    "strategy": StrategyOptions,
    "optim": OptimOptions,
    "regularise": RegulariseOptions,
    "adapt": AdaptOptions,
    "runtime": RuntimeOptions,
    "output": OutputOptions,
}
"""config.yaml's sections, each the dataclass of its options: what the data is, which model, what trains
when, how it is optimised and regularised, adaptation, how it runs on the machine, and what the run writes.
CLI flags and `config.lr`-style access keep the plain field names."""

SECTIONS = {name: tuple(f.name for f in dataclasses.fields(options)) for name, options in SECTION_OPTIONS.items()}
"""Each section's field names, in order."""


@dataclass
class TrainConfig(
    OutputOptions,
    RuntimeOptions,
    AdaptOptions,
    RegulariseOptions,
    OptimOptions,
    StrategyOptions,
    ModelOptions,
    DataOptions,
):
    """Everything a training run needs: the options of every section (dataclasses inherit fields in reverse
    order of their bases, so the data's come first); saved as `config.yaml` in the run directory, in those
    sections. A function that needs one section may take that section's type: a TrainConfig is each.
    """

    def __post_init__(self) -> None:
        _coerce_types(self)
        validate(self)

    @classmethod
    def from_dict(cls, values: dict[str, typing.Any], source: str = "config") -> TrainConfig:
        """Build a config from a mapping, refusing unknown keys with a suggestion."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise UserError(
                    f"Unknown key '{key}' in {source}.{did_you_mean(key, known)} "
                    f"Valid keys: {', '.join(sorted(known))}."
                )
        return cls(**values)

    def replace(self, **changes: typing.Any) -> TrainConfig:
        """Return a copy with some fields changed (validated again)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, typing.Any]:
        return dataclasses.asdict(self)

    def to_sections(self) -> dict[str, dict[str, typing.Any]]:
        """The fields grouped as config.yaml holds them (see SECTIONS)."""
        values = self.to_dict()
        return {section: {key: values[key] for key in keys} for section, keys in SECTIONS.items()}

    def save(self, path: Path) -> None:
        """config.yaml through the atomic writer: a crash or a full disk leaves the previous file or none."""
        import yaml

        from transferkit.core.files import write_text

        write_text(Path(path), yaml.safe_dump(self.to_sections(), sort_keys=False))

    @classmethod
    def load(
        cls, path: str | Path, say=lambda note: print(note, file=sys.stderr), other: tuple[str, ...] = ()
    ) -> TrainConfig:
        """Read a YAML config file (the `config.yaml` of a run, or one written by hand): sections as `save`
        writes them, or the flat form of runs from before sections (converted; `say` gets a note). `other`:
        top-level keys that belong to another reader of the same file (`tune`'s `search`), left alone."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise UserError(f"Config file '{path}' does not exist.")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"Config file '{path}' is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise UserError(f"Config file '{path}' must hold a mapping of keys to values.")
        flat = {
            key: value
            for key, value in values.items()
            if key not in other and (key not in SECTIONS or not isinstance(value, dict))
        }
        if flat and say is not None:
            keys = ", ".join(list(flat)[:3]) + (", ..." if len(flat) > 3 else "")
            say(
                f"[transferkit] note: '{path}' has {len(flat)} key(s) outside sections ({keys}: the flat form of "
                f"configs from before sections); read as they are. Runs now write config.yaml in sections: "
                f"{', '.join(SECTIONS)}."
            )
        for section in SECTIONS:
            inner = values.get(section)
            if not isinstance(inner, dict):
                continue
            for key, value in inner.items():
                home = next((s for s, names in SECTIONS.items() if key in names), None)
                if home != section:
                    where = (
                        f"it belongs in section '{home}'" if home else f"no section has it.{did_you_mean(key, _FIELDS)}"
                    )
                    raise UserError(f"Key '{key}' in section '{section}' of '{path}': {where}.")
                if key in flat:
                    raise UserError(f"'{path}' sets '{key}' twice: in section '{section}' and at the top level.")
                flat[key] = value
        return cls.from_dict(flat, source=f"'{path}'")


def _coerce_types(config: TrainConfig) -> None:
    """Convert YAML/CLI scalars to the declared field types ('1e-3' -> 0.001), or fail clearly."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        allowed = typing.get_args(hints[field.name]) or (hints[field.name],)
        if value is None and type(None) in allowed:
            continue
        targets = [t for t in allowed if t is not type(None)]
        if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in targets[:1]):
            continue
        if str in targets[1:] and isinstance(value, str):  # e.g. lr: float | str ('auto')
            try:
                setattr(config, field.name, float(value))
            except ValueError:
                pass
            continue
        target = targets[0]
        try:
            if target is bool and isinstance(value, str) and value.lower() in ("true", "false"):
                converted = value.lower() == "true"
            elif target is int and isinstance(value, (int, float, str)) and float(value) == int(float(value)):
                converted = int(float(value))
            elif target is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                converted = float(value)
            elif target is str and isinstance(value, (int, float)):
                converted = str(value)
            else:
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(
                f"{field.name} must be {target.__name__}; got {value!r} ({type(value).__name__})."
            ) from None
        setattr(config, field.name, converted)


_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
