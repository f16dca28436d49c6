"""Which floating-point precision each kind of work runs in: fp32, or bf16 autocast.

Two kinds of work, chosen separately because bf16 pays off differently for each:
- "train": forward + backward of a training step;
- "infer": the eval forward (validation, test, frozen-feature extraction, predict).

`precision auto` resolves per kind:
- CUDA: bf16 where the GPU supports it.
- A CPU without native bf16 (no avx512_bf16, no AMX): fp32. bf16 autocast still runs there,
  emulated, and is far slower (benchmarks/results/precision.md; README, Precision).
- A CPU with native bf16: a timing probe on first use. A copy of the model runs a few batches of
  that kind of work in both precisions (interleaved, best of 3 after a warm-up) and bf16 is
  chosen only if at least `FASTER_BY` times faster. The result is cached per CPU, torch version,
  model, input shape and kind in <cache>/precision.json, so a machine always makes the same
  choice for the same work. Why a probe and not a table: on one CPU bf16 made lite0's inference
  and ResNet-50's training faster but lite0's training step slower (README, Precision;
  benchmarks/results/precision-epyc-zen5-2026-11-26.md), so the answer depends on the model and the size,
  not only on the CPU.

Equal results. Inside a run (training steps, feature extraction, validation, test) the test is
test accuracy within noise, measured in benchmarks/results/precision.md. Serving a finished model
(`predict`, `evaluate`) must agree with fp32: bf16 moves lite0's logits and flipped the top-1 of
some test images of small, under-confident models (benchmarks/results/precision.md). So where bf16 would be
faster for inference, `train` checks at its end that the best model's top-1 in bf16 agrees with
fp32 on at least `AGREEMENT` of its own validation and test images, and records the share in the
bundle; auto serves in bf16 only from a bundle that passed (`for_serving`).
`TRANSFERKIT_CPU_BF16=1` (or 0) overrides the CPU-flag detection, so the suite runs both
branches on any CPU (bf16 autocast is emulated where it is not native).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

KINDS = ("train", "infer")
FASTER_BY = 1.15
"""bf16 must beat fp32 by this factor: below it, timing noise and bf16's rounding are not worth it."""
AGREEMENT = 0.995
"""Serving in bf16 needs this share of top-1 agreement with fp32 on the run's own val + test images."""


@dataclass(frozen=True)
class Choice:
    precision: str
    reason: str


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX in /proc/cpuinfo (Linux), unless $TRANSFERKIT_CPU_BF16 says 1 or 0."""
    forced = os.environ.get("TRANSFERKIT_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Workload:
    """What a probe times: the model as it will run, its input batch shape and a name for the cache key."""

    model: nn.Module
    name: str
    shape: tuple[int, int, int, int]
    channels_last: bool = True

    @classmethod
    def of(cls, model: nn.Module, name: str, prep, batch: int, channels_last: bool = True) -> Workload | None:
        """`model` (called `name`) on batches of `batch` images shaped as its preprocessing `prep` makes them;
        None for inputs a probe cannot make up (token ids): auto then decides without timing."""
        shape = prep.example_shape(batch)
        return None if shape is None else cls(model, f"{name} {shape[1]}ch", shape, channels_last)


def choose(
    requested: str,
    device: torch.device,
    kind: str,
    workload: Workload | None = None,
    cache_file: Path | None = None,
    say=None,
) -> Choice:
    """The precision of `kind` work on `device`: `requested` unless it is auto (see the module text).
    `say(line)` is told when a probe runs (it takes seconds)."""
    if requested != "auto":
        return Choice(requested, "asked for")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Choice("bf16" if ok else "fp32", "CUDA GPU with bf16" if ok else "this GPU has no bf16")
    if not cpu_has_native_bf16():
        return Choice("fp32", "CPU without native bf16 (avx512_bf16/AMX): emulated bf16 is slower")
    if workload is None:
        return Choice("fp32", "nothing to measure")
    speeds = probe(workload, kind, cache_file, say)
    ratio = speeds["bf16"] / speeds["fp32"]
    return Choice(
        "bf16" if ratio >= FASTER_BY else "fp32",
        f"measured here: bf16 {speeds['bf16']:.0f} img/s, fp32 {speeds['fp32']:.0f} img/s "
        f"({ratio:.2f}x; bf16 when >= {FASTER_BY}x)",
    )


def probe(workload: Workload, kind: str, cache_file: Path | None = None, say=None) -> dict[str, float]:
    """Images per second in fp32 and bf16 for `kind` work, from the cache or measured now (and cached)."""
    key = (
        f"{cpu_name()} | {os.cpu_count()} cores, {torch.get_num_threads()} threads | torch {torch.__version__} "
        f"| {workload.name} {kind} {'x'.join(map(str, workload.shape))}"
        f"{' channels_last' if workload.channels_last else ''}"
    )
    table = _read(cache_file)
    if key not in table:
        if say is not None:
            say(f"[transferkit] timing {kind} in fp32 and bf16 once for this CPU and model (cached in {cache_file})")
        table = {**_read(cache_file), key: measure(workload, kind)}
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(cache_file)
    return table[key]


def _read(cache_file: Path | None) -> dict:
    try:
        return json.loads(cache_file.read_text()) if cache_file is not None else {}
    except (OSError, ValueError):  # missing or damaged: measure again
        return {}


def measure(workload: Workload, kind: str, reps: int = 3) -> dict[str, float]:
    """Time `kind` work on a copy of the model (the model itself, its BN statistics and gradients stay
    untouched, and so do the random streams: the first run to measure trains as the runs that read the cache):
    one warm-up batch per precision, then `reps` rounds alternating the two, best of each."""
    with torch.random.fork_rng(devices=[]):
        return _measure(workload, kind, reps)


def _measure(workload: Workload, kind: str, reps: int) -> dict[str, float]:
    net = _copy_without_hooks(workload.model)
    x = torch.randn(workload.shape)
    if workload.channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if kind == "train":
        net.train().requires_grad_(True)
    else:
        from transferkit.models.fuse import fold_batchnorm

        net = fold_batchnorm(net.eval(), x[:2])  # as feature extraction and predict run it

    def once(precision: str) -> float:
        tick = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if kind == "train":
                net.zero_grad(set_to_none=True)
                net(x).float().square().mean().backward()
            else:
                with torch.inference_mode():
                    net(x)
        return time.perf_counter() - tick

    best = {"fp32": math.inf, "bf16": math.inf}
    for precision in best:
        once(precision)
    for _ in range(reps):
        for precision in best:
            best[precision] = min(best[precision], once(precision))
    return {precision: workload.shape[0] / seconds for precision, seconds in best.items()}


_WEIGHT_HOOKS = (SpectralNorm, WeightNorm)
_CALL_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without the user's hooks, and without copying what they hold (an object with a
    lock or a file cannot be copied): the user's hooks see the run's passes, not the probe's (a NaN injected at
    a counted pass landed in the probe). The old-style spectral_norm and weight_norm pre-hooks, which compute
    the weight, stay."""
    memo = {}
    for module in model.modules():
        for name in _CALL_HOOKS:
            hooks = getattr(module, name, None)
            if hooks:  # deepcopy takes this in place of copying the dict
                memo[id(hooks)] = type(hooks)((k, h) for k, h in hooks.items() if isinstance(h, _WEIGHT_HOOKS))
    return copy.deepcopy(model, memo)


@torch.inference_mode()
def agreement_counts(model: nn.Module, scored, to_device) -> tuple[int, int]:
    """(images whose top-1 is the same in bf16 autocast as in fp32, images) over `scored`, (loader, logits)
    pairs: the model runs in fp32 with BatchNorm folded, as predict serves it, and in bf16 only where
    `logits` (the split's bf16 logits, in split order; rows picked by the loader's index) is None."""
    from transferkit.models.fuse import fold_batchnorm

    same = total = 0
    net = None
    model.eval()
    for loader, known in scored:
        for images, _, index in loader:
            images = to_device(images)
            if net is None:
                net = fold_batchnorm(model, images[:2])
            fp32 = net(images).argmax(1).cpu()
            if known is None:
                with torch.autocast(images.device.type, dtype=torch.bfloat16):
                    bf16 = net(images).argmax(1).cpu()
            else:
                bf16 = torch.from_numpy(known[np.asarray(index)].argmax(1))
            same, total = same + int((fp32 == bf16).sum()), total + len(images)
    return same, total


def for_serving(choice: Choice, checked: dict | None) -> Choice:
    """The precision to serve a bundle in: `choice` (this machine's auto choice for inference) unless it is
    bf16 and the bundle's own check (`checked`: {"bf16_top1_agreement", "images"}) did not pass."""
    if choice.precision != "bf16" or choice.reason == "asked for":
        return choice
    share = (checked or {}).get("bf16_top1_agreement")
    if share is None:
        return Choice(
            "fp32",
            "bf16 would be faster here, but this model was never checked against fp32 "
            "(trained where bf16 was not faster); --precision bf16 to use it anyway",
        )
    if share < AGREEMENT:
        return Choice(
            "fp32",
            f"bf16 would be faster here, but its top-1 agreed with fp32 on only {share:.1%} of "
            f"{checked['images']} images at the end of training (needs {AGREEMENT:.1%})",
        )
    return Choice("bf16", f"{choice.reason}; top-1 agreed with fp32 on {share:.1%} of {checked['images']} images")
