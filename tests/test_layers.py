"""
The layers of sockd, read from the source with C{ast}: every import (inside
functions too) and every module named in a string (C{import_module("...")},
a C{ServiceMaker}, a table of module names), checked against the rules of
C{docs/architecture.md}, and the import graph checked for cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import ROOT

PACKAGE = ROOT / "sockd"
PLUGINS = ROOT / "twisted" / "plugins" / "sockd_plugins.py"

#: the services: each imports the core and itself, never another service
SERVICES = ("sockd.echo", "sockd.chat", "sockd.files")
#: the daemons above the services: they put the services and the core together
TOP = ("sockd.tap", "sockd.daemons", "sockd.worker", "sockd.logs")
#: service modules the client shares with the servers: sans-I/O codecs,
#: never server state
CODECS = frozenset({"sockd.chat.text", "sockd.files.names", "sockd.files.codec"})
#: modules other programs load by name: C{python -m sockd.worker} (started
#: by the workers' supervisor), C{twistd --logger sockd.logs.journal_observer}.
#: Naming one is no import, so any layer may, and it makes no cycle.
ENTRY_POINTS = frozenset({"sockd.worker", "sockd.logs"})
#: imports that break a rule today, each with the change that ends it; the
#: test fails once one is gone, so the list only shrinks
PENDING: dict[tuple[str, str], str] = {}
#: calls whose string arguments name a module to import
LOADERS = frozenset(
    {"import_module", "__import__", "namedAny", "namedModule", "ServiceMaker"}
)


@dataclass(frozen=True)
class Edge:
    """One module naming another, where and how."""

    source: str
    target: str
    path: Path
    line: int
    #: C{import}, C{string} (imported by its name) or C{entry} (named for
    #: another program to load, see L{ENTRY_POINTS})
    kind: str
    #: the attribute a string names in C{target}, if any
    attribute: str = ""

    def __str__(self) -> str:
        where = self.path.relative_to(ROOT)
        how = {"import": "imports", "string": "names", "entry": "starts"}[self.kind]
        return f"{where}:{self.line}: {self.source} {how} {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def named_module(text: str, known: dict[str, Path]) -> tuple[str, str] | None:
    """
    (module, attribute) if C{text} is a module's dotted name, or one
    followed by an attribute (C{sockd.logs.journal_observer}).  The bare
    package C{sockd} is also the C{[sockd]} section and a file name's
    stem: it counts only in an import statement.
    """
    if text in known and text != "sockd":
        return text, ""
    module, _, attribute = text.rpartition(".")
    if module in known and module != "sockd" and attribute.isidentifier():
        return module, attribute
    return None


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def edges_of(
    source: str, path: Path, known: dict[str, Path], text: str | None = None
) -> Iterator[Edge]:
    """Every module under C{sockd} that C{path} (module C{source}) names."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    found: set[Edge] = set()
    loaded: set[int] = set()

    def add(target: str, node: ast.AST, kind: str, attribute: str = "") -> None:
        if target != source:
            line = getattr(node, "lineno", 0)
            found.add(Edge(source, target, path, line, kind, attribute))

    def imported(name: str, node: ast.AST) -> None:
        if name == "sockd" or name.startswith("sockd."):
            assert name in known, f"{path}:{getattr(node, 'lineno', 0)}: no {name}"
            add(name, node, "import")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # from a.b import c: the module a.b.c if there is one, else a.b
                full = f"{base}.{alias.name}"
                imported(full if full in known else base, node)
        elif isinstance(node, ast.Call) and _call_name(node) in LOADERS:
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                for constant in ast.walk(arg):
                    if isinstance(constant, ast.Constant) and isinstance(
                        constant.value, str
                    ):
                        loaded.add(id(constant))
                        named = named_module(constant.value, known)
                        if named is not None:
                            add(named[0], constant, "string", named[1])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in loaded
        ):
            named = named_module(node.value, known)
            if named is not None:
                kind = "entry" if named[0] in ENTRY_POINTS else "string"
                add(named[0], node, kind, named[1])
    yield from found


def all_edges() -> list[Edge]:
    known = our_modules()
    edges = [e for name, path in known.items() for e in edges_of(name, path, known)]
    return sorted(edges, key=lambda e: (e.source, e.line, e.target))


def layer(module: str) -> str:
    """C{root}, C{core}, C{client}, C{top}, or the service's package."""
    if module == "sockd":
        return "root"
    for prefix in ("sockd.core", "sockd.client", *SERVICES, *TOP):
        if module == prefix or module.startswith(prefix + "."):
            return "top" if prefix in TOP else prefix.removeprefix("sockd.")
    raise AssertionError(f"{module}: in no layer; add it to tests/test_layers.py")


def allowed(edge: Edge) -> bool:
    """Whether C{edge.source} may import (or name) C{edge.target}."""
    mine, theirs = layer(edge.source), layer(edge.target)
    if mine == "root":
        return False  # the package itself holds only its version
    if edge.kind == "entry" or theirs in ("root", "core") or mine == theirs:
        return True
    if mine == "client":
        return edge.target in CODECS
    return mine == "top" and f"sockd.{theirs}" in SERVICES


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def top_level_names(path: Path) -> set[str]:
    """What a module defines or imports at its top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def runs_as_main(path: Path) -> bool:
    """Whether a module does something when run (C{python -m}): a main guard."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return True
    return False


class LayerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.edges = all_edges()

    def test_layer_rules(self) -> None:
        broken = [
            e
            for e in self.edges
            if not allowed(e) and (e.source, e.target) not in PENDING
        ]
        if broken:
            self.fail(
                "imports across the layers (the core imports only the core; a "
                "service the core and itself; the client the core and CODECS; "
                "the daemons above anything but the client):\n"
                + "\n".join(map(str, broken))
            )

    def test_pending_exceptions_still_exist(self) -> None:
        pairs = {(e.source, e.target) for e in self.edges}
        gone = [f"{s} -> {t}" for s, t in PENDING if (s, t) not in pairs]
        if gone:
            self.fail("fixed, remove from PENDING in this file: " + ", ".join(gone))

    def test_no_cycles(self) -> None:
        imports = [e for e in self.edges if e.kind != "entry"]
        found = cycles(imports)
        described = []
        for component in found:
            inside = [
                str(e)
                for e in imports
                if e.source in component and e.target in component
            ]
            described.append(" <-> ".join(component) + ":\n  " + "\n  ".join(inside))
        if found:
            self.fail("import cycles:\n" + "\n".join(described))

    def test_entry_points_named_exist(self) -> None:
        # A spawn command or --logger naming a moved module fails only at
        # run time, in another process: check each name here.
        known = our_modules()
        entries = [e for e in self.edges if e.kind == "entry"]
        self.assertTrue(entries)
        for e in entries:
            path = known[e.target]
            if e.attribute:
                self.assertIn(e.attribute, top_level_names(path), str(e))
            else:
                self.assertTrue(runs_as_main(path), f"{e}: no __main__ guard")

    def test_the_checker_sees_every_way_of_naming_a_module(self) -> None:
        # A rule that cannot see an import is no rule: each form, found.
        source = (
            "import importlib\n"
            "import sockd.echo.tap\n"
            "from sockd.chat import state\n"
            "def later():\n"
            "    from sockd.files.protocol import FileFactory\n"
            "    importlib.import_module('sockd.client.main')\n"
            "TABLE = {'echo': 'sockd.echo.protocol'}\n"
            "ARGV = ['python', '-m', 'sockd.worker']\n"
            "from sockd.core.config import Config\n"
            "from . import limits\n"
            "MAKER = namedAny('sockd.tap.makeService')\n"
            "LOGGER = 'sockd.logs.journal_observer'\n"
        )
        path = ROOT / "sockd" / "core" / "_probe.py"
        known = {**our_modules(), "sockd.core._probe": path}
        edges = list(edges_of("sockd.core._probe", path, known, source))
        found = {(e.target, e.kind, e.line) for e in edges}
        self.assertEqual(
            found,
            {
                ("sockd.echo.tap", "import", 2),
                ("sockd.chat.state", "import", 3),
                ("sockd.files.protocol", "import", 5),
                ("sockd.client.main", "string", 6),
                ("sockd.echo.protocol", "string", 7),
                ("sockd.worker", "entry", 8),
                ("sockd.core.config", "import", 9),
                ("sockd.core.limits", "import", 10),
                ("sockd.tap", "string", 11),
                ("sockd.logs", "entry", 12),
            },
        )
        broken = sorted(str(e) for e in edges if not allowed(e))
        self.assertEqual(len(broken), 6, broken)
        self.assertIn(
            "sockd/core/_probe.py:5: sockd.core._probe imports sockd.files.protocol",
            broken,
        )

    def test_the_cycle_finder(self) -> None:
        here = Path(__file__)

        def e(a: str, b: str) -> Edge:
            return Edge(a, b, here, 1, "import")

        edges = [e("a", "b"), e("b", "c"), e("c", "a"), e("c", "d"), e("d", "d")]
        self.assertEqual(cycles(edges), [["a", "b", "c"]])
        self.assertEqual(cycles([e("a", "b"), e("b", "c")]), [])

    def test_plugins_name_daemons_only(self) -> None:
        # The plugin file imports no sockd code (a plugin scan must not) and
        # names only modules holding a twistd Options and makeService.
        known = our_modules()
        edges = list(edges_of("twisted.plugins.sockd_plugins", PLUGINS, known))
        self.assertEqual(len(edges), 4)
        for e in edges:
            self.assertEqual(e.kind, "string", str(e))
            names = top_level_names(known[e.target])
            self.assertLessEqual({"Options", "makeService"}, names, str(e))
            self.assertIn(layer(e.target), ("top", "echo", "chat", "files"), str(e))


def summary() -> dict[str, set[str]]:
    """Which package imports which (for docs/architecture.md)."""

    def package_of(module: str) -> str:
        if layer(module) in ("root", "top"):
            return module
        return ".".join(module.split(".")[:2])

    result: dict[str, set[str]] = {}
    for e in all_edges():
        if e.kind != "entry":
            a, b = package_of(e.source), package_of(e.target)
            if a != b:
                result.setdefault(a, set()).add(b)
    return result


if __name__ == "__main__":
    for package, targets in sorted(summary().items()):
        print(f"{package} -> {', '.join(sorted(targets))}")
