"""How a run uses the machine: device, precision, memory format, threads, loader workers, compile.

Each default is a rule measured on the machines we have (figures in the docstrings); the
resolved settings are written to runs/NAME/runtime.json and metrics.json, so a run says how it
ran. The rules:
- precision auto: bf16 autocast on CUDA GPUs that support it and on CPUs with native bf16
  (avx512_bf16 or AMX); fp32 elsewhere. On an AVX-512 CPU without them (this project's 2-core
  Xeon) bf16 trained efficientnet_lite0 at 96 px at 37 img/s against 74 in fp32.
- channels_last: on by default (TrainConfig.channels_last has the figures).
- loader workers: see `default_workers`; torch threads = cores - workers on CPU (cores per
  process under torchrun), so decoding workers, compute threads and ranks do not oversubscribe.
- compile: off by default. On the 2-core CPU torch.compile took 105 s to warm up and then
  trained at 70 img/s against 73 eager; on CUDA it is worth trying for long runs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from transferkit.errors import UserError


def pick_device(name: str) -> torch.device:
    """auto | cpu | cuda (cuda that PyTorch cannot see is an error)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but PyTorch sees no CUDA GPU. Use --device cpu or auto.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX in /proc/cpuinfo (Linux); False where that cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' becomes bf16 where the hardware runs it natively, else fp32; 'bf16' is checked."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = device.type == "cpu" and cpu_has_native_bf16()
    if name == "auto":
        return "bf16" if native else "fp32"
    if name == "bf16" and device.type == "cuda" and not native:
        raise UserError(f"precision bf16 was asked for but {torch.cuda.get_device_name(device)} does not support "
                        "bfloat16; use --precision fp32 or auto.")
    return name


def cores_per_process() -> int:
    """This machine's cores shared by the processes torchrun started on it (LOCAL_WORLD_SIZE)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_workers(in_memory: bool) -> int:
    """In-memory data decodes nothing: 0 workers. Files: half of this process's cores (at most 8), so
    torch keeps the rest; with 2 cores or fewer none (measured: extracting features from 2,100 JPEGs
    took 9.8 s with 0 workers, 10.9 s with 1, 9.5 s with 2 that then fight torch's threads)."""
    cores = cores_per_process()
    if in_memory or cores <= 2:
        return 0
    return min(8, cores // 2)


@dataclass(frozen=True)
class Runtime:
    """The resolved settings; `autocast()`, `batch()` and `prepare()` apply them."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    channels_last: bool = False
    workers: int = 0
    threads: int = field(default_factory=torch.get_num_threads)
    compile: bool = False

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device; image batches (4-D) in NHWC when the model is."""
        if self.channels_last and images.dim() == 4:
            return images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return images.to(self.device, non_blocking=True)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    @contextlib.contextmanager
    def threads_applied(self):
        """torch's intra-op thread count set to `threads` for the block, then restored."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def to_dict(self) -> dict:
        out = {"device": str(self.device), "precision": self.precision, "channels_last": self.channels_last,
               "workers": self.workers, "threads": self.threads, "compile": self.compile,
               "cpu_count": os.cpu_count(), "torch": torch.__version__}
        if self.device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(self.device)
        return out


def resolve(config, device: torch.device, workers: int) -> Runtime:
    """The Runtime for a TrainConfig on `device` with `workers` loader processes."""
    threads = torch.get_num_threads()
    if config.threads:
        threads = config.threads
    elif device.type == "cpu" and (workers or cores_per_process() < (os.cpu_count() or 1)):
        threads = max(1, cores_per_process() - workers)
    return Runtime(device, resolve_precision(config.precision, device), config.channels_last, workers, threads,
                   config.compile)
