"""How a command loads torch, timm and the rest: with Python's garbage collector paused, then frozen.

Those imports create 400,000 to 600,000 objects that live as long as the process. While they pile up,
each full collection walks all of them again: 7 full collections, 0.8 s of a 9 s linear probe on a
2-core EPYC, and every later full collection of the run walks them once more. With the collector
paused during the imports and their objects frozen after (`gc.freeze`: moved out of the collector's
sight, still freed by reference counting), the collector only ever looks at what the command itself
makes. Cycles among the imported objects are never collected; module objects live until exit anyway.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def loading(trains: bool = False):
    """Wrap a command's heavy imports: `with loading(): from transferkit.deploy.predictor import load`.
    `trains`: the command builds an optimizer, whose first `add_param_group` imports TorchDynamo (torch.optim
    wraps it in torch._disable_dynamo); it is imported here instead, so its objects are frozen with the rest."""
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
