"""timm and torchvision without TorchDynamo: an import that eager (not compiled) runs do not pay for.

Importing timm 1.0 or torchvision 0.29 imports all of TorchDynamo (with sympy): torchvision's roi_align
does `from torch._dynamo.utils import is_compile_supported` at module level, and timm's naflexvit
decorates five methods with `torch.compiler.disable`, which imports torch._dynamo to wrap them. That
is 0.9 s of a 7.3 s linear probe on a 2-core EPYC, in every command that builds a model, for code
only `--compile` runs. PyTorch's developers say the same of eager users: "importing dynamo has
undesirable side effects for eager mode only users so it's best not to do it" (pytorch/vision#8436).

`defer_dynamo()` adds an import hook. While timm or torchvision is first imported, placeholders
stand in for torch._dynamo and torch._dynamo.utils; they are removed when that import ends.
- `is_compile_supported` imports the real one when first called (roi_align calls it);
- `disable(fn)` is torch's own lazy form, `torch._disable_dynamo` (what torch.optim's methods use):
  the real `torch._dynamo.disable(fn)` is made at the first call;
- any other name asked of a placeholder imports the real torch._dynamo on the spot, so a timm or
  torchvision that needs more of it gets it, at the old cost.
Nothing changes where torch._dynamo, timm or torchvision was imported before. Training imports
TorchDynamo anyway (torch.optim's add_param_group does, on first use); predict, evaluate and export
never do: predicting one image went from 2.1 s to 1.5 s.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

DEFERRED = ("timm", "torchvision")
PLACEHOLDERS = ("torch._dynamo.utils", "torch._dynamo")


def defer_dynamo() -> None:
    """Install the hook (once); it leaves sys.meta_path once timm and torchvision are imported."""
    if "torch._dynamo" in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())


def is_compile_supported(device_type):
    """torch._dynamo.utils.is_compile_supported, imported when first called."""
    from torch._dynamo.utils import is_compile_supported as real

    return real(device_type)


def disable(fn=None, recursive=True, *, reason=None):
    """torch._dynamo.disable(fn) made at fn's first call: torch's `_disable_dynamo` (`reason` only words the
    real one's messages)."""
    import torch

    return torch._disable_dynamo(fn, recursive)


class _Placeholder(types.ModuleType):
    """Stands in for torch._dynamo (or its utils) while timm or torchvision is imported."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        _remove_placeholders()
        return getattr(importlib.import_module(self.__name__), name)


def _remove_placeholders() -> None:
    import torch

    for name in PLACEHOLDERS:
        if isinstance(sys.modules.get(name), _Placeholder):
            del sys.modules[name]
    if isinstance(torch.__dict__.get("_dynamo"), _Placeholder):
        del torch._dynamo


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of timm and torchvision."""

    def __init__(self):
        self.depth = 0  # timm imports torchvision: the placeholders stay until the outer import ends

    def find_spec(self, name, path=None, target=None):
        if name not in DEFERRED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, finder: _Finder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        import torch  # the first import of either library anyway; torch's own import leaves torch._dynamo alone

        module.__loader__ = module.__spec__.loader = self.loader  # the module's own loader, as if never wrapped
        outer = self.finder.depth == 0
        if outer and "torch._dynamo" not in sys.modules and hasattr(torch, "_disable_dynamo"):
            dynamo, utils = _Placeholder("torch._dynamo"), _Placeholder("torch._dynamo.utils")
            utils.is_compile_supported, dynamo.utils, dynamo.disable = is_compile_supported, utils, disable
            sys.modules.update({"torch._dynamo": dynamo, "torch._dynamo.utils": utils})
        self.finder.depth += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.finder.depth -= 1
            if outer:
                _remove_placeholders()
                if all(name in sys.modules for name in DEFERRED) and self.finder in sys.meta_path:
                    sys.meta_path.remove(self.finder)
