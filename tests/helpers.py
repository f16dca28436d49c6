"""Helpers shared by the test modules (checkpoint weights, their comparison, a signal at a chosen batch)."""

import os
import signal
import sys

import torch

from transferkit.core.progress import Reporter


class SignalAt(Reporter):
    """A silent display that sends this process `signum` during training batch number `at`."""

    def __init__(self, at: int, signum: int = signal.SIGTERM):
        super().__init__(silent=True)
        self.at, self.signum, self.count = at, signum, 0

    def batch(self, *args) -> None:
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), self.signum)


def weights(run_dir):
    return torch.load(run_dir / "last.ckpt", weights_only=True)["model"]


def assert_same_weights(a, b, atol: float = 0.0):
    """Bit-identical tensors, or within `atol` (floating point ones)."""
    assert a.keys() == b.keys()

    def same(x, y):
        return torch.equal(x, y) if not atol or not x.is_floating_point() else torch.allclose(x, y, rtol=0, atol=atol)

    assert all(same(a[k], b[k]) for k in a), [(k, float((a[k] - b[k]).abs().max())) for k in a if not same(a[k], b[k])][
        :5
    ]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "transferkit",
        "train",
        "--device",
        "cpu",
        *args,
    ]
