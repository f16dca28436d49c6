"""The shape of the package (issue 14): no import cycle between modules; modules under 500 lines
(ruff-formatted) unless their docstring says why one flow is kept whole ("Long module: ..."), functions
under 100. The layers themselves are import-linter's contract in pyproject.toml (`make test`
runs lint-imports first)."""

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transferkit"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back_through_others():
    graph = grimp.build_graph("transferkit")
    modules = set(graph.modules)
    imports = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    assert _cycles(imports) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check finds one


def test_modules_and_functions_stay_short():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.glob("**/*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 500 and "Long module: " not in (ast.get_docstring(ast.parse(text)) or ""):
            long_modules.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long_functions.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert long_modules == []
    assert long_functions == []
    subpackages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    assert len(subpackages) >= 4
