"""The package's layout rule: a module imports only from earlier pipeline stages and from `_core` (issue 13).

The import graph is read with `ast` (imports inside functions count too), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cast_peft"
# The pipeline, in order: each stage may import the ones before it (and itself), never one after it.
STAGES = ("_core", "models", "geometry", "data", "conflict_map", "diagnosis", "tuner", "training", "evaluation", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every cast_peft module that ``path`` imports, absolute or relative, at any depth."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    return _imports_in(path.read_text(encoding="utf-8"), package)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only; never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:
                yield child
                yield from _runtime_nodes(child)
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports_in(source: str, package: str) -> set[str]:
    tree = ast.parse(source)
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("cast_peft")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("cast_peft"):
                continue
            for alias in node.names:  # `from . import evaluation` imports the submodule, not the package's names
                candidate = f"{module}.{alias.name}"
                found.add(candidate if _path_of(candidate) is not None else module)
    return found


def _path_of(module: str) -> Path | None:
    if module == "cast_peft":
        return PACKAGE / "__init__.py"
    rel = Path(*module.split(".")[1:])
    for candidate in (PACKAGE / rel.with_suffix(".py"), PACKAGE / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path) if _path_of(m) is not None and m != name}
    return graph


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's __init__ (the public API re-exports all)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "cast_peft":
                continue  # importing the package root is checked below
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_imports_the_package_root():
    offenders = sorted(name for name, deps in _graph().items() if name != "cast_peft" and "cast_peft" in deps)
    assert not offenders, f"these modules import `cast_peft` itself (take __version__ from _core): {offenders}"


def test_every_stage_imports_only_earlier_stages():
    graph = _graph()
    unknown = sorted({_stage(m) for m in graph} - set(STAGES) - {None})
    assert not unknown, f"modules outside the declared stages {STAGES}: {unknown}"
    late = []
    for module, deps in graph.items():
        stage = _stage(module)
        if stage is None:
            continue
        for dep in deps:
            dep_stage = _stage(dep)
            if dep_stage is not None and STAGES.index(dep_stage) > STAGES.index(stage):
                late.append(f"{module} imports {dep}")
    assert not late, "a stage imports a later one:\n" + "\n".join(sorted(late))


def test_the_graph_walker_sees_imports_inside_functions():
    # The walker must be able to fail: a lazy relative import inside a function body is found and resolved.
    source = "def f():\n    from ..cli import build_parser\n    from . import layers\n    return build_parser\n"
    assert _imports_in(source, "cast_peft.tuner") == {"cast_peft.cli", "cast_peft.tuner.layers"}
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import main\n"
    assert _imports_in(typing_only, "cast_peft.tuner") == set()
