"""Many processes, one run: torchrun and DistributedDataParallel, PyTorch's own engine.

`torchrun --nproc-per-node N -m transferkit train ...` (or `transferkit train --devices N`,
which runs that command) starts N copies of the run. Each copy learns its place from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group: NCCL
on CUDA, gloo on CPU.

What stays the same as one process, by construction:
- The epoch order and each image's augmentation seed come from `EpochSampler`, the same in
  every rank. An optimizer step takes the next `batch_size` samples of that order (the
  global batch); `StepBatches` splits them into `accumulate` micro-batches and each of those
  across the ranks. So the set of images behind every step does not depend on the number of
  processes.
- Each rank scales its mean loss by (its images x ranks / the step's images) before DDP
  averages the gradients, so every step's gradient is the mean over the global batch, even
  for an uneven last batch.
- Val and test are split across ranks without padding (rank r takes every r-th image) and
  the predictions are gathered, so the metrics count every image exactly once.
- BatchNorm in train mode sees only its rank's images unless `sync_bn` is set.
Only rank 0 writes the run directory; every rank reads it when resuming.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from transferkit.core.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place: rank among `world` processes, and its rank on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64), in one all-reduce; the values themselves alone."""
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def shard(self, n: int) -> list[int]:
        """This rank's positions of n items: every world-th, from its rank (no padding, no overlap)."""
        return list(range(self.rank, n, self.world))


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_environment() -> Dist:
    """The Dist that torchrun's environment describes (one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_name: str) -> tuple[Dist, torch.device | None]:
    """Join torchrun's process group when there is one; returns (Dist, this rank's device or None).

    NCCL with one GPU per process (cuda:LOCAL_RANK) when CUDA is used, gloo on CPU."""
    d = from_environment()
    if not d.on:
        return d, None
    from transferkit.core.machine import pick_device

    use_cuda = pick_device(device_name).type == "cuda"
    if use_cuda and d.local_rank >= torch.cuda.device_count():
        raise UserError(
            f"Process with LOCAL_RANK {d.local_rank} has no GPU: this machine has "
            f"{torch.cuda.device_count()}. Start at most that many processes per node."
        )
    device = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return d, device


def check_gpus(devices: int, device_name: str | None) -> None:
    """--devices N on CUDA starts one process per GPU: refuse more processes than GPUs before any starts
    (NCCL cannot put two ranks on one GPU)."""
    from transferkit.core.machine import pick_device

    gpus = torch.cuda.device_count()
    if pick_device(device_name or "auto").type == "cuda" and devices > gpus:
        raise UserError(
            f"--devices {devices} starts one process per GPU, and this machine has {gpus}. "
            f"Use --devices {gpus}, or --device cpu for {devices} CPU processes."
        )


def launch(devices: int, argv: list[str]):
    """Replace this process with torchrun running the same transferkit command on `devices` local
    processes (one machine; --standalone rendezvous). `argv` loses its --devices option."""
    import sys

    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            args.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={devices}",
        "-m",
        "transferkit",
        *args,
    ]
    print(f"[transferkit] launching: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    os.execv(sys.executable, command)


def teardown(d: Dist) -> None:
    if d.on and dist.is_initialized():
        dist.destroy_process_group()


def loss_scale(local: int, step_total: int, d: Dist) -> float:
    """Factor on a rank's mean loss so that DDP's average of gradients is the global batch's mean."""
    return local * d.world / step_total


def ddp_wrap(module: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    """DDP over the parameters that train now (frozen ones are not registered: no find_unused_parameters).
    Call again after a phase changes what trains."""
    if not d.on:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
    )


def check_batch(batch_size: int, accumulate: int, d: Dist, n_train: int) -> None:
    """The global batch (and the training split) must give every rank's micro-batch an image."""
    need = accumulate * d.world
    if batch_size < need:
        raise UserError(
            f"batch_size {batch_size} is the global batch of one optimizer step: split over "
            f"{d.world} process(es) and {accumulate} accumulation step(s) it leaves "
            f"{batch_size / (accumulate * d.world):g} images per micro-batch; use batch_size >= {need}."
        )
    if n_train < need:
        raise UserError(
            f"The training split has {n_train} images: too few for {d.world} process(es) x "
            f"{accumulate} accumulation step(s), which need at least {need}."
        )


def scaled_lr(lr: float, batch_size: int, rule: str, base: int) -> float:
    """lr_scaling: none keeps lr; linear multiplies it by batch_size / base; sqrt by its square root."""
    if rule == "linear":
        return lr * batch_size / base
    if rule == "sqrt":
        return lr * math.sqrt(batch_size / base)
    return lr
