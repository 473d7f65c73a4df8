"""The import graph of the two packages, read with ``ast`` (nothing is imported or run).

``python tools/import_graph.py`` prints every import cycle (module level, lazy imports inside
functions included) and the package diagram that ``tools/gen_docs.py`` puts in
docs/architecture.md. ``tests/test_architecture.py`` checks that there is no cycle and that the
library never imports the experiments.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("resetnet", "resetnet_experiments")


def modules(src: Path = SRC) -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the two packages (``pkg`` for ``pkg/__init__.py``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((src / package).rglob("*.py")):
            parts = list(path.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The known module ``name`` refers to: itself, or its nearest known parent."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(src: Path = SRC) -> dict[str, set[str]]:
    """``{module: modules it imports}`` among the two packages, lazy imports inside functions included."""
    known = modules(src)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for t in targets:
                hit = _target(t, known)
                if hit and hit != name:
                    graph[name].add(hit)
        graph.setdefault(name, set())
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a list of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def group(module: str) -> str:
    """The box a module is drawn in: ``resetnet.nn``, ``resetnet.train``, ..., the library's top-level modules
    one by one, the experiments package whole (with its ``analysis``)."""
    parts = module.split(".")
    if parts[0] == "resetnet_experiments":
        return ".".join(parts[:2]) if len(parts) > 1 and parts[1] == "analysis" else "resetnet_experiments"
    return ".".join(parts[:2]) if len(parts) > 1 else "resetnet"


def diagram(graph: dict[str, set[str]]) -> str:
    """A Mermaid flowchart of the packages and who imports whom (the package ``__init__`` re-exports omitted)."""
    edges = sorted(
        {(group(a), group(b)) for a, targets in graph.items() for b in targets if group(a) != group(b) and a not in ("resetnet", "resetnet.__main__")}
    )
    nodes = sorted({g for e in edges for g in e})

    def ident(g: str) -> str:
        return g.replace(".", "_")

    lines = ["```mermaid", "flowchart TD"]
    lines.append('  subgraph experiments["resetnet_experiments (the paper)"]')
    lines += [f'    {ident(n)}["{n}"]' for n in nodes if n.startswith("resetnet_experiments")]
    lines.append("  end")
    lines.append('  subgraph library["resetnet (the library)"]')
    lines += [f'    {ident(n)}["{n}"]' for n in nodes if not n.startswith("resetnet_experiments")]
    lines.append("  end")
    lines += [f"  {ident(a)} --> {ident(b)}" for a, b in edges]
    lines.append("```")
    return "\n".join(lines)


def main() -> int:
    graph = imports()
    found = cycles(graph)
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    print(diagram(graph))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
