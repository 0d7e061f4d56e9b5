"""The import rules of docs/architecture.md, read from the source with ``ast`` (nothing is imported).

Every ``.py`` file of ``src/``, ``examples/``, ``benchmarks/`` and ``training/`` is parsed, and every import in it
counts, at module level or inside a function:

(a) no import cycle among ``realign_pipeline`` modules;
(b) no file reaches another module's private name (``from M import _name``, ``M._name``), and no file outside a
    package imports that package's private module (``realign_pipeline._pil_backend`` is private to
    ``realign_pipeline``).

tests/ is not scanned. A module loaded by a computed name (``importlib.import_module(f"...{name}")``) is not
seen: keep such loading for plugins named in saved configurations.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "realign_pipeline"
SCANNED = ("src", "examples", "benchmarks", "training")

#: Private names reached from outside their scope, left for now: (file, private name), each with a comment saying
#: whose it is. Empty: a name another module needs gets a public name instead.
ALLOWED_PRIVATE: set[tuple[str, str]] = set()


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str | None:
    """``realign_pipeline.a.b`` for a file of ``src/``; None for a script (it cannot be imported back)."""
    if SRC not in path.parents:
        return None
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files() -> Iterator[Path]:
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


@dataclass
class SourceFile:
    path: Path
    module: str | None
    is_package: bool
    tree: ast.Module
    #: (line, imported realign_pipeline module) for every import, after resolving relative imports
    imports: list[tuple[int, str]] = field(default_factory=list)
    #: (line, dotted name) of every private name reached in another module
    private: list[tuple[int, str]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.path.relative_to(ROOT).as_posix() if ROOT in self.path.parents else self.path.name


class ImportGraph:
    """Every scanned file, its ``realign_pipeline`` imports, and the private names it reaches."""

    def __init__(self) -> None:
        self.files = [
            SourceFile(path, _module_name(path), path.name == "__init__.py", ast.parse(path.read_text(), str(path)))
            for path in _files()
        ]
        self.modules = {f.module for f in self.files if f.module}
        for source in self.files:
            self._read(source)

    # --- names -------------------------------------------------------------------------------------------------
    def _resolve_relative(self, source: SourceFile, module: str | None, level: int) -> str:
        if not level:
            return module or ""
        if source.module is None:
            raise AssertionError(f"{source.label}: a relative import outside the package")
        parts = source.module.split(".")
        if not source.is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([module] if module else []))

    def _known(self, dotted: str) -> str | None:
        """The longest prefix of `dotted` that is a module of the package."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in self.modules:
                return candidate
        return None

    def _private_in(self, source: SourceFile, dotted: str) -> str | None:
        """The private part of `dotted` (up to its first private name) that `source` may not reach, else None.

        A private module ``P._m`` belongs to package ``P``: its modules may import it. A private name ``M._x``
        that is not a module belongs to module ``M`` alone.
        """
        parts = dotted.split(".")
        for i, part in enumerate(parts[1:], start=1):
            if not _is_private(part):
                continue
            owner = ".".join(parts[:i])
            is_module = ".".join(parts[: i + 1]) in self.modules
            inside = source.module is not None and (
                source.module == owner or (is_module and source.module.startswith(owner + "."))
            )
            if not inside:
                return ".".join(parts[: i + 1])
        return None

    # --- reading one file --------------------------------------------------------------------------------------
    def _read(self, source: SourceFile) -> None:
        bound: dict[str, str] = {}  # local name -> realign_pipeline module it is bound to (any scope of the file)
        for node in ast.walk(source.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != PACKAGE:
                        continue
                    self._use(source, node.lineno, alias.name)
                    if alias.asname:
                        target = self._known(alias.name)
                        if target == alias.name:
                            bound[alias.asname] = target
                    else:
                        bound[PACKAGE] = PACKAGE
            elif isinstance(node, ast.ImportFrom):
                module = self._resolve_relative(source, node.module, node.level)
                if module.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    if full in self.modules:
                        self._use(source, node.lineno, full)
                        bound[alias.asname or alias.name] = full
                    else:
                        self._use(source, node.lineno, module, name=alias.name)
        for node in ast.walk(source.tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                base = _dotted(node.value)
                if base is None or base.split(".")[0] not in bound:
                    continue
                head, _, rest = base.partition(".")
                module = bound[head] + (f".{rest}" if rest else "")
                if self._known(module) == module:
                    private = self._private_in(source, f"{module}.{node.attr}")
                    if private:
                        source.private.append((node.lineno, private))

    def _use(self, source: SourceFile, line: int, module: str, name: str | None = None) -> None:
        target = self._known(module)
        if target is None:
            raise AssertionError(f"{source.label}:{line}: imports {module}, which is not a module of the package")
        if target != source.module:
            source.imports.append((line, target))
        private = self._private_in(source, module if name is None else f"{module}.{name}")
        if private:
            source.private.append((line, private))

    # --- checks ------------------------------------------------------------------------------------------------
    def edges(self) -> dict[str, dict[str, tuple[str, int]]]:
        """module -> {imported module: (file, line) of the first such import}."""
        graph: dict[str, dict[str, tuple[str, int]]] = {m: {} for m in self.modules}
        for source in self.files:
            if source.module is None:
                continue
            for line, target in source.imports:
                graph[source.module].setdefault(target, (source.label, line))
        return graph

    def cycles(self) -> list[list[str]]:
        """One cycle through each strongly connected group of modules (Tarjan), as ``[a, b, ..., a]``."""
        graph = self.edges()
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        groups: list[list[str]] = []

        def connect(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for nxt in sorted(graph[node]):
                if nxt not in index:
                    connect(nxt)
                    low[node] = min(low[node], low[nxt])
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

        for node in sorted(graph):
            if node not in index:
                connect(node)
        return [self._cycle_in(set(group), graph) for group in groups]

    @staticmethod
    def _cycle_in(group: set[str], graph: dict[str, dict[str, tuple[str, int]]]) -> list[str]:
        """A shortest cycle through the group's first module (breadth-first inside the group)."""
        start = min(group)
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier:
            following = []
            for node in frontier:
                for nxt in sorted(graph[node]):
                    if nxt not in group:
                        continue
                    if nxt == start:
                        path = [node]
                        while path[-1] != start:
                            path.append(previous[path[-1]])
                        return [start, *reversed(path[:-1]), start]
                    if nxt not in previous:
                        previous[nxt] = node
                        following.append(nxt)
            frontier = following
        raise AssertionError(f"no cycle through {start}")


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute lookups on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph()


def test_the_scan_sees_the_package_and_its_function_level_imports(graph):
    assert {"realign_pipeline", "realign_pipeline.pipeline", "realign_pipeline.cli"} <= graph.modules
    edges = graph.edges()
    # the CLI imports the pipeline inside its command functions only: those imports must count
    assert any(target == "realign_pipeline.pipeline" for module in graph.modules if module.startswith(
        "realign_pipeline.cli") for target in edges[module])
    assert len(graph.files) > len(graph.modules)  # examples, benchmarks and training scripts are read too


def test_no_import_cycle(graph):
    edges = graph.edges()
    reports = []
    for cycle in graph.cycles():
        steps = [f"{a} -> {b} ({':'.join(map(str, edges[a][b]))})" for a, b in itertools.pairwise(cycle)]
        reports.append("cycle:\n    " + "\n    ".join(steps))
    assert not reports, "import cycles among realign_pipeline modules:\n  " + "\n  ".join(reports)


def test_no_private_name_of_another_module(graph):
    found = {(source.label, name): line for source in graph.files for line, name in source.private}
    violations = sorted(f"{label}:{line}: {name}" for (label, name), line in found.items()
                        if (label, name) not in ALLOWED_PRIVATE)
    assert not violations, "private names reached from another module:\n  " + "\n  ".join(violations)
    stale = sorted(f"{label}: {name}" for label, name in ALLOWED_PRIVATE if (label, name) not in found)
    assert not stale, "allowed private names no longer used (remove them from ALLOWED_PRIVATE):\n  " + "\n  ".join(stale)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A cycle through a function-level import, and private names reached both ways, are found."""
    graph = ImportGraph.__new__(ImportGraph)
    sources = {
        "realign_pipeline.a": "from . import b\nimport realign_pipeline.c as c\nc._hidden()\n",
        "realign_pipeline.b": "def f():\n    from .a import _helper\n",
        "realign_pipeline.c": "from ._inner import x\n",
        "realign_pipeline._inner": "x = 1\n",
    }
    graph.files = [
        SourceFile(tmp_path / f"{name}.py", name, False, ast.parse(text)) for name, text in sources.items()
    ]
    graph.modules = set(sources)
    for source in graph.files:
        graph._read(source)
    assert graph.cycles() == [["realign_pipeline.a", "realign_pipeline.b", "realign_pipeline.a"]]
    private = {source.module: [name for _, name in source.private] for source in graph.files}
    assert private == {
        "realign_pipeline.a": ["realign_pipeline.c._hidden"],
        "realign_pipeline.b": ["realign_pipeline.a._helper"],
        "realign_pipeline.c": [],  # a private module of its own package
        "realign_pipeline._inner": [],
    }
