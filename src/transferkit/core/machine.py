"""Facts about this machine and process settings: the device, the cores this process may use, how many
loader workers to start, the cache folder, seeds, determinism, cuDNN and TF32 on CUDA.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from transferkit.core.errors import UserError


def pick_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N (cuda that PyTorch cannot see is an error)."""
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got '{name}'.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but PyTorch sees no CUDA GPU. Use --device cpu or auto.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container or `taskset` limits it), not the
    host's count that os.cpu_count() reports."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def cores_per_process() -> int:
    """This machine's cores shared by the processes torchrun started on it (LOCAL_WORLD_SIZE)."""
    return max(1, machine_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_workers(in_memory: bool, cuda: bool = False) -> int:
    """In-memory data decodes nothing: 0 workers. Files on CPU: half of this process's cores (at most 8),
    so torch keeps the rest; with 2 cores or fewer none (measured: workers there extract features no
    faster and fight torch's threads; README, Speed: workers and threads). Files on CUDA:
    every core but one (at most 16): the GPU computes, the cores decode."""
    cores = cores_per_process()
    if in_memory or (cores <= 2 and not cuda):
        return 0
    return min(16, max(1, cores - 1)) if cuda else min(8, cores // 2)


def configure_cuda(deterministic: bool) -> None:
    """cuDNN benchmark mode (fastest kernels per input shape, chosen by timing) unless the run must be
    deterministic; TF32 for fp32 matrix products and convolutions (PyTorch's default for convolutions)."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def cache_root(config=None) -> Path:
    """--cache-dir, else $TRANSFERKIT_CACHE, else ~/.cache/transferkit (feature, image and precision caches)."""
    root = (
        getattr(config, "cache_dir", None)
        or os.environ.get("TRANSFERKIT_CACHE")
        or Path.home() / ".cache" / "transferkit"
    )
    return Path(root).expanduser()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """torch.use_deterministic_algorithms, and the cuBLAS workspace setting it needs on CUDA."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    configure_cuda(deterministic=on)  # flags only: harmless without CUDA
    if on != torch.are_deterministic_algorithms_enabled():  # setting it imports torch._inductor and TorchDynamo
        torch.use_deterministic_algorithms(on)
