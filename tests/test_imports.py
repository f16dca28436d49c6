"""core.imports: timm and torchvision load without TorchDynamo, and torch.compile still gets all of it."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_models_build_and_run_without_dynamo_and_compile_still_works():
    out = _run("""
        import sys
        import torch
        from transferkit.core.imports import defer_dynamo

        defer_dynamo()  # as the CLI's main() does
        import transferkit.training.recipe  # timm and torchvision, through the hook
        import timm, torchvision
        from torchvision.ops import roi_align
        from transferkit.core import imports

        assert "torch._dynamo" not in sys.modules, "TorchDynamo was imported"
        assert type(timm.__loader__).__name__ == "SourceFileLoader"  # the library's own loader, not the wrapper
        model = timm.create_model("efficientnet_lite0", num_classes=3).eval()
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
        assert roi_align(torch.randn(1, 2, 8, 8), torch.tensor([[0, 0, 0, 4, 4.0]]), 2).shape == (1, 2, 2, 2)
        naflex = timm.models.naflexvit.NaFlexEmbeds._apply_learned_naflex_pos_embed  # torch.compiler.disable'd
        assert naflex.__wrapped__ and "torch._dynamo" not in sys.modules
        assert not any(isinstance(f, imports._Finder) for f in sys.meta_path)  # both imported: the hook is gone

        calls = []

        @imports.disable
        def eager_only(x):
            calls.append(torch.compiler.is_compiling())
            return x + 1

        compiled = torch.compile(lambda x: eager_only(x * 2) - 1, backend="eager")
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
        assert calls == [False]  # disabled: run eagerly, never traced
        assert "torch._dynamo" in sys.modules and hasattr(sys.modules["torch._dynamo"], "optimize")  # the real one
        from torch._dynamo.utils import is_compile_supported
        assert is_compile_supported("cpu") == imports.is_compile_supported("cpu")
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_placeholder_asked_for_any_other_name_imports_the_real_module():
    out = _run("""
        import sys
        import torch
        from transferkit.core import imports

        sys.modules["torch._dynamo"] = imports._Placeholder("torch._dynamo")  # as during timm's import
        reset = sys.modules["torch._dynamo"].reset  # a name the placeholder does not have
        assert callable(reset) and hasattr(sys.modules["torch._dynamo"], "optimize")
        assert not isinstance(sys.modules["torch._dynamo"], imports._Placeholder)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_the_hook_stands_aside_where_dynamo_came_first():
    out = _run("""
        import sys
        import torch._dynamo
        from transferkit.core import imports

        imports.defer_dynamo()
        assert not any(isinstance(f, imports._Finder) for f in sys.meta_path)
        import timm
        assert not isinstance(sys.modules["torch._dynamo"], imports._Placeholder)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_importing_the_library_changes_nothing_global():
    out = _run("""
        import sys
        before = list(sys.meta_path)
        import transferkit
        from transferkit.training import recipe  # noqa: F401
        assert sys.meta_path == before  # no import hook left behind by the library
        print("ok")
    """)
    assert out.strip() == "ok"
