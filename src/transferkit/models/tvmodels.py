"""torchvision's classic classifiers by their torchvision names, with the weights torchvision downloaded.

A user of torchvision's tutorials says `resnet18`, `vgg16`, `inception_v3` or `mobilenet_v2` and has the weights
in the torch hub cache ($TORCH_HOME/hub/checkpoints, files such as `resnet18-f37072fd.pth`). Each name is a timm
architecture whose forward is the same function as torchvision's for the same weights (tests hold the two within
1e-4): timm's own model of that name for ResNet, VGG, DenseNet, Inception v3 and EfficientNet-B0, and for the
MobileNets timm's MobileNetV2/V3 built as torchvision builds them (BatchNorm eps 1e-3 in V3), registered in timm
here under torchvision's names, so that timm's contract (group_matcher, pretrained_cfg, create_model when a run
is reloaded) holds for them as for any timm model. torchvision's state-dict layout is converted when loaded.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from timm.models import generate_default_cfgs, register_model

from transferkit.core.errors import UserError
from transferkit.models.layouts import remap_ordered


def _same(state: dict, target: dict, name: str) -> dict:
    return state


def _timm_filter(module: str, function: str) -> Callable[[dict, dict, str], dict]:
    """timm's own converter from torchvision's layout (VGG's classifier as convolutions; DenseNet's `norm.1`)."""
    return lambda state, target, name: getattr(importlib.import_module(module), function)(dict(state))


def _without_aux(state: dict, target: dict, name: str) -> dict:
    """Inception's auxiliary classifier only adds a training loss; the backbone leaves it out."""
    return {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}


def _in_order(state: dict, target: dict, name: str) -> dict:
    """Tensor by tensor in order, every shape checked: timm's EfficientNet/MobileNet modules register the same
    tensors in the same order as torchvision's. The first tensor, the stem convolution, may differ in input
    channels (adapted afterwards)."""
    return remap_ordered(state, target, name, loose_in_chans=(next(iter(target)),))


def _mobilenet_v3(state: dict, target: dict, name: str) -> dict:
    """MobileNetV3's 960 -> 1280 layer: a Linear in torchvision, the same map as a 1x1 convolution in timm."""
    state = dict(state)
    if state.get("classifier.0.weight") is not None and state["classifier.0.weight"].dim() == 2:
        state["classifier.0.weight"] = state["classifier.0.weight"][:, :, None, None]
    return _in_order(state, target, name)


@dataclass(frozen=True)
class Classic:
    """How a torchvision name's weights reach the timm architecture of the same name."""

    convert: Callable[[dict, dict, str], dict] = _same
    """torchvision's state dict (, the model's own, the file's name) -> the model's layout."""
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """(mean, std) the timm module takes, where torchvision's model renormalises its input inside."""


CLASSICS = {
    **{f"resnet{d}": Classic() for d in (18, 34, 50, 101)},
    **{f"vgg{d}{bn}": Classic(_timm_filter("timm.models.vgg", "_filter_fn"))
       for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    "densenet121": Classic(_timm_filter("timm.models.densenet", "_filter_torchvision_pretrained")),
    # torchvision's inception_v3 with these weights maps its ImageNet-normalised input to mean/std 0.5 inside
    # (transform_input=True); timm's module takes the image normalised that way directly.
    "inception_v3": Classic(_without_aux, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
    "mobilenet_v2": Classic(_in_order),
    "mobilenet_v3_small": Classic(_mobilenet_v3),
    "mobilenet_v3_large": Classic(_mobilenet_v3),
    "efficientnet_b0": Classic(_in_order),
}
"""torchvision's names that transferkit builds with torchvision's forward and finds torchvision's weights for."""


def hub_checkpoints() -> Path:
    """The torch hub cache torchvision downloads weights to: $TORCH_HOME/hub/checkpoints (~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights(name: str) -> list[tuple[str, str]]:
    """(version, URL) of torchvision's ImageNet weights for `name`, oldest first."""
    from torchvision.models import get_model_weights

    return [(w.name, w.url) for w in get_model_weights(name) if w.name.startswith("IMAGENET1K_V")]


def torchvision_files(name: str) -> list[str]:
    """File names of torchvision's ImageNet weights for `name` in the hub cache, oldest first."""
    return [url.rsplit("/", 1)[1] for _, url in torchvision_weights(name)]


def tag_of(version: str) -> str:
    """timm's tag for torchvision's weights version (IMAGENET1K_V1 -> tv_in1k, IMAGENET1K_V2 -> tv2_in1k)."""
    return "tv2_in1k" if version.endswith("V2") else "tv_in1k"


def tagged(name: str, version: str) -> str:
    """The timm architecture for torchvision's weights `version` of `name`: with timm's tag for them where timm has
    one (`resnet50.tv2_in1k`), else the plain name (timm's efficientnet_b0 has none; the architecture is the same)."""
    tag = tag_of(version)
    return f"{name}.{tag}" if timm.list_pretrained(f"{name}.{tag}") else name


def torchvision_file(arch: str) -> tuple[Path, str] | None:
    """(the newest torchvision ImageNet weights file of `arch` in the torch hub cache, its version), or None.

    A tv tag (`resnet50.tv_in1k`) asks for that version only; timm's other tags are timm's own weights."""
    name, _, tag = arch.partition(".")
    if name not in CLASSICS or tag not in ("", "tv_in1k", "tv2_in1k"):
        return None
    for version, url in reversed(torchvision_weights(name)):
        path = hub_checkpoints() / url.rsplit("/", 1)[1]
        if (not tag or tag == tag_of(version)) and path.is_file():
            return path, version
    return None


def download_torchvision(name: str) -> tuple[Path, str]:
    """Download torchvision's newest ImageNet weights of `name` into the torch hub cache, as torchvision does
    (the file name's hash prefix is checked); return (path, version)."""
    version, url = torchvision_weights(name)[-1]
    path = hub_checkpoints() / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
    except Exception as err:  # no network, server errors, a hash that does not match
        raise UserError(f"Could not download torchvision's weights for '{name}' from {url} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). Check the network, or put the file in "
                        f"{path.parent} by hand.") from None
    return path, version


def torchvision_preprocessing(name: str, version: str) -> dict:
    """torchvision's eval transforms for those weights, as Preprocessing fields (normalisation as the timm
    module takes it)."""
    from torchvision.models import get_model_weights

    t = get_model_weights(name)[version].transforms()
    mean, std = CLASSICS[name].normalize or (tuple(t.mean), tuple(t.std))
    return {"img_size": t.crop_size[0], "crop_pct": t.crop_size[0] / t.resize_size[0],
            "interpolation": t.interpolation.value, "mean": mean, "std": std}


def from_torchvision(state: dict[str, torch.Tensor], arch: str, target: dict[str, torch.Tensor],
                     name: str) -> dict[str, torch.Tensor]:
    """`state` in the layout of `target` (the model's own state dict) when it is in torchvision's; a state already
    in the model's layout, or for a model torchvision does not name, passes unchanged."""
    classic = CLASSICS.get(arch.split(".")[0])
    if classic is None or set(state) <= set(target):
        return state
    return classic.convert(state, target, name)


def torchvision_name_of(file: str) -> str | None:
    """The torchvision model whose ImageNet weights are called `file` (a hub-cache file name), if any."""
    return next((n for n in CLASSICS if Path(file).name in torchvision_files(n)), None)


# The MobileNets, registered in timm under torchvision's names with torchvision's weights as tags (newest first,
# so the default tag is the newest): timm's MobileNetV2/V3 generators with torchvision's BatchNorm eps.
MOBILENETS = {"mobilenet_v2": {}, "mobilenet_v3_small": {"bn_eps": 1e-3}, "mobilenet_v3_large": {"bn_eps": 1e-3}}


def _pretrained_cfg(name: str, version: str) -> dict:
    from torchvision.models import get_model_weights

    url = get_model_weights(name)[version].url
    prep = torchvision_preprocessing(name, version)
    return {"url": url, "num_classes": 1000, "input_size": (3, prep["img_size"], prep["img_size"]),
            "crop_pct": prep["crop_pct"], "interpolation": prep["interpolation"], "mean": prep["mean"],
            "std": prep["std"], "first_conv": "conv_stem", "classifier": "classifier", "license": "bsd-3-clause",
            "origin_url": "https://github.com/pytorch/vision"}


default_cfgs = generate_default_cfgs({f"{name}.{tag_of(version)}": _pretrained_cfg(name, version)
                                      for name in MOBILENETS for version, _ in reversed(torchvision_weights(name))})


def _build(generator: Callable, name: str, pretrained: bool, **kwargs):
    """A timm MobileNet as torchvision builds `name`; timm's own pretrained=True loads torchvision's file too."""
    filter_fn = lambda state, model: CLASSICS[name].convert(state, model.state_dict(), name)  # noqa: E731
    return generator(name, 1.0, pretrained=pretrained, pretrained_filter_fn=filter_fn, **MOBILENETS[name], **kwargs)


@register_model
def mobilenet_v2(pretrained: bool = False, **kwargs):
    """torchvision's MobileNetV2 (ReLU6, BatchNorm eps 1e-5): timm's MobileNetV2 at width 1.0."""
    from timm.models.efficientnet import _gen_mobilenet_v2

    return _build(_gen_mobilenet_v2, "mobilenet_v2", pretrained, **kwargs)


@register_model
def mobilenet_v3_small(pretrained: bool = False, **kwargs):
    """torchvision's MobileNetV3-Small: timm's at width 1.0 with BatchNorm eps 1e-3."""
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    return _build(_gen_mobilenet_v3, "mobilenet_v3_small", pretrained, **kwargs)


@register_model
def mobilenet_v3_large(pretrained: bool = False, **kwargs):
    """torchvision's MobileNetV3-Large: timm's at width 1.0 with BatchNorm eps 1e-3."""
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    return _build(_gen_mobilenet_v3, "mobilenet_v3_large", pretrained, **kwargs)

