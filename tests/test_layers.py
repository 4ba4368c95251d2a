"""The packages' import layers, read from the source with ``ast`` (imports inside functions count:
a local import only hides a cycle).

``unlearn``'s declared order, bottom to top (a layer may import only layers below it, and itself):

1. ``data``    records, names, masks, record files;
2. ``models``  adapters, loaders of local directories and hub ids;
3. ``methods`` and ``eval``, side by side (neither imports the other);
4. ``world``   the built-in world as a *source* of models and records, used by the rest through the
   same interfaces as a user's checkpoint and record directory (its quality gates use eval and models);
5. ``run``     the top-level modules ``unlearn/*.py`` (loop, runs, run_mllm, run_sd, tracing, cli, ...),
   which may import everything.

``knowtrace``: no import cycle between its modules, and no import of ``unlearn``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNLEARN_ORDER = {"data": 0, "models": 1, "methods": 2, "eval": 2, "world": 3, "run": 4}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. "unlearn.data.records"
    target: str  # imported module (a submodule where the name is one, else the package)
    where: str  # file:line of the import statement

    def __str__(self) -> str:
        return f"{self.where}: {self.source} -> {self.target}"


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every import statement of the package's modules (at any depth of the syntax tree), resolved
    to module names: relative imports against the importing module, ``from M import name`` to
    ``M.name`` where that is a module of the package."""
    mods = modules(root, package)
    edges = []
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                edges += [Edge(name, a.name, where) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[:len(base) - node.level + (1 if is_package else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                edges += [Edge(name, t, where) for t in subs or [target]]
    return edges


def layer_of(module: str, package: str, order: dict[str, int]) -> str | None:
    """The layer of a module of ``package``: its subpackage in ``order``, else "run"; None outside."""
    parts = module.split(".")
    if parts[0] != package:
        return None
    return parts[1] if len(parts) > 1 and parts[1] in order else "run"


def layer_violations(edges: list[Edge], package: str, order: dict[str, int]) -> list[str]:
    """Imports from a layer into one that is not strictly below it (a different layer of the same rank counts)."""
    out = []
    for e in edges:
        a, b = layer_of(e.source, package, order), layer_of(e.target, package, order)
        if a is not None and b is not None and a != b and not order[b] < order[a]:
            out.append(f"{e}  ({a} may not import {b})")
    return out


def cycles(edges: list[Edge], within: str) -> list[list[Edge]]:
    """Import cycles among the modules under ``within``: a closed path of edges for every back edge a
    depth-first search meets (none: the import graph is acyclic)."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        if e.source.split(".")[0] == within == e.target.split(".")[0] and e.source != e.target:
            graph.setdefault(e.source, []).append(e)
    found, done, stack, trail = [], set(), [], []  # trail[i]: the edge from stack[i] to stack[i + 1]

    def visit(v):
        stack.append(v)
        for e in graph.get(v, []):
            if e.target in stack:  # a back edge closes a cycle
                found.append(trail[stack.index(e.target):] + [e])
            elif e.target not in done:
                trail.append(e)
                visit(e.target)
                trail.pop()
        stack.pop()
        done.add(v)

    for v in sorted(graph):
        if v not in done:
            visit(v)
    return found


def _report(cycle: list[Edge]) -> str:
    return "cycle:\n  " + "\n  ".join(map(str, cycle))


# ----------------------------------------------------------------------------- the packages


def test_unlearn_follows_its_declared_layers():
    edges = import_edges(ROOT, "unlearn")
    assert any(e.source == "unlearn.run_mllm" and e.target.startswith("unlearn.world") for e in edges)  # parsed
    bad = layer_violations(edges, "unlearn", UNLEARN_ORDER)
    assert not bad, "imports against unlearn's layer order (data < models < methods, eval < world < run):\n" + \
        "\n".join(bad)


def test_knowtrace_has_no_import_cycle():
    found = cycles(import_edges(ROOT, "knowtrace"), "knowtrace")
    assert not found, "\n".join(map(_report, found))


def test_knowtrace_does_not_import_unlearn():
    bad = [str(e) for e in import_edges(ROOT, "knowtrace") if e.target.split(".")[0] == "unlearn"]
    assert not bad, "knowtrace must not depend on unlearn:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- the checker itself


@pytest.fixture
def tmp_package(tmp_path):
    """pkg.low.a imports pkg.high.b inside a function; pkg.high.b imports pkg.low at module level;
    pkg.low.__init__ re-exports a; pkg.run imports both."""
    files = {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from .a import f\n",
        "pkg/low/a.py": "def f():\n    from ..high import b\n    return b\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from ..low import f\nimport pkg.low.a\n",
        "pkg/run.py": "from .high import b\nfrom . import low\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_imports_are_resolved_at_any_depth(tmp_package):
    got = {(e.source, e.target, e.where) for e in import_edges(tmp_package, "pkg")}
    assert ("pkg.low.a", "pkg.high.b", "pkg/low/a.py:2") in got  # relative, inside a function, a submodule
    assert ("pkg.low", "pkg.low.a", "pkg/low/__init__.py:1") in got  # relative from a package's __init__
    assert ("pkg.high.b", "pkg.low", "pkg/high/b.py:1") in got  # a name from a package: the package
    assert ("pkg.high.b", "pkg.low.a", "pkg/high/b.py:2") in got  # absolute
    assert ("pkg.run", "pkg.low", "pkg/run.py:2") in got  # "from . import low": the subpackage


def test_a_synthetic_cycle_fails(tmp_package):
    edges = import_edges(tmp_package, "pkg")
    found = cycles(edges, "pkg")
    assert len(found) == 1 and {e.source for e in found[0]} >= {"pkg.low.a", "pkg.high.b"}
    assert found[0][0].source == found[0][-1].target  # a closed path
    order = {"low": 0, "high": 1, "run": 2}
    assert layer_violations(edges, "pkg", order) == \
        ["pkg/low/a.py:2: pkg.low.a -> pkg.high.b  (low may not import high)"]
    # the same two layers side by side: each import between them is reported
    assert len(layer_violations(edges, "pkg", {"low": 0, "high": 0, "run": 2})) == 3
    # without the function-level import, no cycle and no violation
    (tmp_package / "pkg/low/a.py").write_text("def f():\n    return 1\n")
    edges = import_edges(tmp_package, "pkg")
    assert cycles(edges, "pkg") == [] and layer_violations(edges, "pkg", order) == []


def test_the_readme_map_names_every_module():
    """The README's folder map is the architecture: a module it does not name is a module nobody placed."""
    import re

    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`([\w/]+\.py)`", text[text.index("## Packages"):text.index("## The concept world")]))
    missing = [str(p.relative_to(ROOT)) for pkg in ("knowtrace", "unlearn") for p in sorted((ROOT / pkg).rglob("*.py"))
               if p.name != "__init__.py" and p.name not in named]
    assert not missing, f"README.md's folder map (## Packages) does not name: {missing}"
