"""What a TrainConfig may hold: the choices of each option and the checks `TrainConfig` runs on
construction (each failing check is a UserError naming the key, the value and what is allowed)."""

from __future__ import annotations

from transferkit.core.errors import UserError, did_you_mean

STRATEGIES = ("linear-probe", "finetune", "gradual", "lp-ft", "full", "scratch")
OPTIMIZERS = ("adamw", "sgd")
HEADS = ("linear", "mlp", "bottleneck")
AUGMENTS = ("none", "basic", "strong")
CLASS_WEIGHTS = ("none", "auto")
SAMPLERS = ("shuffle", "balanced")
DEVICES = ("auto", "cpu", "cuda")
NAN_POLICIES = ("stop", "skip")
BAD_FILES = ("skip", "error")
OUTSIDE_LINKS = ("follow", "refuse")
PRECISIONS = ("auto", "bf16", "fp32")
LR_SCALINGS = ("none", "linear", "sqrt")
ADAPTS = ("auto", "dann", "cdan", "mcc", "dann-mcc", "coral", "none")
SELECTS = ("auto", "val", "target-entropy")
CROP_ON = ("auto", "workers", "device")
CHOICES = {
    "strategy": STRATEGIES,
    "optimizer": OPTIMIZERS,
    "head": HEADS,
    "augment": AUGMENTS,
    "device": DEVICES,
    "class_weights": CLASS_WEIGHTS,
    "sampler": SAMPLERS,
    "nan_policy": NAN_POLICIES,
    "bad_files": BAD_FILES,
    "outside_links": OUTSIDE_LINKS,
    "precision": PRECISIONS,
    "lr_scaling": LR_SCALINGS,
    "adapt": ADAPTS,
    "select": SELECTS,
    "crop_on": CROP_ON,
}
"""Each option with a fixed set of values, and that set."""


def validate(config) -> None:
    """Every range and choice of `config`, and the combinations that cannot run."""
    for key, choices in CHOICES.items():
        _choice(key, getattr(config, key), choices)
    _range("adapt_weight", config.adapt_weight, 0.0)
    if config.adapt not in ("auto", "none") and config.target is None:
        raise UserError(f"adapt '{config.adapt}' needs unlabelled target images: add --target DIR.")
    if config.select == "target-entropy" and config.target is None:
        raise UserError(
            "select 'target-entropy' scores checkpoints on unlabelled target images: add --target DIR, "
            "or use --select val."
        )
    if config.target_eval is not None and config.target is None:
        raise UserError("--target-eval measures an adapted run: add --target DIR (its unlabelled images).")
    if config.crop_on == "device" and (config.augment != "basic" or not config.image_cache):
        raise UserError(
            f"crop_on 'device' crops the decoded-image cache's squares for augment basic; this run has "
            f"augment '{config.augment}' and image_cache {config.image_cache}: use --crop-on workers."
        )
    _range("accumulate", config.accumulate, 1)
    _range("lr_base_batch", config.lr_base_batch, 1)
    if config.threads is not None:
        _range("threads", config.threads, 1)
    _range("save_every_steps", config.save_every_steps, 0)
    _range("profile_steps", config.profile_steps, 0)
    _range("keep_top_k", config.keep_top_k, 0)
    _range("nan_skip_limit", config.nan_skip_limit, 0)
    _range("feature_views", config.feature_views, 0, 64)
    if config.grad_clip is not None:
        _range("grad_clip", config.grad_clip, 0.0, lo_open=True)
    _range("epochs", config.epochs, 1)
    _range("batch_size", config.batch_size, 1)
    _range("unfreeze_groups", config.unfreeze_groups, 1)
    _range("head_hidden", config.head_hidden, 1)
    _range("max_length", config.max_length, 8, 8192)
    if config.lr != "auto":
        if isinstance(config.lr, str):
            raise UserError(f"lr must be a positive number or 'auto'; got '{config.lr}'.")
        _range("lr", config.lr, 0.0, lo_open=True)
    _range("backbone_lr_mult", config.backbone_lr_mult, 0.0)
    _range("weight_decay", config.weight_decay, 0.0)
    _range("momentum", config.momentum, 0.0, 1.0)
    _range("warmup_epochs", config.warmup_epochs, 0.0)
    _range("label_smoothing", config.label_smoothing, 0.0, 1.0, hi_open=True)
    _range("head_dropout", config.head_dropout, 0.0, 1.0, hi_open=True)
    _range("patience", config.patience, 0)
    _range("gradual_every", config.gradual_every, 1)
    _range("l2sp", config.l2sp, 0.0)
    _range("drop_path", config.drop_path, 0.0, 1.0, hi_open=True)
    _range("mixup", config.mixup, 0.0)
    _range("cutmix", config.cutmix, 0.0)
    if (config.mixup or config.cutmix) and config.class_weights != "none":
        raise UserError(
            "class_weights cannot be combined with mixup/cutmix (soft targets); use "
            "--sampler balanced for imbalance instead."
        )
    _range("ft_lr_scale", config.ft_lr_scale, 0.0, lo_open=True)
    if config.layer_decay is not None:
        _range("layer_decay", config.layer_decay, 0.0, 1.0, lo_open=True)
    if config.lr_min is not None:
        _range("lr_min", config.lr_min, 0.0, config.lr if config.lr != "auto" else None, lo_open=True)
    if config.strategy == "lp-ft":
        _range("epochs (lp-ft needs a probe and a fine-tune phase)", config.epochs, 2)
        if config.lp_epochs is not None:
            _range("lp_epochs", config.lp_epochs, 1, config.epochs - 1)
    _range("val_fraction", config.val_fraction, 0.0, 0.9)
    _range("test_fraction", config.test_fraction, 0.0, 0.9)
    if config.val_fraction + config.test_fraction >= 0.95:
        raise UserError(
            f"val_fraction + test_fraction = {config.val_fraction + config.test_fraction:g} leaves "
            "almost nothing to train on; keep their sum below 0.95."
        )
    if config.in_chans not in (1, 3):
        raise UserError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {config.in_chans}.")
    if config.img_size is not None:
        _range("img_size", config.img_size, 16, 2048)
    if config.shots is not None:
        _range("shots", config.shots, 1)
    if config.workers is not None:
        _range("workers", config.workers, 0, 64)
    if config.strategy == "scratch" and config.weights not in ("auto", "none"):
        raise UserError(
            f"strategy 'scratch' trains from random initialisation, but weights='{config.weights}' "
            "was given. Drop --weights, or pick another strategy."
        )


def check_precision(precision: str) -> None:
    """predict's and evaluate's --precision (a run's is checked with its config)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be auto, bf16 or fp32; got '{precision}'.")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}; got '{value}'.{did_you_mean(str(value), choices)}")


def _range(
    key: str, value: float, lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> None:
    ok = (value > lo if lo_open else value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        bound = f"{'>' if lo_open else '>='} {lo:g}"
        if hi is not None:
            bound += f" and {'<' if hi_open else '<='} {hi:g}"
        raise UserError(f"{key} must be {bound}; got {value}.")
