"""The parameters of `transferkit train`: one row per option (most set the TrainConfig field of the
same name), in help order. typer reads them as the command's signature (see `cli.train`)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from transferkit.core.checks import CHECKED_ALONE, HEADS, check_value
from transferkit.core.registry import ADAPTATIONS, STRATEGIES

SWITCHES = "On/off switches"
"""The help panel of the --X/--no-X pairs (see `switch`)."""


def switch(flag: str, help: str):
    """An on/off pair --FLAG/--no-FLAG whose None means "not given". It gets a help panel of its own: in
    the Options panel, the column of the --no-FLAG names would narrow every description to about 22
    characters at 80 columns."""
    return typer.Option(None, f"--{flag}/--no-{flag}", help=help, rich_help_panel=SWITCHES)


class _FlagsShowNoType:
    """typer shows `<bool>` beside a flag (--help too), which takes no value: show nothing there."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class Command(_FlagsShowNoType, TyperCommand):
    """Every `transferkit` command's class (`app.command(cls=Command)`)."""


class Group(_FlagsShowNoType, TyperGroup):
    """The `transferkit` command group's class."""


TRAIN = [
    (
        "data",
        Optional[str],
        typer.Argument(None, help="Image folder, CSV (path,label[,split]), builtin:NAME or cifar10:DIR."),
    ),
    (
        "config",
        Optional[Path],
        typer.Option(None, "--config", help="YAML config (e.g. a run's config.yaml); flags override it."),
    ),
    ("resume", Optional[Path], typer.Option(None, "--resume", help="Continue runs/NAME from its last.ckpt.")),
    (
        "model",
        Optional[str],
        typer.Option(
            None,
            help="Images: a timm model name (default efficientnet_lite0); text: a Hugging Face encoder name or "
            "folder (default all-minilm-l6-v2).",
        ),
    ),
    ("weights", Optional[str], typer.Option(None, help="auto | imagenet | none | PATH (default auto).")),
    (
        "strategy",
        Optional[str],
        typer.Option(
            None, help=f"{STRATEGIES.names()} (default finetune; `transferkit inspect MODEL` shows what each trains)."
        ),
    ),
    (
        "unfreeze_groups",
        Optional[int],
        typer.Option(None, help="finetune: layer groups trained, from the top (default 3)."),
    ),
    ("backbone_lr_mult", Optional[float], typer.Option(None, help="Backbone LR = lr x this (default 0.1).")),
    ("layer_decay", Optional[float], typer.Option(None, help="Layer-wise LR decay, e.g. 0.75 (overrides the mult).")),
    ("lr_min", Optional[float], typer.Option(None, help="fastai slice(lr_min, lr): stem LR, spaced up to lr.")),
    ("gradual_every", Optional[int], typer.Option(None, help="gradual: epochs per unfrozen group (default 1).")),
    ("lp_epochs", Optional[int], typer.Option(None, help="lp-ft: linear-probe epochs (default half).")),
    ("ft_lr_scale", Optional[float], typer.Option(None, help="lp-ft: fine-tune LR = lr x this (default 0.1).")),
    (
        "head",
        Optional[str],
        typer.Option(
            None, help=f"{' | '.join(HEADS)}: bottleneck is mlp with BatchNorm, for --target (default linear)."
        ),
    ),
    (
        "head_hidden",
        Optional[int],
        typer.Option(None, help="Hidden width of the mlp and bottleneck heads (default 512)."),
    ),
    ("head_dropout", Optional[float], typer.Option(None, help="Dropout before the last head layer (default 0).")),
    ("in_chans", Optional[int], typer.Option(None, help="3 = RGB; 1 = grayscale with an adapted stem (default 3).")),
    (
        "img_size",
        Optional[int],
        typer.Option(None, help="Resolution in pixels (default: the dataset's or the backbone's)."),
    ),
    ("epochs", Optional[int], typer.Option(None, help="Training epochs (default 10).")),
    ("batch_size", Optional[int], typer.Option(None, help="Batch size (default 32).")),
    ("optimizer", Optional[str], typer.Option(None, help="adamw | sgd (default adamw).")),
    (
        "lr",
        Optional[str],
        typer.Option(None, help="Peak head learning rate, or 'auto' for the LR finder (default 1e-3)."),
    ),
    ("weight_decay", Optional[float], typer.Option(None, help="Weight decay, not on norms/biases (default 0.01).")),
    ("warmup_epochs", Optional[float], typer.Option(None, help="Warmup epochs before cosine decay (default 1).")),
    ("label_smoothing", Optional[float], typer.Option(None, help="Label smoothing (default 0.1).")),
    ("l2sp", Optional[float], typer.Option(None, help="L2-SP toward pretrained weights, e.g. 0.01 (default 0).")),
    ("drop_path", Optional[float], typer.Option(None, help="Stochastic depth rate (default 0).")),
    ("mixup", Optional[float], typer.Option(None, help="Mixup alpha (default 0 = off).")),
    ("cutmix", Optional[float], typer.Option(None, help="CutMix alpha (default 0 = off).")),
    ("augment", Optional[str], typer.Option(None, help="none | basic | strong (default basic).")),
    (
        "target",
        Optional[str],
        typer.Option(None, help="Unlabelled target images to adapt to (a folder; subfolder names ignored)."),
    ),
    (
        "target_eval",
        Optional[str],
        typer.Option(None, help="Labelled target images for measuring only (class folders); never trained on."),
    ),
    (
        "adapt",
        Optional[str],
        typer.Option(None, help=f"With --target: {ADAPTATIONS.names()} (default auto: dann-mcc)."),
    ),
    ("adapt_weight", Optional[float], typer.Option(None, help="Weight of the adaptation loss (default 1).")),
    (
        "class_weights",
        Optional[str],
        typer.Option(None, help="none | auto: inverse-frequency loss weights (default none)."),
    ),
    ("sampler", Optional[str], typer.Option(None, help="shuffle | balanced (default shuffle).")),
    ("text_column", Optional[str], typer.Option(None, help="Text data: the column of texts (default text).")),
    ("label_column", Optional[str], typer.Option(None, help="Text data: the column of labels (default label).")),
    ("max_length", Optional[int], typer.Option(None, help="Text: tokens per text at most (default 128).")),
    ("patience", Optional[int], typer.Option(None, help="Early-stopping patience in epochs, 0 = off (default 0).")),
    (
        "select",
        Optional[str],
        typer.Option(
            None,
            help="Which epoch is best: auto | val (source val accuracy) | target-entropy (label-free, needs --target).",
        ),
    ),
    ("seed", Optional[int], typer.Option(None, help="Random seed (default 0).")),
    ("shots", Optional[int], typer.Option(None, help="Keep K training images per class (few-shot).")),
    (
        "val_fraction",
        Optional[float],
        typer.Option(None, help="Val share carved from train when missing (default 0.1)."),
    ),
    (
        "test_fraction",
        Optional[float],
        typer.Option(None, help="Test share carved from train when missing (default 0.1)."),
    ),
    ("split_file", Optional[str], typer.Option(None, help="Reuse an earlier run's split.json.")),
    ("workers", Optional[int], typer.Option(None, help="DataLoader workers (default auto).")),
    ("device", Optional[str], typer.Option(None, help="auto | cpu | cuda (default auto).")),
    ("runs_dir", Optional[str], typer.Option(None, help="Where run directories go (default runs).")),
    ("name", Optional[str], typer.Option(None, help="Run directory name (default DATA-STRATEGY).")),
    ("overwrite", bool, typer.Option(False, "--overwrite", help="Replace an existing run directory of that name.")),
    ("quiet", bool, typer.Option(False, "--quiet", help="Log lines instead of progress bars.")),
    ("save_every_steps", Optional[int], typer.Option(None, help="Also checkpoint every N steps (mid-epoch resume).")),
    ("keep_top_k", Optional[int], typer.Option(None, help="Keep the K best epochs as bundles in top/ (default 0).")),
    (
        "nan_policy",
        Optional[str],
        typer.Option(None, help="stop | skip: on a NaN/Inf loss or gradient (default stop)."),
    ),
    ("nan_skip_limit", Optional[int], typer.Option(None, help="nan-policy skip: most steps skipped (default 10).")),
    ("grad_clip", Optional[float], typer.Option(None, help="Clip the gradient norm to this (default off).")),
    ("bad_files", Optional[str], typer.Option(None, help="skip | error: unreadable or leaked files (default skip).")),
    (
        "outside_links",
        Optional[str],
        typer.Option(None, help="follow | refuse: image files linking outside the data folder (default follow)."),
    ),
    ("deterministic", bool, typer.Option(False, "--deterministic", help="torch.use_deterministic_algorithms.")),
    (
        "trust_checkpoint",
        bool,
        typer.Option(False, "--trust-checkpoint", help="Allow pickled --weights/--resume files (they can run code)."),
    ),
    (
        "feature_cache",
        Optional[bool],
        switch("feature-cache", "Head-only phases train on cached features (default on)."),
    ),
    ("feature_views", Optional[int], typer.Option(None, help="Augmented views cached per image (default 0 = none).")),
    (
        "channels_last",
        Optional[bool],
        switch("channels-last", "NHWC memory format (default on; measured faster)."),
    ),
    (
        "image_cache",
        Optional[bool],
        switch("image-cache", "Decode each image once into a memory map (default on)."),
    ),
    (
        "crop_on",
        Optional[str],
        typer.Option(
            None,
            help="auto | workers | device: where augment basic crops cached images (default auto: "
            "device on CUDA unless --deterministic, measured faster there; workers elsewhere).",
        ),
    ),
    ("cache_dir", Optional[str], typer.Option(None, help="Cache folder (default ~/.cache/transferkit).")),
    (
        "precision",
        Optional[str],
        typer.Option(
            None, help="auto | bf16 | fp32 (default auto: bf16 per kind of work only where measured faster here)."
        ),
    ),
    ("threads", Optional[int], typer.Option(None, help="torch threads (default cores minus loader workers).")),
    (
        "compile",
        Optional[bool],
        switch("compile", "torch.compile the model (default off)."),
    ),
    ("accumulate", Optional[int], typer.Option(None, help="Micro-batches per step: batch = micro x processes x this.")),
    ("sync_bn", bool, typer.Option(False, "--sync-bn", help="Several processes: SyncBatchNorm over the global batch.")),
    (
        "lr_scaling",
        Optional[str],
        typer.Option(None, help="none | linear | sqrt: scale lr by batch / --lr-base-batch."),
    ),
    ("lr_base_batch", Optional[int], typer.Option(None, help="The batch size --lr is meant for (default 32).")),
    ("devices", int, typer.Option(1, help="Processes on this machine (GPUs, or CPU ranks): runs torchrun for you.")),
    (
        "html_report",
        Optional[bool],
        switch("report", "Write report.html at the end (default on)."),
    ),
    (
        "tensorboard",
        bool,
        typer.Option(False, "--tensorboard", help="Write TensorBoard event files to RUN/tensorboard."),
    ),
    (
        "profile_steps",
        Optional[int],
        typer.Option(None, help="Profile N training steps (torch.profiler): RUN/profile.txt and profile-trace.json."),
    ),
]


def _checker(field: str):
    """A typer callback that checks one flag's value as the command line is parsed: a wrong choice or a
    number out of range is one message before the command imports torch (seconds), not after."""

    def check(ctx, param, value):
        check_value(field, value, param.opts[0] if param.opts else field)
        return value

    return check


for _field, _, _info in TRAIN:
    if _field in CHECKED_ALONE:
        _info.callback = _checker(_field)


def signature(rows: list) -> inspect.Signature:
    """The signature typer builds the command's arguments and options from."""
    return inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, annotation, default in rows
        ]
    )


TUNE = [
    row
    if row[0] != "name"
    else ("name", Optional[str], typer.Option(None, help="Study folder runs/NAME (default tune-DATA)."))
    for row in TRAIN
    if row[0] not in ("resume", "workers", "devices")
] + [
    ("trials", int, typer.Option(..., help="Finished trials the study should have, over all its workers.")),
    ("timeout", Optional[float], typer.Option(None, help="Start no new trial after this many seconds.")),
    ("seeds_per_trial", int, typer.Option(1, help="Seeds per trial; its score is their mean (noisy small data).")),
    ("pruner", str, typer.Option("median", help="median | hyperband | none: stop poor trials early.")),
    (
        "storage",
        Optional[str],
        typer.Option(
            None,
            help="SQLAlchemy URL of the study's storage, e.g. postgresql://user:pw@host/db "
            "(default: runs/NAME/study.db, SQLite).",
        ),
    ),
    ("study", Optional[str], typer.Option(None, help="Study name in the storage (default NAME).")),
    (
        "models",
        Optional[str],
        typer.Option(
            None,
            help="Comma-separated backbones, or auto (those with weights here): ranked by LogME "
            "first, the --top-k best searched.",
        ),
    ),
    ("top_k", int, typer.Option(2, help="With --models: how many of the ranked backbones the search keeps.")),
    ("workers", int, typer.Option(1, help="Worker processes on this machine, sharing the study.")),
    (
        "heartbeat",
        int,
        typer.Option(
            20,
            help="Seconds between a trial's heartbeats; a trial silent 3x as long "
            "(its worker was killed) is failed and retried.",
        ),
    ),
]
"""`transferkit tune`: train's options (each fixes that field for every trial), then the study's own."""
