"""Strategies as data: a plan of phases, each saying what trains, at which LR, and how BN behaves.

Trainability is a set of small pure functions over `named_parameters()`: the optimizer only
ever sees parameters that train, and the BatchNorm policy is applied explicitly after
`model.train()` every epoch. Named strategies resolve to plans; a config may also spell a
plan out (`plan:` in YAML, a list of phases with the fields of `Phase`).

BatchNorm policies:
- `train`: norm layers inside training groups update their running statistics; norm layers
  in frozen groups stay in eval mode, so their statistics never move.
- `eval`: every backbone norm layer keeps its running statistics; affine parameters still train.
- `frozen`: as `eval`, and the affine parameters are frozen too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from torch import nn

from transferkit.core.errors import UserError, did_you_mean
from transferkit.core.registry import STRATEGIES
from transferkit.models.classifier import Classifier

BN_POLICIES = ("train", "eval", "frozen")


@dataclass
class Phase:
    """One stretch of training with fixed trainability and its own LR schedule."""

    name: str
    epochs: int
    groups: list[int]
    """Indices of the backbone layer groups that train (0 = stem); the head always trains."""
    backbone_lr_mult: float = 0.1
    """LR of training backbone groups = phase LR x this (ignored when layer_decay is set)."""
    bn: str = "train"
    """BatchNorm policy: train | eval | frozen (see module docstring)."""
    lr_scale: float = 1.0
    """Phase LR = config lr x this (lp-ft fine-tunes at a lower LR than it probes)."""
    layer_decay: float | None = None
    """Group i of n trains at phase LR x layer_decay^(n - i): the top group x decay, the stem least."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Phase:
        return cls(**d)


def make_plan(config, n_groups: int) -> list[Phase]:
    """Resolve the config's strategy (or its explicit `plan`) for a backbone with `n_groups` groups: the
    strategy's plan builder, registered in `core.registry.STRATEGIES`."""
    if config.plan:
        return parse_plan(config.plan, n_groups)
    return STRATEGIES.load(config.strategy)(config, n_groups)


def linear_probe(config, n_groups: int) -> list[Phase]:
    return [Phase("linear-probe", config.epochs, [], 0.0, "frozen")]


def finetune(config, n_groups: int) -> list[Phase]:
    top = list(range(max(0, n_groups - config.unfreeze_groups), n_groups))
    decay = layer_decay_for(config, n_groups)
    return [Phase("finetune", config.epochs, top, config.backbone_lr_mult, "train", layer_decay=decay)]


def full(config, n_groups: int) -> list[Phase]:
    every, decay = list(range(n_groups)), layer_decay_for(config, n_groups)
    return [Phase("full", config.epochs, every, config.backbone_lr_mult, "train", layer_decay=decay)]


def scratch(config, n_groups: int) -> list[Phase]:
    return [Phase("scratch", config.epochs, list(range(n_groups)), 1.0, "train")]


def lp_ft(config, n_groups: int) -> list[Phase]:
    probe = config.lp_epochs or max(1, config.epochs // 2)
    decay = layer_decay_for(config, n_groups)
    return [
        Phase("lp", probe, [], 0.0, "frozen"),
        # BN statistics stay as pretrained while fine-tuning: measured on builtin:faces 5-shot,
        # 3 seeds, test accuracy 0.98 with "eval" against 0.79 with "train" (tiny batches)
        Phase("ft", config.epochs - probe, list(range(n_groups)), 1.0, "eval", config.ft_lr_scale, decay),
    ]


def gradual(config, n_groups: int) -> list[Phase]:
    plan, unfrozen, left = [], 0, config.epochs
    decay = layer_decay_for(config, n_groups)
    while left > 0:
        length = left if unfrozen >= n_groups else min(config.gradual_every, left)
        top = list(range(n_groups - unfrozen, n_groups)) if unfrozen else []
        bn = "train" if top else "frozen"
        plan.append(Phase(f"gradual-{unfrozen}", length, top, config.backbone_lr_mult, bn, layer_decay=decay))
        unfrozen, left = unfrozen + 1, left - length
    return plan


def layer_decay_for(config, n_groups: int) -> float | None:
    """--layer-decay as given, or the decay that spaces LRs from lr_min (stem) to lr (head), fastai's slice."""
    if config.layer_decay is not None:
        return config.layer_decay
    if config.lr_min is not None:
        return (config.lr_min / config.lr) ** (1.0 / n_groups)
    return None


def parse_plan(phases: list, n_groups: int) -> list[Phase]:
    """Phases written in a config: `groups` is a list of indices, 'all', 'none' or 'top:K'."""
    known = {f.name for f in fields(Phase)}
    plan = []
    for i, raw in enumerate(phases):
        if not isinstance(raw, dict) or "epochs" not in raw:
            raise UserError(f"plan[{i}] must be a mapping with at least 'epochs' and 'groups'; got {raw!r}.")
        for key in raw:
            if key not in known:
                raise UserError(
                    f"Unknown key '{key}' in plan[{i}].{did_you_mean(key, known)} "
                    f"Valid keys: {', '.join(sorted(known))}."
                )
        spec = raw.get("groups", "all")
        if spec == "all":
            groups = list(range(n_groups))
        elif spec == "none":
            groups = []
        elif isinstance(spec, str) and spec.startswith("top:"):
            groups = list(range(max(0, n_groups - int(spec[4:])), n_groups))
        elif isinstance(spec, list) and all(isinstance(g, int) and 0 <= g < n_groups for g in spec):
            groups = sorted(spec)
        else:
            raise UserError(
                f"plan[{i}].groups must be 'all', 'none', 'top:K' or a list of indices 0..{n_groups - 1}; got {spec!r}."
            )
        phase = Phase(**{"name": f"phase-{i}", "bn": "train" if groups else "frozen", **raw, "groups": groups})
        if phase.bn not in BN_POLICIES or phase.epochs < 1:
            raise UserError(
                f"plan[{i}]: bn must be one of {', '.join(BN_POLICIES)} and epochs >= 1; "
                f"got bn={phase.bn!r}, epochs={phase.epochs}."
            )
        plan.append(phase)
    return plan


def apply_phase(model: Classifier, groups: list[list[str]], phase: Phase) -> None:
    """Set requires_grad: the head and the phase's groups train, everything else is frozen."""
    training = {name for i in phase.groups for name in groups[i]}
    for name, param in model.backbone.named_parameters():
        param.requires_grad = name in training
    if phase.bn == "frozen":
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                for param in module.parameters(recurse=False):
                    param.requires_grad = False
    for param in model.head.parameters():
        param.requires_grad = True


def trainable_groups(model: Classifier, groups: list[list[str]]) -> list[int]:
    """Indices of the groups that actually have a parameter with requires_grad (read off the model)."""
    params = dict(model.backbone.named_parameters())
    return [i for i, names in enumerate(groups) if any(params[n].requires_grad for n in names)]


def set_train_mode(model: Classifier, phase: Phase) -> None:
    """model.train(), then eval mode for frozen parts (BN statistics, dropout) per the BN policy."""
    model.train()
    for module in model.backbone.modules():
        params = list(module.parameters())
        frozen = bool(params) and not any(p.requires_grad for p in params)
        held_norm = phase.bn != "train" and isinstance(module, nn.modules.batchnorm._NormBase)
        if frozen or held_norm:
            module.eval()


def group_lr_mults(phase: Phase, n_groups: int) -> list[float]:
    """LR multiplier of each backbone group (relative to the head) in this phase."""
    if phase.layer_decay is not None:
        return [phase.layer_decay ** (n_groups - i) for i in range(n_groups)]
    return [phase.backbone_lr_mult] * n_groups


def param_groups(
    model: Classifier, groups: list[list[str]], phase: Phase, lr: float, weight_decay: float
) -> list[dict]:
    """Optimizer groups: head at lr x lr_scale, each backbone group at its multiplier; no weight
    decay on norms and biases (1-D tensors); frozen parameters are left out entirely."""
    params = dict(model.backbone.named_parameters())
    base = lr * phase.lr_scale
    parts = [(list(model.head.parameters()), base)]
    for i, mult in enumerate(group_lr_mults(phase, len(groups))):
        parts.append(([params[n] for n in groups[i]], base * mult))
    out = []
    for members, part_lr in parts:
        decay = [p for p in members if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in members if p.requires_grad and p.ndim <= 1]
        for chosen, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if chosen:
                out.append({"params": chosen, "lr": part_lr, "weight_decay": wd})
    return out


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
