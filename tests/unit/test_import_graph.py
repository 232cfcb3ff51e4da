"""The import graph of ferry's source: layers that only point down, and no cycles.

config (0) < workers (1) < tasks (2) < scripts (3): a module imports only from its
own layer or a lower one, no module imports another that imports it back (not
even inside a package), and the test bed (scripts.testbed) does not import the
CLI, benchmarks, staging chains or developer tools it serves.  An import inside a
function in config/, workers/ or tasks/ is allowed only where it saves start-up
time or avoids an optional dependency, with a comment on its line or the line
before saying which ("start-up" or "optional").

Every `import` and `from ... import` counts, wherever it is: at module level,
inside a function, under `if TYPE_CHECKING:` (a type-only import is still a
dependency on the module), relative ones (`from . import x`) resolved against the
importer's package.  An import is an edge to the most specific module of the tree
it names (`from workers import store` -> workers.store, `from workers.store
import Store` -> workers.store); the parent packages Python runs on the way are
not counted.  Imports of anything outside config/, workers/, tasks/ and scripts/
are ignored.  Pure Python: the files are parsed with ast, never imported.
"""

from __future__ import annotations

import ast
import gc
import io
import tokenize
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS = {"config": 0, "workers": 1, "tasks": 2, "scripts": 3}
# the test bed is what tests and benchmarks import: it must not pull in its users
TESTBED = "scripts.testbed"
NOT_FROM_TESTBED = ("scripts.cli", "scripts.bench", "scripts.staging", "scripts.devtools")
# where an import inside a function must say why (the agreed rule)
REASONED = ("config", "workers", "tasks")
REASONS = ("start-up", "optional")


@dataclass(frozen=True)
class Import:
    """One import of a module of the tree by another."""

    importer: str
    name: str  # its target when it has one, else the module as written
    target: str | None  # the module of the tree it names, None for one outside the tree
    path: str  # the importer's file, relative to the root
    line: int
    in_function: bool
    type_only: bool  # under `if TYPE_CHECKING:`
    reasoned: bool  # a comment naming a REASONS word on its line(s) or the line before

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def describe(self) -> str:
        notes = [n for n, on in (("inside a function", self.in_function),
                                 ("under TYPE_CHECKING", self.type_only)) if on]
        return (f"{self.where} imports {self.target or self.name}"
                + (f" ({', '.join(notes)})" if notes else ""))


def find_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py under the layers' directories."""
    found: dict[str, Path] = {}
    for top in LAYERS:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific module of the tree `name` names (itself or a parent package)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _comments(source: str) -> dict[int, str]:
    found: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.functions = 0
        self.type_only = 0
        # (name to resolve, module as written, line, last line, in function, type only)
        self.found: list[tuple[str, str, int, int, bool, bool]] = []

    def _add(self, name: str, written: str, node: ast.stmt) -> None:
        self.found.append((name, written, node.lineno, node.end_lineno or node.lineno,
                           self.functions > 0, self.type_only > 0))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1

    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_only += 1
        for child in node.body:
            self.visit(child)
        self.type_only -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".") if self.package else []
            base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            stem = ".".join([*base, *([node.module] if node.module else [])])
        else:
            stem = node.module or ""
        for alias in node.names:
            # `from a import b`: the module a.b when there is one, else a itself
            self._add(stem if alias.name == "*" else f"{stem}.{alias.name}", stem, node)


def parse_python(source: str, filename: str) -> ast.Module:
    """ast.parse with the garbage collector held off: on CPython 3.11.7 a collection that
    runs finalizers while the compiler builds the tree can raise "AST constructor
    recursion depth mismatch" (seen under pytest-xdist; fixed in later 3.11 releases)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename)
    finally:
        if enabled:
            gc.enable()


def find_imports(root: Path) -> list[Import]:
    """Every import statement's modules, by every module of the tree; one record per
    module named per statement (`from a import b, c` of two attributes is one)."""
    modules = find_modules(root)
    found: dict[tuple[str, str, int], Import] = {}
    for module, path in modules.items():
        source = path.read_text()
        visitor = _Visitor(module, path.name == "__init__.py")
        visitor.visit(parse_python(source, str(path)))
        comments = _comments(source)
        for name, written, line, last, in_function, type_only in visitor.found:
            target = _resolve(name, modules)
            if target == module:
                continue  # `from . import x` of an attribute of the package itself
            reasoned = any(word in comments.get(n, "")
                           for n in range(line - 1, last + 1) for word in REASONS)
            imp = Import(module, target or written, target, str(path.relative_to(root)), line,
                         in_function, type_only, reasoned)
            found.setdefault((module, imp.name, line), imp)
    return list(found.values())


def _internal(imports: Iterable[Import]) -> list[tuple[Import, str]]:
    return [(imp, imp.target) for imp in imports if imp.target is not None]


def _graph(imports: Iterable[Import]) -> dict[str, dict[str, Import]]:
    graph: dict[str, dict[str, Import]] = {}
    for imp, target in _internal(imports):
        graph.setdefault(imp.importer, {}).setdefault(target, imp)
    return graph


def _components(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def _shortest_cycle(graph: dict[str, dict[str, Import]], start: str,
                    within: set[str]) -> list[str]:
    """The shortest cycle start -> ... -> start inside `within` (breadth first)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, {})):
            if child not in within:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover


def find_cycles(imports: Iterable[Import]) -> list[list[Import]]:
    """Import cycles, as the imports that make each, in order: for every module on a
    cycle, the shortest cycle through it (each cycle once, starting at its smallest
    module)."""
    graph = _graph(imports)
    cycles: dict[tuple[str, ...], list[Import]] = {}
    for component in _components(graph):
        members = set(component)
        for module in component:
            path = _shortest_cycle(graph, module, members)[:-1]
            turn = path.index(min(path))
            path = path[turn:] + path[:turn]
            ring = [*path, path[0]]
            cycles.setdefault(tuple(path), [graph[a][b] for a, b in pairwise(ring)])
    return [cycles[key] for key in sorted(cycles, key=lambda k: (len(k), k))]


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def cycle_problems(imports: Iterable[Import]) -> list[str]:
    return [f"import cycle {' -> '.join([c[0].importer, *(i.name for i in c)])}:\n"
            + "\n".join(f"    {i.describe()}" for i in c)
            for c in find_cycles(imports)]


def layer_problems(imports: Iterable[Import]) -> list[str]:
    problems = []
    order = " < ".join(LAYERS)
    for imp, target in _internal(imports):
        low, high = _layer(imp.importer), _layer(target)
        if high > low:
            problems.append(f"{imp.describe()}: {imp.importer.split('.')[0]} (layer {low}) "
                            f"imports from {target.split('.')[0]} (layer {high}); "
                            f"imports point down only ({order})")
        if _within(imp.importer, TESTBED) and any(
                _within(target, user) for user in NOT_FROM_TESTBED):
            problems.append(f"{imp.describe()}: the test bed ({TESTBED}) must not import "
                            f"its users ({', '.join(NOT_FROM_TESTBED)})")
    return problems


def function_import_problems(imports: Iterable[Import]) -> list[str]:
    seen: set[tuple[str, int]] = set()
    problems = []
    for imp in imports:
        if (not imp.in_function or imp.reasoned or imp.importer.split(".")[0] not in REASONED
                or (imp.path, imp.line) in seen):
            continue
        seen.add((imp.path, imp.line))
        problems.append(f"{imp.describe()}: an import inside a function needs a comment on "
                        f"its line or the line before that says why, naming "
                        f"{' or '.join(repr(r) for r in REASONS)}")
    return problems


def _check(problems: list[str]) -> None:
    if problems:
        pytest.fail(f"{len(problems)} problem(s):\n" + "\n".join(problems), pytrace=False)


# ---------------------------------------------------------------- ferry's own tree


@pytest.fixture(scope="module")
def tree_imports() -> list[Import]:
    return find_imports(ROOT)


def test_the_tree_has_no_import_cycles(tree_imports: list[Import]) -> None:
    _check(cycle_problems(tree_imports))


def test_imports_point_down_the_layers(tree_imports: list[Import]) -> None:
    _check(layer_problems(tree_imports))


def test_imports_inside_functions_say_why(tree_imports: list[Import]) -> None:
    _check(function_import_problems(tree_imports))


def test_the_checker_sees_the_whole_tree(tree_imports: list[Import]) -> None:
    modules = find_modules(ROOT)
    assert {"config.settings", "workers.agent", "tasks.client"} <= set(modules)
    assert any(m.startswith("scripts.") for m in modules)
    assert any(i.importer == "config.celery_app" and i.target == "config.settings"
               for i in tree_imports)


# ---------------------------------------------------------------- the checker itself


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for top in LAYERS:
        (root / top).mkdir(exist_ok=True)
    return root


CLEAN = {
    "config/__init__.py": "",
    "config/settings.py": "import os\n",
    "workers/__init__.py": "",
    "workers/store.py": "from config.settings import os\nfrom . import util\n",
    "workers/util.py": "import json\n",
    "tasks/__init__.py": "",
    "tasks/api.py": ("from workers import store\n"
                     "def f():\n    import lxml  # optional: lxml only for XML output\n"),
    "scripts/__init__.py": "",
    "scripts/cli/__init__.py": "from scripts.testbed import stack\nfrom tasks.api import f\n",
    "scripts/testbed/__init__.py": "",
    "scripts/testbed/stack.py": "import tasks\n",
}


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    imports = find_imports(_tree(tmp_path, CLEAN))
    assert cycle_problems(imports) == []
    assert layer_problems(imports) == []
    assert function_import_problems(imports) == []
    edges = {(i.importer, i.target) for i in imports if i.target is not None}
    assert edges == {("workers.store", "config.settings"), ("workers.store", "workers.util"),
                     ("tasks.api", "workers.store"), ("scripts.cli", "scripts.testbed.stack"),
                     ("scripts.cli", "tasks.api"), ("scripts.testbed.stack", "tasks")}


def test_a_cycle_is_reported_in_order_with_its_lines(tmp_path: Path) -> None:
    files = {**CLEAN,
             "workers/a.py": "import json\nfrom workers import b\n",
             "workers/b.py": "from .c import thing\n",
             "workers/c.py": ("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from workers.a import A\n")}
    problems = cycle_problems(find_imports(_tree(tmp_path, files)))
    assert problems == [
        "import cycle workers.a -> workers.b -> workers.c -> workers.a:\n"
        "    workers/a.py:2 imports workers.b\n"
        "    workers/b.py:1 imports workers.c\n"
        "    workers/c.py:3 imports workers.a (under TYPE_CHECKING)"]


def test_a_cycle_through_a_function_level_import_and_a_package_is_reported(
        tmp_path: Path) -> None:
    files = {**CLEAN,
             "tasks/pkg/__init__.py": "from .inner import x\n",
             "tasks/pkg/inner.py": "def g():\n    from .. import pkg  # start-up\n"}
    problems = cycle_problems(find_imports(_tree(tmp_path, files)))
    assert problems == [
        "import cycle tasks.pkg -> tasks.pkg.inner -> tasks.pkg:\n"
        "    tasks/pkg/__init__.py:1 imports tasks.pkg.inner\n"
        "    tasks/pkg/inner.py:2 imports tasks.pkg (inside a function)"]


def test_an_upward_import_is_reported(tmp_path: Path) -> None:
    files = {**CLEAN, "config/celery_app.py": "x = 1\nfrom workers.store import Store\n"}
    problems = layer_problems(find_imports(_tree(tmp_path, files)))
    assert problems == [
        "config/celery_app.py:2 imports workers.store: config (layer 0) imports from "
        "workers (layer 1); imports point down only (config < workers < tasks < scripts)"]


def test_the_test_bed_importing_its_users_is_reported(tmp_path: Path) -> None:
    files = {**CLEAN, "scripts/bench/__init__.py": "",
             "scripts/testbed/fleet.py": "from scripts.bench import run\n"}
    problems = layer_problems(find_imports(_tree(tmp_path, files)))
    assert problems == [
        "scripts/testbed/fleet.py:1 imports scripts.bench: the test bed (scripts.testbed) "
        "must not import its users (scripts.cli, scripts.bench, scripts.staging, "
        "scripts.devtools)"]


def test_a_function_level_import_without_its_reason_is_reported(tmp_path: Path) -> None:
    files = {**CLEAN,
             "workers/late.py": ("def f():\n"
                                 "    # reads the store late\n"
                                 "    from workers import store\n"
                                 "def g():\n"
                                 "    # start-up: the store pulls in redis\n"
                                 "    from workers import store\n"
                                 "def h():\n"
                                 "    from workers import (  # optional: no store without redis\n"
                                 "        util)\n"),
             "config/late.py": "def f():\n    from collections.abc import Iterator\n",
             "scripts/late.py": "def f():\n    from workers import store\n"}
    problems = function_import_problems(find_imports(_tree(tmp_path, files)))
    assert problems == [
        "config/late.py:2 imports collections.abc (inside a function): an import inside a "
        "function needs a comment on its line or the line before that says why, naming "
        "'start-up' or 'optional'",
        "workers/late.py:3 imports workers.store (inside a function): an import inside a "
        "function needs a comment on its line or the line before that says why, naming "
        "'start-up' or 'optional'"]
