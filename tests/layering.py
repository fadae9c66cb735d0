"""An import-layering checker: which room (top-level module or subpackage) may import which.

`check(root, package, allowed)` parses every module under `root` (the package directory) and
returns one line per problem:
  - a forbidden edge: room A imports room B and B is not in allowed[A] (or, with a narrower
    entry `allowed[A]` holding "B.sub", only that module of B may be imported);
  - a cycle between rooms (A → B → ... → A), whatever the table allows;
  - a function-local (or class-level) import of the package itself: such imports hide cycles.
Lazy imports of other packages (optional extras like torch) are not the package's business.
Used by tests/test_layering.py on llama4_jax and on a small fixture package.
"""

from __future__ import annotations

import ast
from pathlib import Path


def _module_name(root: Path, package: str, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute module names an ImportFrom brings in (a name may itself be a submodule)."""
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def imports(root: Path, package: str):
    """→ [(importing module, imported module, line, top_level)] for every import of `package`."""
    out = []
    for path in sorted(Path(root).rglob("*.py")):
        module = _module_name(root, package, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def top_level(node) -> bool:
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                    return False
            return True

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path.name == "__init__.py", node)
            else:
                continue
            for t in targets:
                if t == package or t.startswith(package + "."):
                    out.append((module, t, f"{path}:{node.lineno}", top_level(node)))
    return out


def room(module: str, package: str) -> str:
    rest = module[len(package) + 1:]
    return rest.split(".")[0] if rest else "__init__"


def _allows(allowed: dict[str, set[str]], src: str, target_rest: str) -> bool:
    """Whether room `src` may import module `target_rest` (relative to the package): an entry
    "parallel" allows the whole room, "parallel.rules" only that module (and below it)."""
    return any(target_rest == e or target_rest.startswith(e + ".") for e in allowed.get(src, ()))


def check(root: Path, package: str, allowed: dict[str, set[str]]) -> list[str]:
    problems, edges = [], {}
    modules = {_module_name(root, package, p) for p in Path(root).rglob("*.py")}
    statements: dict[tuple, list[str]] = {}
    for src_mod, target, where, top in imports(root, package):
        statements.setdefault((src_mod, where, top), []).append(target)
    for (src_mod, where, top), targets in statements.items():
        if not top:
            problems.append(f"{where}: function-local import of {targets[0]} (import at the top, or move "
                            "the code to the room that owns it)")
        # `from pkg.a import b`: b is the imported module when it is one, else pkg.a is.
        named = [t for t in targets[1:] if t in modules]
        src = room(src_mod, package)
        for target in named or targets[:1]:
            dst = room(target, package)
            if dst == src:
                continue
            edges.setdefault(src, set()).add(dst)
            rest = target[len(package) + 1:] if target != package else "__init__"
            if not _allows(allowed, src, rest):
                problems.append(f"{where}: {src} may not import {rest} "
                                f"(allowed: {', '.join(sorted(allowed.get(src, ()))) or 'nothing'})")
    problems.extend(f"import cycle between rooms: {' → '.join(c)} (rooms importing each other: {', '.join(sorted(comp))})"
                    for comp, c in _cycles(edges))
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(rooms, one cycle through them) per strongly connected component of more than one room."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append((comp, _cycle_in(sorted(comp), edges)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _cycle_in(comp: list[str], edges) -> list[str]:
    """A concrete cycle through comp[0] inside the component (breadth-first back to the start)."""
    start, members = comp[0], set(comp)
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp
