"""Imports run one way: the module import graph of ``kernels/`` and of ``widedeep/`` has no cycle.

The graph is read from the source with :mod:`ast` (nothing is imported), and it counts every import a module
can execute: module-level ones *and* the ones inside functions (a lazy import that closes a cycle is still a
cycle: it only moves the failure to whichever caller first runs it), relative ones, ``importlib.import_module``
of the package's own modules (``kernels/aot.py`` collects its variants that way), and the ``__init__`` of every
package a target lives in (``import a.b.c`` runs ``a/b/__init__.py`` first). Imports under
``if TYPE_CHECKING:`` never run and do not count.

Edges, for an import in module ``m``:
- ``import p.q`` / ``from p.q import name``: ``p.q``, plus each package around ``p.q`` that is not already around
  ``m`` (those are being imported when ``m`` runs);
- ``from p import name`` where ``p.name`` is a module: ``p.name`` (Python imports a submodule whatever state its
  package is in); where ``name`` is not a module it is read from ``p/__init__.py``: ``p`` itself, even when it
  is ``m``'s own package (``from . import SomeError`` needs the ``__init__`` to have defined it).
Only modules of the scanned package are nodes; a cycle through another package would need that package to
import back (``kernels`` imports nothing from ``widedeep``: checked here too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``ROOT/package`` (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom / importlib.import_module call, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch does run
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
                isinstance(f, ast.Name) and f.id in ("import_module", "__import__")
            ):
                yield node
        stack.extend(ast.iter_child_nodes(node))


def _string_constants(tree: ast.Module) -> list[str]:
    """String constants of the module's top-level assignments (e.g. ``MODULES = ("kernels.conv", ...)``)."""
    out = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            out += [n.value for n in ast.walk(stmt.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(package: str) -> tuple[dict[str, dict[str, int]], dict[str, set[str]]]:
    """(edges {importer: {imported: line}} between modules of ``package``, external {importer: top-level names})."""
    files = module_files(package)
    edges: dict[str, dict[str, int]] = {m: {} for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        own_pkg = mod if is_pkg else mod.rpartition(".")[0]
        around = set(_ancestors(mod)) | ({mod} if is_pkg else set())  # packages being imported when mod runs

        def add(target: str, line: int, *, reads_package: bool = False) -> None:
            if target.split(".")[0] != package:
                external[mod].add(target.split(".")[0])
                return
            chain = [a for a in _ancestors(target) if a not in around]
            if reads_package or target not in around:
                chain.append(target)
            for t in chain:
                if t in files and t != mod:  # (a package's __init__ reading its own names is no edge)
                    edges[mod][t] = min(line, edges[mod].get(t, line))

        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = own_pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    if sub in files:  # a submodule: imported whatever state its package is in
                        add(sub, node.lineno)
                    else:  # a name read from src's namespace: src must have run
                        add(src, node.lineno, reads_package=True)
            else:  # importlib.import_module(...)
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    add(arg.value, node.lineno)
                else:  # a computed name: any module this file names in its top-level constants
                    for name in _string_constants(tree):
                        if name in files:
                            add(name, node.lineno)
    return edges, external


def strongly_connected(edges: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components that hold a cycle (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[set[str]] = []

    def strong(v: str) -> None:  # the graphs are small: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return [c for c in comps if len(c) > 1 or min(c) in edges.get(min(c), {})]


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle (``[a, b, ..., a]``) through the first module of each cyclic component."""
    cycles = []
    for comp in strongly_connected(edges):
        start = min(comp)
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges.get(v, {})):
                    if w == start:
                        found = v
                        break
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start])
    return cycles


def describe(edges: dict[str, dict[str, int]], files: dict[str, Path]) -> str:
    """Each cyclic component: one cycle, then every import between its modules (file:line)."""
    out = []
    for comp, cycle in zip(strongly_connected(edges), find_cycles(edges)):
        out.append(f"cycle: {' -> '.join(cycle)}; the {len(comp)} modules' imports among themselves:")
        out += [
            f"    {a} -> {b}  ({files[a].relative_to(ROOT)}:{line})"
            for a in sorted(comp)
            for b, line in sorted(edges[a].items())
            if b in comp
        ]
    return "\n  ".join(out)


PACKAGES = [
    "kernels",
    "widedeep",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_import_graph_has_no_cycle(package):
    edges, _ = import_graph(package)
    files = module_files(package)
    cycles = find_cycles(edges)
    assert not cycles, f"{package}: {len(cycles)} cyclic group(s) of modules:\n  " + describe(edges, files)


def test_kernels_import_nothing_from_widedeep():
    _, external = import_graph("kernels")
    bad = sorted(m for m, names in external.items() if "widedeep" in names or "data_pipes" in names)
    assert not bad, f"kernels modules importing widedeep/data_pipes: {bad}"


def test_graph_reader_sees_lazy_relative_and_package_imports(tmp_path, monkeypatch):
    """The reader itself: a cycle closed only by a function-level relative import, one through a package's
    ``__init__``, one through importlib, and one hidden under TYPE_CHECKING (not a cycle)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")  # lazy: still a cycle a <-> b
    (pkg / "sub" / "__init__.py").write_text("from .x import y\n")
    (pkg / "sub" / "x.py").write_text("y = 1\n")
    (pkg / "c.py").write_text("from pkg.sub.x import y\n")  # runs pkg/sub/__init__ first
    (pkg / "sub" / "z.py").write_text("def h():\n    from pkg import c\n")
    (pkg / "sub" / "__init__.py").write_text("from .x import y\nfrom . import z\nz.h()\n")
    (pkg / "d.py").write_text("import importlib\nM = ('pkg.e',)\ndef k():\n    importlib.import_module(M[0])\n")
    (pkg / "e.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .f import F\ndef k():\n    from . import d\n"
    )
    (pkg / "f.py").write_text("from .e import k\n")  # e -> f only under TYPE_CHECKING: no cycle
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    edges, _ = import_graph("pkg")
    cycles = {frozenset(c) for c in find_cycles(edges)}
    assert frozenset({"pkg.a", "pkg.b"}) in cycles
    assert frozenset({"pkg.c", "pkg.sub", "pkg.sub.z"}) in cycles  # c -> pkg.sub (its __init__) -> z -> c
    assert frozenset({"pkg.d", "pkg.e"}) in cycles
    assert not any("pkg.f" in c for c in cycles)
    assert "pkg.sub" not in edges["pkg.sub.x"]  # a module never waits for its own package's __init__
