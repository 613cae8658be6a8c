"""Checks over optimize/'s source tree (read with ast, nothing imported): short functions, no import cycle between
optimize modules, the project's own modules imported at module top, heavy libraries only through optimize.lazy,
and `import optimize.cli` importing no heavy library. Each failure names the file, the line and the function."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from optimize.lazy import HEAVY

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "optimize"
MAX_FUNCTION_LINES = 120
# What `optimize --help` and `optimize validate` must never pay for (seconds each, or missing on a CPU runner).
NEVER_AT_CLI_IMPORT = ("torch", "onnxruntime", "mlflow", "onnx")


@dataclass(frozen=True)
class Import:
    """One `import`/`from ... import` statement: where it is and what it names."""

    file: str  # relative to the repository root
    line: int
    function: str | None  # the innermost enclosing function (qualified), None at module or class level
    type_checking: bool  # under `if TYPE_CHECKING:`
    modules: tuple[str, ...]  # the modules it imports (for `from pkg import name`, pkg.name where that is a module)

    def where(self) -> str:
        return f"{self.file}:{self.line} ({f'in {self.function}()' if self.function else 'module level'})"


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(node: ast.ImportFrom, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    package = package[: len(package) - node.level + 1]
    return ".".join([*package, *([node.module] if node.module else [])])


def imports(path: Path) -> Iterator[Import]:
    """Every import statement of `path`, with the function it sits in and whether TYPE_CHECKING guards it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    rel = str(path.relative_to(ROOT))

    def visit(node: ast.AST, function: str | None, scope: str, guarded: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = tuple(a.name for a in child.names)
                yield Import(rel, child.lineno, function, guarded, names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, path)
                names = tuple(f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in child.names)
                yield Import(rel, child.lineno, function, guarded, tuple(dict.fromkeys(names)))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{scope}.{child.name}" if scope else child.name
                yield from visit(child, name, name, guarded)
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, function, f"{scope}.{child.name}" if scope else child.name, guarded)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), function, scope, True)
                for stmt in child.orelse:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), function, scope, guarded)
            else:
                yield from visit(child, function, scope, guarded)

    yield from visit(tree, None, "", False)


def all_imports() -> list[Import]:
    return [i for path in sources() for i in imports(path)]


def test_no_function_is_over_120_lines() -> None:
    long = []
    for path in sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))

        def walk(node: ast.AST, scope: str, path: Path = path) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{scope}.{child.name}" if scope else child.name
                    if not isinstance(child, ast.ClassDef):
                        first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                        lines = (child.end_lineno or child.lineno) - first + 1
                        if lines > MAX_FUNCTION_LINES:
                            long.append(f"{path.relative_to(ROOT)}:{child.lineno}: {name}() is {lines} lines")
                    walk(child, name)
                else:
                    walk(child, scope)

        walk(tree, "")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)


def import_graph() -> dict[str, dict[str, Import]]:
    """optimize module → the optimize modules it imports at load time (module level, not TYPE_CHECKING), each
    with the statement that does. The package `optimize` itself is left out: its names are imported lazily."""
    graph: dict[str, dict[str, Import]] = {module_name(p): {} for p in sources()}
    for path in sources():
        here = module_name(path)
        for imp in imports(path):
            if imp.function is not None or imp.type_checking:
                continue
            for target in imp.modules:
                if target.startswith("optimize.") and target in graph and target != here:
                    graph[here].setdefault(target, imp)
    return graph


def find_cycle(graph: dict[str, dict[str, Import]]) -> list[str] | None:
    """One cycle of `graph` as the list of its modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := dfs(start)):
            return found
    return None


def test_no_import_cycle_between_optimize_modules() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"  {a} → {b}  at {graph[a][b].where()}" for a, b in zip(cycle, cycle[1:], strict=False)]
        raise AssertionError("import cycle: " + " → ".join(cycle) + "\n" + "\n".join(steps))


def test_the_projects_own_modules_are_imported_at_module_top() -> None:
    inside = [
        f"{imp.where()}: imports {', '.join(imp.modules)}"
        for imp in all_imports()
        if imp.function is not None
        and not imp.type_checking
        and any(m == "optimize" or m.startswith("optimize.") for m in imp.modules)
    ]
    assert not inside, "optimize modules imported inside functions (import them at module top):\n" + "\n".join(inside)


def test_heavy_libraries_are_named_through_optimize_lazy() -> None:
    direct = [
        f"{imp.where()}: imports {', '.join(imp.modules)}"
        for imp in all_imports()
        if imp.file != "optimize/lazy.py"
        and not imp.type_checking
        and any(m.split(".")[0] in HEAVY for m in imp.modules)
    ]
    assert not direct, 'heavy libraries imported directly (name them with `x = lazy("x")`):\n' + "\n".join(direct)


def test_importing_the_cli_imports_no_heavy_library() -> None:
    code = (
        f"import json, sys, optimize.cli\nprint(json.dumps([m for m in {NEVER_AT_CLI_IMPORT!r} if m in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert heavy == [], f"`import optimize.cli` imports {heavy}"


# --- the checks check ----------------------------------------------------------------------------------


def test_the_cycle_finder_finds_a_cycle_and_none_where_there_is_none() -> None:
    imp = Import("optimize/a.py", 1, None, False, ())
    assert find_cycle({"a": {"b": imp}, "b": {"c": imp}, "c": {"a": imp}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": imp}, "b": {"c": imp}, "c": {}}) is None


def test_imports_are_placed_in_their_function_and_type_checking_block(tmp_path: Path, monkeypatch) -> None:
    source_text = (
        "from typing import TYPE_CHECKING\n"
        "from optimize.errors import StageError\n"
        "if TYPE_CHECKING:\n"
        "    import torch\n"
        "class C:\n"
        "    def m(self):\n"
        "        from optimize import files\n"
    )
    tree_path = tmp_path / "optimize" / "_probe.py"
    tree_path.parent.mkdir()
    tree_path.write_text(source_text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = list(imports(tree_path))
    assert [(i.line, i.function, i.type_checking) for i in found] == [
        (1, None, False),
        (2, None, False),
        (4, None, True),
        (7, "C.m", False),
    ]
    assert found[1].modules == ("optimize.errors",)
