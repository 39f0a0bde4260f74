"""The package's layering (DEVELOPERS.md, "Where things go"): data → features → heads → train →
tune → serve (the search index between heads and serve), eval on heads and data only; no import circle between modules, counting the
imports inside functions too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import tagray

ROOT = Path(tagray.__file__).parent

# package → the tagray packages it must never import (directly or lazily)
FORBIDDEN = {
    "data": {"features", "heads", "train", "tune", "serve", "eval", "index", "commands"},
    "features": {"heads", "train", "tune", "serve", "eval", "index", "commands"},
    "heads": {"train", "tune", "serve", "eval", "index", "commands"},
    "eval": {"train", "tune", "serve", "index", "commands"},
    "index": {"train", "tune", "serve", "commands"},
    "train": {"tune", "serve", "commands"},
    "tune": {"serve", "commands"},
    "serve": {"train", "tune", "commands"},
}


def _imports() -> dict[str, set[str]]:
    """module → the tagray modules it imports (`from pkg import submodule` counts as the
    submodule; imports under `if TYPE_CHECKING:` are annotations, not dependencies)."""
    modules = {".".join(("tagray", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tagray"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("tagray")}
        graph[module] = deps
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else ""


def test_no_package_imports_a_layer_above_it():
    wrong = []
    for module, deps in _imports().items():
        for dep in deps:
            if _package(dep) in FORBIDDEN.get(_package(module), ()):
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_eval_and_heads_import_no_ray():
    for sub in ("eval", "heads"):
        for path in (ROOT / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path} imports Ray"


def test_no_import_circle_between_modules():
    graph = _imports()
    known = {m for m in graph}

    def resolve(dep: str) -> str | None:
        while dep and dep not in known:
            dep = dep.rpartition(".")[0]
        return dep or None

    edges = {m: {r for d in deps if (r := resolve(d)) and r != m and r != "tagray"} for m, deps in graph.items()}
    # Tarjan's strongly connected components: any component of size > 1 is a circle.
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, circles
