"""What a TrainConfig may hold: the choices of each option and the checks `TrainConfig` runs on
construction (each failing check is a UserError naming the key, the value and what is allowed)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from transferkit.core import registry
from transferkit.core.errors import UserError, did_you_mean

STRATEGIES = registry.STRATEGIES  # the registry itself: a strategy registered later is a choice too
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
ADAPTS = ("auto", *registry.ADAPTATIONS)
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


class Bound(NamedTuple):
    """An option's range: above (`lo_open`) or from `lo`, up to `hi` (below it with `hi_open`), if any."""

    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False


BOUNDS = {
    "val_fraction": Bound(0.0, 0.9),
    "test_fraction": Bound(0.0, 0.9),
    "shots": Bound(1),
    "head_hidden": Bound(1),
    "head_dropout": Bound(0.0, 1.0, hi_open=True),
    "img_size": Bound(16, 2048),
    "max_length": Bound(8, 8192),
    "unfreeze_groups": Bound(1),
    "backbone_lr_mult": Bound(0.0),
    "layer_decay": Bound(0.0, 1.0, lo_open=True),
    "lr_min": Bound(0.0, lo_open=True),  # and at most lr: see `validate`
    "gradual_every": Bound(1),
    "ft_lr_scale": Bound(0.0, lo_open=True),
    "epochs": Bound(1),
    "patience": Bound(0),
    "weight_decay": Bound(0.0),
    "momentum": Bound(0.0, 1.0),
    "warmup_epochs": Bound(0.0),
    "batch_size": Bound(1),
    "accumulate": Bound(1),
    "lr_base_batch": Bound(1),
    "grad_clip": Bound(0.0, lo_open=True),
    "label_smoothing": Bound(0.0, 1.0, hi_open=True),
    "l2sp": Bound(0.0),
    "drop_path": Bound(0.0, 1.0, hi_open=True),
    "mixup": Bound(0.0),
    "cutmix": Bound(0.0),
    "adapt_weight": Bound(0.0),
    "workers": Bound(0, 64),
    "threads": Bound(1),
    "feature_views": Bound(0, 64),
    "nan_skip_limit": Bound(0),
    "save_every_steps": Bound(0),
    "keep_top_k": Bound(0),
    "profile_steps": Bound(0),
}
"""Each numeric option's range on its own (None, where a field allows it, is not checked)."""


def check_value(key: str, value, name: str | None = None) -> None:
    """One option's value on its own: its choices, its range, or lr's and in_chans' own rules. `name` is how
    the message calls it (the CLI's flag, e.g. --batch-size; default the field's name). The CLI checks each
    flag so as it parses it, before importing torch."""
    name = name or key
    if value is None:
        return
    if key in CHOICES:
        _choice(name, value, CHOICES[key])
    elif key in BOUNDS:
        _range(name, value, *BOUNDS[key])
    elif key == "lr" and value != "auto":
        try:
            number = float(value)  # the CLI's --lr is a string
        except ValueError:
            raise UserError(f"{name} must be a positive number or 'auto'; got '{value}'.") from None
        _range(name, number, 0.0, lo_open=True)
    elif key == "in_chans" and value not in (1, 3):
        raise UserError(f"{name} must be 1 (grayscale) or 3 (RGB), got {value}.")


CHECKED_ALONE = (*CHOICES, *BOUNDS, "lr", "in_chans")
"""The fields `check_value` checks."""


def validate(config) -> None:
    """Every range and choice of `config`, and the combinations that cannot run."""
    for key in CHECKED_ALONE:
        check_value(key, getattr(config, key))
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
    if (config.mixup or config.cutmix) and config.class_weights != "none":
        raise UserError(
            "class_weights cannot be combined with mixup/cutmix (soft targets); use "
            "--sampler balanced for imbalance instead."
        )
    if config.lr_min is not None and config.lr != "auto":
        _range("lr_min", config.lr_min, 0.0, config.lr, lo_open=True)
    if config.strategy == "lp-ft":
        _range("epochs (lp-ft needs a probe and a fine-tune phase)", config.epochs, 2)
        if config.lp_epochs is not None:
            _range("lp_epochs", config.lp_epochs, 1, config.epochs - 1)
    if config.val_fraction + config.test_fraction >= 0.95:
        raise UserError(
            f"val_fraction + test_fraction = {config.val_fraction + config.test_fraction:g} leaves "
            "almost nothing to train on; keep their sum below 0.95."
        )
    if config.strategy == "scratch" and config.weights not in ("auto", "none"):
        raise UserError(
            f"strategy 'scratch' trains from random initialisation, but weights='{config.weights}' "
            "was given. Drop --weights, or pick another strategy."
        )


BACKBONE_LRS = ("finetune", "full", "gradual", "lp-ft")
"""The strategies that train backbone groups at LRs of their own (layer decay, lr_min)."""
USED_BY = {
    "unfreeze_groups": ("finetune",),
    "gradual_every": ("gradual",),
    "lp_epochs": ("lp-ft",),
    "ft_lr_scale": ("lp-ft",),
    "backbone_lr_mult": ("finetune", "full", "gradual"),  # lp-ft fine-tunes at lr x ft_lr_scale throughout
    "layer_decay": BACKBONE_LRS,
    "lr_min": BACKBONE_LRS,
}
"""Options that only some strategies read, and those strategies (see training.strategy.make_plan)."""


def ignored_options(config, given=None, n_groups: int | None = None) -> list[str]:
    """A warning for each option of `config` that changes nothing in its run, or that another option
    overrides (saying which wins). `given`: the fields the user set (default: those that differ from their
    defaults); `n_groups`: the backbone's layer groups, where known (--unfreeze-groups beyond them)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    if given is None:
        given = {name for name, default in defaults.items() if getattr(config, name) != default}
    given = set(given)
    if config.plan:
        return [
            f"{_flag(name)} is ignored: the config's plan says what trains in each phase, and at which LR."
            for name in sorted(given & {"strategy", *USED_BY})
        ]
    notes = [
        f"{_flag(name)} {_value(getattr(config, name))} is ignored: strategy {config.strategy} does not use it "
        f"(it applies to {' and '.join(users) if len(users) < 3 else ', '.join(users)})."
        for name, users in USED_BY.items()
        if name in given and config.strategy not in users
    ]
    if config.strategy in BACKBONE_LRS and config.layer_decay is not None and "lr_min" in given:
        notes.append(
            f"--layer-decay and --lr-min both space the backbone's LRs: --layer-decay {config.layer_decay:g} "
            "wins, --lr-min is ignored."
        )
    spaced = config.layer_decay is not None or config.lr_min is not None
    if config.strategy in USED_BY["backbone_lr_mult"] and spaced and "backbone_lr_mult" in given:
        which = "--layer-decay" if config.layer_decay is not None else "--lr-min"
        notes.append(f"--backbone-lr-mult is ignored: {which} sets the LR of each backbone group.")
    if config.strategy == "finetune" and n_groups is not None and config.unfreeze_groups > n_groups:
        notes.append(
            f"--unfreeze-groups {config.unfreeze_groups} is more than the backbone's {n_groups} layer groups: "
            f"all {n_groups} train, as with --strategy full."
        )
    return notes


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


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
