"""Print each hipseg module's hipseg imports, upper modules first (docs/pipeline.md's picture).

    python tools/import_graph.py            # from the repository root

A module's level is one more than the highest level it imports, so every arrow points to
a later line; ``errors`` (imported by nearly everything) is left out of the lists, and the
modules that import nothing but ``errors`` are gathered on the last line.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hipseg"


def imports() -> dict[str, set[str]]:
    """{module: the hipseg modules it imports}, from the source's import statements."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in modules:
        found: set[str] = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hipseg":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hipseg.")}
        graph[name] = found - {name, "__init__", "__main__"}
    return graph


def main() -> None:
    graph = imports()

    @functools.cache
    def level(name: str) -> int:
        return 1 + max((level(d) for d in graph[name]), default=0)

    def order(names):
        return sorted(names, key=lambda n: (-level(n), n))

    leaves = [m for m in order(graph) if graph[m] <= {"errors"} and m != "errors"]
    width = max(len(m) for m in graph)
    for name in order(graph):
        if name in leaves or name in ("errors", "__init__", "__main__"):
            continue
        print(f"{name:{width}s} → {', '.join(order(graph[name] - {'errors'}))}")
    print(f"{', '.join(leaves)} → errors only (or nothing)")


if __name__ == "__main__":
    main()
