"""torchvision's classic classifiers by their torchvision names, with the weights torchvision downloaded.

A user of torchvision's tutorials says `resnet18`, `vgg16`, `inception_v3` or `mobilenet_v2` and has the weights
in the torch hub cache ($TORCH_HOME/hub/checkpoints, files such as `resnet18-f37072fd.pth`). Each name is a timm
architecture whose forward is the same function as torchvision's for the same weights (tests hold the two within
1e-4): timm's own model of that name for ResNet, VGG, DenseNet, Inception v3 and EfficientNet-B0, and for the
MobileNets timm's MobileNetV2/V3 built as torchvision builds them (BatchNorm eps 1e-3 in V3), registered in timm
here as tv_mobilenet_v2 and tv_mobilenet_v3_small/large, so that timm's contract (group_matcher, pretrained_cfg,
create_model when a run is reloaded) holds for them as for any timm model. torchvision's state-dict layout is
converted when loaded.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import generate_default_cfgs, register_model

from transferkit.core.errors import UserError
from transferkit.models.layouts import remap_ordered


def _same(state: dict, target: dict, name: str, file: str) -> dict:
    return state


def _timm_filter(module: str, function: str) -> Callable[[dict, dict, str, str], dict]:
    """timm's own converter from torchvision's layout (VGG's classifier as convolutions; DenseNet's `norm.1`)."""
    return lambda state, target, name, file: getattr(importlib.import_module(module), function)(dict(state))


def _without_aux(state: dict, target: dict, name: str, file: str) -> dict:
    """Inception's auxiliary classifier only adds a training loss; the backbone leaves it out."""
    return {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}


def _in_order(state: dict, target: dict, name: str, file: str) -> dict:
    """Tensor by tensor in torchvision's order, every shape checked: timm's EfficientNet/MobileNet modules register
    the same tensors in the same order. A file that does not hold exactly torchvision's tensors passes unchanged
    (the load then names what differs). The stem may differ in input channels (adapted afterwards) and the head
    in classes (a head for other classes is replaced anyway)."""
    keys = _torchvision_keys(name)
    if set(state) - set(keys) or any(k not in state for k in keys if not k.endswith("num_batches_tracked")):
        return state
    head = tuple(k for k in target if k.startswith("classifier."))
    return remap_ordered(
        {k: state[k] for k in keys if k in state}, target, file, loose_in_chans=(next(iter(target)),), loose=head
    )


def _mobilenet_v3(state: dict, target: dict, name: str, file: str) -> dict:
    """MobileNetV3's 960 -> 1280 layer: a Linear in torchvision, the same map as a 1x1 convolution in timm."""
    state = dict(state)
    if state.get("classifier.0.weight") is not None and state["classifier.0.weight"].dim() == 2:
        state["classifier.0.weight"] = state["classifier.0.weight"][:, :, None, None]
    return _in_order(state, target, name, file)


@functools.cache
def _torchvision_keys(name: str) -> list[str]:
    """torchvision's state-dict keys for `name`, in its order (a file read from safetensors comes sorted)."""
    from torchvision.models import get_model

    with torch.device("meta"):
        return list(get_model(name, weights=None).state_dict())


@dataclass(frozen=True)
class Classic:
    """The timm architecture a torchvision name builds, and how torchvision's weights reach it."""

    arch: str
    convert: Callable[[dict, dict, str, str], dict] = _same
    """(torchvision's state dict, the model's own, the torchvision name, the file) -> the model's layout."""
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    """(mean, std) the timm module takes, where torchvision's model renormalises its input inside."""


CLASSICS = {
    **{f"resnet{d}": Classic(f"resnet{d}") for d in (18, 34, 50, 101)},
    **{
        f"vgg{d}{bn}": Classic(f"vgg{d}{bn}", _timm_filter("timm.models.vgg", "_filter_fn"))
        for d in (11, 13, 16, 19)
        for bn in ("", "_bn")
    },
    "densenet121": Classic("densenet121", _timm_filter("timm.models.densenet", "_filter_torchvision_pretrained")),
    # torchvision's inception_v3 with these weights maps its ImageNet-normalised input to mean/std 0.5 inside
    # (transform_input=True); timm's module takes the image normalised that way directly.
    "inception_v3": Classic("inception_v3", _without_aux, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))),
    "mobilenet_v2": Classic("tv_mobilenet_v2", _in_order),
    "mobilenet_v3_small": Classic("tv_mobilenet_v3_small", _mobilenet_v3),
    "mobilenet_v3_large": Classic("tv_mobilenet_v3_large", _mobilenet_v3),
    "efficientnet_b0": Classic("efficientnet_b0", _in_order),
}
"""torchvision's names that transferkit builds with torchvision's forward and finds torchvision's weights for."""

ALIASES = {name: c.arch for name, c in CLASSICS.items() if c.arch != name}
"""torchvision's names of the architectures registered here (timm's own names for them differ)."""


def classic_of(arch: str) -> str | None:
    """The torchvision name of timm architecture `arch` (tags ignored), if it is one of CLASSICS."""
    base = arch.split(".")[0]
    return next((name for name, c in CLASSICS.items() if c.arch == base), None)


def hub_checkpoints() -> Path:
    """The torch hub cache torchvision downloads weights to: $TORCH_HOME/hub/checkpoints (~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_weights(name: str) -> list[tuple[str, str]]:
    """(version, URL) of torchvision's ImageNet weights for `name`, oldest first."""
    from torchvision.models import get_model_weights

    return [(w.name, w.url) for w in get_model_weights(name) if w.name.startswith("IMAGENET1K_V")]


def _file(url: str) -> str:
    return url.rsplit("/", 1)[1]


def torchvision_files(name: str) -> list[str]:
    """File names of torchvision's ImageNet weights for `name` in the hub cache, oldest first."""
    return [_file(url) for _, url in torchvision_weights(name)]


def tag_of(version: str) -> str:
    """timm's tag for torchvision's weights version (IMAGENET1K_V1 -> tv_in1k, IMAGENET1K_V2 -> tv2_in1k)."""
    return "tv2_in1k" if version.endswith("V2") else "tv_in1k"


def tagged(arch: str, version: str) -> str:
    """timm architecture `arch` for torchvision's weights `version`: with timm's tag for them where timm has one
    (`resnet50.tv2_in1k`), else plain (timm's efficientnet_b0 has no such tag; the architecture is the same)."""
    base = arch.split(".")[0]
    return f"{base}.{tag_of(version)}" if timm.list_pretrained(f"{base}.{tag_of(version)}") else base


def _wanted(arch: str) -> tuple[str, list[tuple[str, str]]] | None:
    """(torchvision name, its (version, URL) newest first) that timm architecture `arch` takes, or None: a tv tag
    (`resnet50.tv_in1k`) asks for that version only; timm's other tags are timm's own weights."""
    name, tag = classic_of(arch), arch.partition(".")[2]
    if name is None or tag not in ("", "tv_in1k", "tv2_in1k"):
        return None
    return name, [(v, url) for v, url in reversed(torchvision_weights(name)) if not tag or tag == tag_of(v)]


def torchvision_file(arch: str) -> tuple[Path, str] | None:
    """(the newest torchvision ImageNet weights file that `arch` takes in the torch hub cache, its version)."""
    wanted = _wanted(arch)
    for version, url in wanted[1] if wanted else []:
        if (hub_checkpoints() / _file(url)).is_file():
            return hub_checkpoints() / _file(url), version
    return None


def looked_for(arch: str) -> list[str]:
    """The hub-cache file names `arch` would take, newest first (empty for other models)."""
    wanted = _wanted(arch)
    return [_file(url) for _, url in wanted[1]] if wanted else []


def version_of(file: str | Path, arch: str) -> str | None:
    """torchvision's weights version when `file` is named as torchvision's download of `arch`'s weights."""
    wanted = _wanted(arch)
    return next((v for v, url in wanted[1] if _file(url) == Path(file).name), None) if wanted else None


def download_torchvision(arch: str) -> tuple[Path, str]:
    """Download torchvision's newest ImageNet weights that `arch` takes into the torch hub cache, as torchvision
    does (the file name's hash prefix is checked); return (path, version)."""
    name, versions = _wanted(arch)
    version, url = versions[0]
    path = hub_checkpoints() / _file(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
    except Exception as err:  # no network, server errors, a hash that does not match
        raise UserError(
            f"Could not download torchvision's weights for '{name}' from {url} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Check the network, or put {path.name} "
            f"in {path.parent} by hand."
        ) from None
    return path, version


def torchvision_preprocessing(arch: str, version: str) -> dict:
    """torchvision's eval transforms for its weights `version` of timm architecture `arch`, as Preprocessing fields
    (normalisation as the timm module takes it)."""
    from torchvision.models import get_model_weights

    name = classic_of(arch)
    t = get_model_weights(name)[version].transforms()
    mean, std = CLASSICS[name].normalize or (tuple(t.mean), tuple(t.std))
    return {
        "img_size": t.crop_size[0],
        "crop_pct": t.crop_size[0] / t.resize_size[0],
        "interpolation": t.interpolation.value,
        "mean": mean,
        "std": std,
    }


def from_torchvision(
    state: dict[str, torch.Tensor], arch: str, target: dict[str, torch.Tensor], file: str
) -> dict[str, torch.Tensor]:
    """`state` in the layout of `target` (the model's own state dict) when it is in torchvision's; a state already
    in the model's layout, or for a model torchvision does not name, passes unchanged."""
    name = classic_of(arch)
    if name is None or set(state) <= set(target):
        return state
    return CLASSICS[name].convert(state, target, name, file)


def torchvision_name_of(file: str) -> str | None:
    """The torchvision model whose ImageNet weights are called `file` (a hub-cache file name), if any."""
    return next((n for n in CLASSICS if Path(file).name in torchvision_files(n)), None)


# The MobileNets, registered in timm as tv_mobilenet_* with torchvision's weights as tags (newest first, so the
# default tag is the newest): timm's MobileNetV2/V3 generators with torchvision's BatchNorm eps. The tv_ prefix
# keeps them clear of timm's own names, now and in later timm releases.
MOBILENETS = {"mobilenet_v2": {}, "mobilenet_v3_small": {"bn_eps": 1e-3}, "mobilenet_v3_large": {"bn_eps": 1e-3}}


def _timm_cfg(name: str, version: str) -> dict:
    """timm's pretrained config for torchvision's weights `version` of `name`: its URL and transforms."""
    from torchvision.models import get_model_weights

    url = get_model_weights(name)[version].url
    prep = torchvision_preprocessing(CLASSICS[name].arch, version)
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, prep["img_size"], prep["img_size"]),
        "crop_pct": prep["crop_pct"],
        "interpolation": prep["interpolation"],
        "mean": prep["mean"],
        "std": prep["std"],
        "first_conv": "conv_stem",
        "classifier": "classifier",
        "license": "bsd-3-clause",
        "origin_url": "https://github.com/pytorch/vision",
    }


default_cfgs = generate_default_cfgs(
    {
        f"{CLASSICS[name].arch}.{tag_of(version)}": _timm_cfg(name, version)
        for name in MOBILENETS
        for version, _ in reversed(torchvision_weights(name))
    }
)


def _build(generator: Callable, name: str, pretrained: bool, **kwargs):
    """A timm MobileNet as torchvision builds `name`; timm's own pretrained=True loads torchvision's file too."""
    arch = CLASSICS[name].arch
    filter_fn = lambda state, model: from_torchvision(state, arch, model.state_dict(), arch)  # noqa: E731
    return generator(arch, 1.0, pretrained=pretrained, pretrained_filter_fn=filter_fn, **MOBILENETS[name], **kwargs)


@register_model
def tv_mobilenet_v2(pretrained: bool = False, **kwargs):
    """torchvision's MobileNetV2 (ReLU6, BatchNorm eps 1e-5): timm's MobileNetV2 at width 1.0."""
    from timm.models.efficientnet import _gen_mobilenet_v2

    return _build(_gen_mobilenet_v2, "mobilenet_v2", pretrained, **kwargs)


@register_model
def tv_mobilenet_v3_small(pretrained: bool = False, **kwargs):
    """torchvision's MobileNetV3-Small: timm's at width 1.0 with BatchNorm eps 1e-3."""
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    return _build(_gen_mobilenet_v3, "mobilenet_v3_small", pretrained, **kwargs)


@register_model
def tv_mobilenet_v3_large(pretrained: bool = False, **kwargs):
    """torchvision's MobileNetV3-Large: timm's at width 1.0 with BatchNorm eps 1e-3."""
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    return _build(_gen_mobilenet_v3, "mobilenet_v3_large", pretrained, **kwargs)
