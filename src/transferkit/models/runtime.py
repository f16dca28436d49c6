"""How a run uses the machine: device, precision, memory format, threads, loader workers, compile.

Each default is a rule measured on the machines we have (the figures: README, Speed and On a GPU,
and benchmarks/); the resolved settings are written to runs/NAME/runtime.json and metrics.json, so
a run says how it ran. The rules:
- precision: per kind of work (training steps; inference: validation, test, feature
  extraction, predict), see `precision` for what auto picks and why.
- channels_last: on by default (measured faster: README, Speed).
- loader workers: see `core.machine.default_workers`; torch threads = cores - workers on CPU (cores per
  process under torchrun), so decoding workers, compute threads and ranks do not oversubscribe.
- compile: off by default. On a CPU torch.compile was slow to warm up and then trained no faster
  than eager (README, Speed); on CUDA it is worth trying for long runs (README, On a GPU).
- CUDA: cuDNN picks its fastest kernels per shape (benchmark mode, off under --deterministic) and
  fp32 matrix products use TF32, as timm's train.py does; the loader gets more workers, since the
  main process only feeds the GPU (see `core.machine.default_workers`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field, replace

import torch

from transferkit.core.errors import UserError
from transferkit.core.machine import cache_root, cores_per_process, machine_cores
from transferkit.data.transforms import resized_crops
from transferkit.models.precision import KINDS, Choice, Workload, choose, for_serving


@dataclass(frozen=True)
class Runtime:
    """The resolved settings; `autocast(kind)`, `batch()` and `prepare()` apply them.

    `precision` maps each kind of work ("train", "infer") to fp32 or bf16; a single string sets both."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: dict | str = "fp32"
    channels_last: bool = False
    workers: int = 0
    threads: int = field(default_factory=torch.get_num_threads)
    compile: bool = False
    reasons: dict = field(default_factory=dict)
    """Why each kind got its precision (logged and written to runtime.json)."""
    normalize: tuple | None = None
    """(mean, std) of the model's preprocessing: uint8 batches (from `transforms.pixels`) become its input here."""

    def __post_init__(self):
        if isinstance(self.precision, str):
            object.__setattr__(self, "precision", dict.fromkeys(KINDS, self.precision))

    def autocast(self, kind: str = "train"):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision[kind] == "bf16")

    @property
    def normalizes_on_device(self) -> bool:
        """Loaders hand over uint8 pixels for `batch` to normalise: on CUDA, where the GPU does it at no
        cost to the workers, which then supply more images per second (benchmarks/results/loader.md). On a CPU the
        main process would do the workers' share and the run is slower (measured: README, Speed), so there
        they normalise."""
        return self.device.type == "cuda" and self.normalize is not None

    def batch(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Move a batch to the device; image batches (4-D) in NHWC when the model is. A uint8 (N, H, W, C)
        batch is normalised there with the same operations, in the same order, as ToTensor + Normalize (so
        to the same values): the loader workers only crop, and copy a quarter of the bytes. A list
        [uint8 squares, crop rows] (from `transforms.DeviceCrop`) is normalised, then cropped there."""
        if isinstance(images, (list, tuple)):
            squares, crops = images
            return self._layout(resized_crops(self._normalized(squares), crops))
        if images.dtype == torch.uint8 and self.normalize is not None:
            return self._layout(self._normalized(images))
        if self.channels_last and images.dim() == 4:
            return images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return images.to(self.device, non_blocking=True)

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        scale, mean, std = _on_device(self.normalize, self.device)
        return images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div(scale).sub(mean).div(std)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

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

    def describe_precision(self) -> str:
        """E.g. 'fp32' or 'train fp32, inference bf16'."""
        train, infer = self.precision["train"], self.precision["infer"]
        return train if train == infer else f"train {train}, inference {infer}"

    def to_dict(self) -> dict:
        out = {
            "device": str(self.device),
            "precision": self.precision,
            "precision_reason": self.reasons,
            "channels_last": self.channels_last,
            "workers": self.workers,
            "threads": self.threads,
            "compile": self.compile,
            "cpu_count": machine_cores(),
            "torch": torch.__version__,
        }
        if self.device.type == "cuda":
            out.update(
                gpu=torch.cuda.get_device_name(self.device),
                cuda=torch.version.cuda,
                cudnn_benchmark=torch.backends.cudnn.benchmark,
                tf32=torch.backends.cuda.matmul.allow_tf32,
            )
        return out


@functools.lru_cache(maxsize=16)
def _on_device(mean_std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255, mean and std as tensors on `device`, made once (a copy per batch would wait for the GPU). The 255
    is a device tensor because CUDA divides by a Python number as a multiply by its reciprocal, 1 ulp off
    ToTensor's true division (seen on a GPU); by a device tensor it divides."""
    return (torch.tensor(255.0, device=device), *(torch.tensor(v, device=device).view(-1, 1, 1) for v in mean_std))


def resolve(
    config, device: torch.device, workers: int, workload: Workload | None = None, trains_backbone: bool = True, say=None
) -> Runtime:
    """The Runtime for a TrainConfig on `device` with `workers` loader processes. `workload` (the model and
    its batch shape) lets precision auto time both precisions where that decides (see `precision`);
    `trains_backbone` False: training steps only run the head, so they take inference's precision."""
    threads = torch.get_num_threads()
    if config.threads:
        threads = config.threads
    elif device.type == "cpu" and (workers or cores_per_process() < machine_cores()):
        threads = max(1, cores_per_process() - workers)
    rt = Runtime(device, "fp32", config.channels_last, workers, threads, config.compile)
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"precision bf16 was asked for but {torch.cuda.get_device_name(device)} does not support "
            "bfloat16; use --precision fp32 or auto."
        )
    cache = cache_root(config) / "precision.json"
    with rt.threads_applied():  # a probe times the work at the run's thread count
        infer = choose(config.precision, device, "infer", workload, cache, say)
        train = (
            choose(config.precision, device, "train", workload, cache, say)
            if trains_backbone or config.precision != "auto"
            else Choice(infer.precision, "only the head trains: as inference")
        )
    return replace(
        rt,
        precision={"train": train.precision, "infer": infer.precision},
        reasons={"train": train.reason, "infer": infer.reason},
    )


def inference_runtime(
    name: str, device: torch.device, workload: Workload | None = None, checked: dict | None = None
) -> Runtime:
    """The Runtime to serve a bundle (predict, evaluate): its precision with the reason. `checked` is the
    bundle's record of bf16 against fp32 (see `precision.for_serving`)."""
    choice = for_serving(choose(name, device, "infer", workload, cache_root() / "precision.json"), checked)
    return Runtime(device, choice.precision, channels_last=True, reasons={"infer": choice.reason})
