"""Strategies as data: a plan of phases, each saying what trains, at which LR, and how BN behaves.

Trainability is a set of small pure functions over `named_parameters()`: the optimizer only
ever sees parameters that train, and the BatchNorm policy is applied explicitly after
`model.train()` every epoch.

BatchNorm policies:
- `train`: norm layers inside training groups update their running statistics; norm layers
  in frozen groups stay in eval mode, so their statistics never move.
- `eval`: every backbone norm layer keeps its running statistics; affine parameters still train.
- `frozen`: as `eval`, and the affine parameters are frozen too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from transferkit.model import Classifier

BN_POLICIES = ("train", "eval", "frozen")


@dataclass
class Phase:
    """One stretch of training with fixed trainability."""

    name: str
    epochs: int
    groups: list[int]
    """Indices of the backbone layer groups that train (0 = stem); the head always trains."""
    backbone_lr_mult: float
    """LR of training backbone groups = head LR x this."""
    bn: str
    """BatchNorm policy: train | eval | frozen (see module docstring)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Phase:
        return cls(**d)


def make_plan(strategy: str, n_groups: int, epochs: int, unfreeze_groups: int = 3,
              backbone_lr_mult: float = 0.1) -> list[Phase]:
    """Resolve a named strategy to its phases for a backbone with `n_groups` layer groups."""
    every = list(range(n_groups))
    if strategy == "linear-probe":
        return [Phase("linear-probe", epochs, [], 0.0, "frozen")]
    if strategy == "finetune":
        top = every[max(0, n_groups - unfreeze_groups):]
        return [Phase("finetune", epochs, top, backbone_lr_mult, "train")]
    if strategy == "full":
        return [Phase("full", epochs, every, backbone_lr_mult, "train")]
    if strategy == "scratch":
        return [Phase("scratch", epochs, every, 1.0, "train")]
    raise ValueError(f"unknown strategy {strategy!r}")  # config validation makes this unreachable


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


def set_train_mode(model: Classifier, phase: Phase) -> None:
    """model.train(), then eval mode for frozen parts (BN statistics, dropout) per the BN policy."""
    model.train()
    for module in model.backbone.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
        elif phase.bn != "train" and isinstance(module, nn.modules.batchnorm._NormBase):
            module.eval()


def param_groups(model: Classifier, phase: Phase, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: head at `lr`, backbone at `lr x mult`; no weight decay on norms and biases."""
    out = []
    for part, part_lr in ((model.head, lr), (model.backbone, lr * phase.backbone_lr_mult)):
        decay, no_decay = [], []
        for param in part.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "lr": part_lr, "weight_decay": wd})
    return out


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
