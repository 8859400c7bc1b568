"""The functions of a package folder with the most parameters (self / cls not counted): a maintainer's check that
state travels in values, not long positional lists.

    python scripts/widest_functions.py src/finegrain/recipe
"""

from __future__ import annotations

import ast
import pathlib
import sys


def widths(root: pathlib.Path) -> list[tuple[int, str]]:
    rows = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                n += (a.vararg is not None) + (a.kwarg is not None)
                n -= bool(a.args and a.args[0].arg in ("self", "cls"))
                rows.append((n, f"{path.name}:{node.name}"))
    return sorted(rows, reverse=True)


if __name__ == "__main__":
    for n, name in widths(pathlib.Path(sys.argv[1]))[:8]:
        print(n, name)
