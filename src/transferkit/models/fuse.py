"""Inference-only speedups for a frozen backbone: BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel affine map, so it can be merged into the preceding
convolution's weights and bias, saving a full pass over every activation. Pairs are found
without per-model code: a Conv2d registered directly before a BatchNorm2d of matching width
in the same parent (timm's convnets and torchvision's ResNets register them in execution
order). The fused copy is checked against the original on a random batch and discarded if
the outputs differ, so a model registered in another order is never silently changed.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def fold_batchnorm(module: nn.Module, example: torch.Tensor, rtol: float = 1e-3) -> nn.Module:
    """An eval-mode copy of `module` with conv+BN pairs folded, or `module` itself if none fold cleanly."""
    fused = copy.deepcopy(module).eval()
    folded = 0
    for parent in list(fused.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            # any Conv2d subclass (timm's Conv2dSame pads with zeros first: still linear, still foldable)
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.num_features == conv.out_channels
                and bn.track_running_stats
            ):
                _fold(conv, bn)
                setattr(parent, bn_name, _after_bn(bn))
                folded += 1
    if not folded:
        return module
    with torch.inference_mode():
        module_was_training = module.training
        module.eval()
        want, got = module(example), fused(example)
        module.train(module_was_training)
    if not torch.allclose(want, got, rtol=rtol, atol=rtol * float(want.abs().max())):
        return module
    return fused


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
    with torch.no_grad():
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        conv.bias = nn.Parameter(bias * scale + shift)


def _after_bn(bn: nn.Module) -> nn.Module:
    """What a folded norm layer still does: timm's BatchNormAct2d applies dropout and activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()
