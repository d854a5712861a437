"""The package's layering, read from the source with ``ast``: no library module imports the CLI,
and the module-level imports of fedattn form no cycle.

Only imports executed when a module is first imported count for the cycle check: an import inside
a function (the lazy imports that keep ``fedattn --help`` fast, or that let a layer reach one above
it only when a command runs) cannot make importing fail, so it is excluded. The CLI check counts
every import, at any depth: a library that imports the CLI even lazily depends on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fedattn

PACKAGE = Path(fedattn.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The fedattn modules an import statement loads (``from a import b`` loads a.b if it is a module)."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        names = {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES}


def imports(module: str, *, module_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= imported(node, module)
        elif module_level_only and isinstance(node, (ast.If, ast.Try)):  # a guarded import still runs at import
            found |= {
                name
                for child in ast.walk(node)
                if isinstance(child, (ast.Import, ast.ImportFrom))
                for name in imported(child, module)
            }
    return found - {module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return stack[stack.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_is_found():
    assert {"fedattn.cli.main", "fedattn.systems.fedattn.config", "fedattn.evaluation.sweep"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(name for name in MODULES if not name.startswith("fedattn.cli")))
def test_no_library_module_imports_the_cli(module):
    assert not {name for name in imports(module, module_level_only=False) if name.startswith("fedattn.cli")}


def test_no_import_cycles():
    graph = {module: imports(module, module_level_only=True) for module in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_checks_can_fail():
    """The checks see what they must: the CLI's own imports, and a cycle when there is one."""
    assert "fedattn.systems.fedattn.config" in imports("fedattn.cli.run", module_level_only=True)
    assert "fedattn.evaluation.sweep" in imports("fedattn.cli.main", module_level_only=False)
    assert "fedattn.evaluation.sweep" not in imports("fedattn.cli.main", module_level_only=True)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
