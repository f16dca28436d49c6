"""Before a run trains: will what it writes fit on the disk, and will a training step fit in memory?

Both are estimates, told as warnings that name the numbers; the run still starts (an estimate can be off, and
space may be freed meanwhile), and the figures go to runtime.json.

- Disk: last.ckpt (weights and optimizer moments) and best/, each held twice while a new copy replaces the old
  one, the top-k copies, the report and predictions in the run directory; the decoded-image and feature caches
  this run would build in the cache folder. When both are on one filesystem, they share its free space.
- Memory, on CPU (where a step too large is killed by the kernel, not raised as an error): weights, gradients
  and optimizer moments, plus activations: one forward at batch 1 with the output of every layer counted, times
  the micro-batch (ACTIVATIONS has the measurements). A killed run continues from its last.ckpt with --resume.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from transferkit.core.files import bytes_text, tensor_bytes
from transferkit.core.machine import cache_root
from transferkit.data.imagecache import cache_size

ACTIVATIONS = 1.0
"""A training step's peak memory growth over the sum of its layers' outputs at that batch. Measured against
the peak RSS growth of real steps, the sum came out a little above it (README, Reliability: the memory
estimate): it counts in-place activations twice and backward frees as it goes, so it stays on the safe side."""
REPORT_BYTES = 2 * 2**20
"""report.html (its PNGs inline), metrics and the other small files of a run, generously."""


def estimate(
    model: nn.Module, config, data, plan, prep, run_dir: Path, micro_batch: int, memory: bool
) -> tuple[dict, list[str]]:
    """(the run's estimates, for runtime.json; the warnings they call for). `memory`: a step's memory too (image
    models; on a CPU, where nothing else would warn before the kernel kills the run)."""
    dim = next(m for m in model.head.modules() if isinstance(m, nn.Linear)).in_features
    image = data.kind == "image"
    needs = disk_needs(model, config, data, plan, cache_size(prep) if image else 0, dim)
    warnings = disk_warnings(needs, run_dir, cache_root(config))
    out = {"disk": needs}
    if memory and image:
        example = torch.zeros(1, config.in_chans, prep.img_size, prep.img_size)  # any memory format
        trains_backbone = any(p.groups for p in plan)
        out["step_memory"] = step_memory(model, example, micro_batch, config.optimizer, trains_backbone)
        out["memory_available"] = available_memory()
        warnings.append(memory_warning(out["step_memory"], micro_batch, out["memory_available"]))
    return out, [w for w in warnings if w]


def disk_needs(model: nn.Module, config, data, plan, cache_side: int, feature_dim: int) -> dict[str, dict[str, int]]:
    """{"run": {what: bytes}, "cache": {what: bytes}} this run would write at most."""
    state = tensor_bytes(model.state_dict())
    trains_backbone = any(p.groups for p in plan)
    trainable = state if trains_backbone else tensor_bytes(model.head.state_dict())
    moments = 2 if config.optimizer == "adamw" else 1
    n = {s: len(data.splits[s]) for s in ("train", "val", "test")}
    run = {
        "last.ckpt x2 while replaced": 2 * (state + moments * trainable),
        "best/ x2 while replaced": 2 * state,
        "report, predictions": REPORT_BYTES + 4 * (n["val"] + n["test"]) * max(len(data.classes), 1),
    }
    if config.keep_top_k:
        run[f"top {config.keep_top_k} copies"] = config.keep_top_k * state
    cache = {}
    if config.image_cache and data.arrays is None and trains_backbone:
        cache["decoded images"] = (n["train"] + n["val"]) * cache_side**2 * config.in_chans
    if config.feature_cache and any(not p.groups for p in plan):
        cache["backbone features"] = (n["train"] * max(config.feature_views, 1) + n["val"]) * feature_dim * 4
    return {"run": run, "cache": cache}


def disk_warnings(needs: dict[str, dict[str, int]], run_dir: Path, cache_dir: Path) -> list[str]:
    """A warning per filesystem that lacks the room for what this run writes there."""
    places = {"run": Path(run_dir), "cache": Path(cache_dir)}
    by_fs: dict[int, list[str]] = {}
    for kind, folder in places.items():
        by_fs.setdefault(_existing(folder).stat().st_dev, []).append(kind)
    out = []
    for kinds in by_fs.values():
        parts = {
            f"{what} in {places[kind]}" if kind == "cache" else what: size
            for kind in kinds
            for what, size in needs[kind].items()
        }
        need, free = sum(parts.values()), shutil.disk_usage(_existing(places[kinds[0]])).free
        if need > free:
            listing = ", ".join(f"{what} {bytes_text(size, exact=False)}" for what, size in parts.items() if size)
            out.append(
                f"[transferkit] warning: this run may write {bytes_text(need)} to {places[kinds[0]]} and "
                f"{bytes_text(free)} are free there ({listing}). Free some space (old runs; the caches: "
                "`transferkit cache --clear`), or use another --runs-dir / --cache-dir; a run the disk stops "
                "continues with --resume."
            )
    return out


def _existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def step_memory(
    model: nn.Module, example: torch.Tensor, micro_batch: int, optimizer: str, trains_backbone: bool
) -> dict[str, int]:
    """Bytes of one training step: weights, gradients and moments, and activations (see the module docstring)."""
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = weights if trains_backbone else sum(p.numel() * p.element_size() for p in model.head.parameters())
    activations = layer_outputs(model, example) if trains_backbone else 0
    moments = 2 if optimizer == "adamw" else 1
    return {
        "weights": weights,
        "gradients and optimizer": (1 + moments) * trainable,
        "activations": int(ACTIVATIONS * activations * micro_batch),
    }


def layer_outputs(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of every leaf module's output for `example` (batch 1). In eval mode, without gradients: the same
    shapes as in training, and nothing changes (BN statistics, random streams)."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        total += sum(t.numel() * t.element_size() for t in _tensors(output))

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return total


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in _tensors(o)]
    return []


def available_memory() -> int | None:
    """Bytes the kernel can still give (MemAvailable), where it says."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_warning(need: dict[str, int], micro_batch: int, available: int | None) -> str | None:
    total = sum(need.values())
    if available is None or total <= available:
        return None
    listing = ", ".join(f"{what} {bytes_text(size, exact=False)}" for what, size in need.items())
    return (
        f"[transferkit] warning: a training step at micro-batch {micro_batch} needs about {bytes_text(total)} "
        f"({listing}) and {bytes_text(available)} of memory are available: the kernel may kill the run. Use a "
        f"smaller --batch-size, or --accumulate 2 to keep the global batch; a killed run continues from its "
        "last.ckpt with --resume."
    )
