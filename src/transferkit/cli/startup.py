"""How a command's process is set up: its heap, its imports of torch, timm and the rest, and which
third-party messages it keeps from the user.

`keep_heap()`: glibc's malloc hands blocks over 128 KB to the kernel (mmap) and back (munmap) on every
free, and trims the heap's top; a CPU forward pass allocates its activations anew on each batch (many
of lite0's layers' outputs are above the threshold), so each batch page-faults them in again. With the
mmap threshold at its maximum (`MMAP_MAX`) and no trimming, they stay in the heap and the BN-folded fp32
forward runs much faster with AVX2 kernels, though either setting alone made it slower
(benchmarks/results/bench-epyc-zen5-2026-11-27.md; README, Speed: fixed costs). The heap then keeps its peak
size until the process ends, as a command's process does anyway.

`loading()`: imports with Python's garbage collector paused, then frozen.

Those imports create hundreds of thousands of objects that live as long as the process. While they
pile up, each full collection walks all of them again, a measurable share of a linear probe
(benchmarks/results/bench-epyc-zen5-2026-11-27.md; README, Speed: fixed costs), and every later full
collection of the run walks them once more. With the collector paused during the imports and their
objects frozen after (`gc.freeze`: moved out of the collector's sight, still freed by reference
counting), the collector only ever looks at what the command itself makes. Cycles among the imported
objects are never collected; module objects live until exit anyway.

`quiet_third_party()` (called by `loading`): each filter names the message and the module that sends it, so
nothing else is hidden: torch's FutureWarning that TorchScript is deprecated (our `--format torchscript`
export uses it knowingly), torch's pytree log line about Enum constants that torchao registers (the import
of transformers brings torchao in: text runs), and TensorFlow's C++ info lines (TF_CPP_MIN_LOG_LEVEL=1,
when not set already; warnings and errors still show). These are the library's user's business, not
transferkit's: the library itself (`import transferkit`) filters nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import re
import sys
import warnings

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit

WARNINGS = ((FutureWarning, r"`torch\.jit\.\w+` is (deprecated|not supported)", r"torch\.jit\."),)
"""Python warnings a command hides: (category, message pattern, pattern of the module that warns)."""
LOG_LINES = {"torch.utils._pytree": r"is an Enum subclass and is now natively supported by torch\.compile"}
"""Log records a command hides: logger name, pattern of the message."""


def keep_heap() -> bool:
    """Keep freed memory in the heap (see above); True where it was set (glibc on Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt
        return False


class _Drop(logging.Filter):
    """Drops the records of one logger whose message matches `pattern`."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    """Hide the third-party messages listed in WARNINGS and LOG_LINES, and TensorFlow's C++ info lines
    (see the module docstring). Calling it again adds nothing."""
    for category, message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern in LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


@contextlib.contextmanager
def loading(trains: bool = False):
    """Wrap a command's heavy imports: `with loading(): from transferkit.deploy.predictor import load`.
    `trains`: the command builds an optimizer, whose first `add_param_group` imports TorchDynamo (torch.optim
    wraps it in torch._disable_dynamo); it is imported here instead, so its objects are frozen with the rest."""
    quiet_third_party()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if trains:
            import torch._dynamo  # noqa: F401
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
