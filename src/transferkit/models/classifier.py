"""Backbone + head, and the preprocessing that comes with the backbone.

The backbone is any timm model with its classifier removed (`reset_classifier(0)`), so it
returns pooled features for every architecture; the head is ours (linear or MLP). Layer
groups come from timm's `group_matcher`, so no code here names a model family. torchvision's
classic names are timm architectures too (see tvmodels).
"""

from __future__ import annotations

import torch
from torch import nn

from transferkit.core.errors import UserError
from transferkit.data.preprocessing import Preprocessing
from transferkit.models.tvmodels import tagged, torchvision_preprocessing
from transferkit.models.weights import Weights, load_pretrained, locate_weights, resolve_arch


class Classifier(nn.Module):
    """A timm backbone that returns pooled features, followed by a classification head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The head on pooled features; `pre_logits`: stop at the input of its last linear layer (what
        domain adaptation aligns)."""
        features = self.head[:-1](features)
        return features if pre_logits else self.head[-1](features)


def make_head(features: int, num_classes: int, kind: str, hidden: int, dropout: float) -> nn.Module:
    """A linear head; an MLP with one hidden layer; or a bottleneck, the MLP with BatchNorm before its ReLU
    (the domain adaptation head of Long et al. and thuml's library). Dropout sits before the last linear."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))
    norm = [nn.BatchNorm1d(hidden)] if kind == "bottleneck" else []
    return nn.Sequential(
        nn.Linear(features, hidden), *norm, nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def create_backbone(
    model: str, weights: str, in_chans: int, img_size: int | None, drop_path: float = 0.0, trust: bool = False
) -> tuple[nn.Module, str, Weights]:
    """Build timm model `model` with its pretrained (1000-class) head and load `weights`.

    Returns (module, timm architecture, where the weights came from). The head is still
    attached so that ImageNet predictions can be checked; callers reset it.
    """
    import timm

    arch = resolve_arch(model)
    found = locate_weights(arch, weights)
    if found.version is not None:  # torchvision's weights: timm's tag for them, if it has one
        arch = tagged(arch, found.version)
    kwargs = {"in_chans": in_chans}
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size and img_size is not None:
        kwargs["img_size"] = img_size
    if cfg is not None and cfg.num_classes:
        kwargs["num_classes"] = cfg.num_classes
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        backbone = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"timm cannot build model '{model}' with {kwargs}: {err}") from None
    load_pretrained(backbone, arch, found, in_chans, trust)
    return backbone, arch, found


def preprocessing_for(
    backbone: nn.Module, in_chans: int, img_size: int | None, weights: dict | None = None
) -> Preprocessing:
    """Preprocessing from the backbone's pretrained config, or `weights`' own (Preprocessing fields: torchvision's
    transforms for its weights); `img_size` overrides the resolution."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=backbone)
    fields = {
        "img_size": cfg["input_size"][-1],
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        **(weights or {}),
    }
    if in_chans == 1 and len(fields["mean"]) == 3:
        fields["mean"], fields["std"] = (sum(fields["mean"]) / 3,), (sum(fields["std"]) / 3,)
    return Preprocessing(**{**fields, "img_size": img_size or fields["img_size"]}, in_chans=in_chans)


def feature_dim(backbone: nn.Module, in_chans: int, img_size: int) -> int:
    """Width of the pooled features, measured with one dummy forward pass."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, in_chans, img_size, img_size))
    backbone.train(was_training)
    return int(out.shape[-1])


def build_classifier(
    model: str,
    weights: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    img_size: int | None = None,
    head: str = "linear",
    head_hidden: int = 512,
    head_dropout: float = 0.0,
    drop_path: float = 0.0,
    trust: bool = False,
) -> tuple[Classifier, dict, Preprocessing]:
    """Pretrained backbone + new head for `num_classes`.

    Returns (classifier, architecture record for model.json, preprocessing).
    """
    backbone, arch, found = create_backbone(model, weights, in_chans, img_size, drop_path, trust)
    backbone.reset_classifier(0)
    prep = preprocessing_for(
        backbone,
        in_chans,
        img_size,  # torchvision's weights: torchvision's transforms
        torchvision_preprocessing(arch, found.version) if found.version else None,
    )
    features = feature_dim(backbone, in_chans, prep.img_size)
    record = {
        "model": model,
        "arch": arch,
        "weights": str(found),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "features": features,
        "head": head,
        "head_hidden": head_hidden,
        "head_dropout": head_dropout,
        "fixed_img_size": prep.img_size,
    }
    return Classifier(backbone, make_head(features, num_classes, head, head_hidden, head_dropout)), record, prep


def rebuild_classifier(record: dict) -> Classifier:
    """An untrained classifier with exactly the structure described by `record` (model.json)."""
    import timm

    kwargs = {"in_chans": record["in_chans"], "num_classes": 0}
    cfg = timm.models.get_pretrained_cfg(record["arch"])
    if cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = record["fixed_img_size"]
    backbone = timm.create_model(record["arch"], pretrained=False, **kwargs)
    head = make_head(
        record["features"], record["num_classes"], record["head"], record["head_hidden"], record["head_dropout"]
    )
    return Classifier(backbone, head)


def layer_groups(backbone: nn.Module) -> list[list[str]]:
    """Backbone parameter names grouped bottom (stem) to top, from timm's group_matcher."""
    from timm.models import group_parameters

    if hasattr(backbone, "group_matcher"):
        grouped = group_parameters(backbone, backbone.group_matcher(coarse=True))
        return [list(grouped[k]) for k in sorted(grouped)]
    groups: dict[str, list[str]] = {}
    for name, _ in backbone.named_parameters():
        groups.setdefault(name.split(".")[0], []).append(name)
    return list(groups.values())
