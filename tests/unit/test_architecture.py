"""The shape of the house (STYLE.md): packages import only the layers below them, no two modules import each other,
functions are short enough to read at once. Read from the source with `ast`, so a function-level import counts."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "finegrain"

# Lowest first. A package may import the packages of lower layers (and itself), never a higher one.
LAYERS = [
    {"errors", "faults"},
    {"atomic"},
    {"registry"},
    {"config"},
    {"data"},
    {"backbones"},
    {"models"},
    {"runtime"},
    {"embed"},
    {"heads"},
    {"losses"},
    {"evaluate"},
    {"explain"},
    {"train"},
    {"semi"},
    {"recipe"},
    {"report"},
    {"export"},
    {"serve"},
    {"cli"},
    {"__init__", "__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS_ALLOWED = {("cli/main.py", "build_parser")}  # argument parsing: one flat list of options
MAX_TRAINER_LINES = 250


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(SRC)): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(SRC.rglob("*.py"))}


def _package(rel: str) -> str:
    parts = pathlib.PurePosixPath(rel).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def _imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, dotted module) of every finegrain import, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finegrain"):
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("finegrain")]
    return out


def test_every_package_has_a_layer():
    unknown = sorted({_package(rel) for rel in _modules()} - LAYER.keys())
    assert not unknown, f"add these packages to LAYERS (and to STYLE's picture): {unknown}"


def test_packages_import_only_lower_layers():
    upward = []
    for rel, tree in _modules().items():
        pkg = _package(rel)
        for line, module in _imports(tree):
            target = module.split(".")[1] if "." in module else "__init__"
            if target != pkg and LAYER.get(target, -1) >= LAYER[pkg]:
                upward.append(f"{rel}:{line} imports {module} ({pkg} is layer {LAYER[pkg]}, {target} {LAYER[target]})")
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def _module_name(rel: str) -> str:
    return "finegrain." + rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")


def test_no_two_modules_import_each_other():
    names = {_module_name(rel): tree for rel, tree in _modules().items()}
    edges = {
        name: {m for _, m in _imports(tree) if m in names and m != name and not name.startswith(m + ".")}
        for name, tree in names.items()
    }
    # a package's __init__ re-exporting its modules is not a cycle with them
    edges = {a: {b for b in bs if not (a.startswith(b + ".") or b.startswith(a + "."))} for a, bs in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _long_functions() -> list[str]:
    found = []
    for rel, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    found.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return found


def test_functions_are_short():
    long = _long_functions()
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)


def test_trainer_is_small():
    tree = ast.parse((SRC / "train" / "engine.py").read_text(encoding="utf-8"))
    trainer = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    if not trainer:
        pytest.fail("train/engine.py has no Trainer class")
    n = trainer[0].end_lineno - trainer[0].lineno + 1
    assert n <= MAX_TRAINER_LINES, f"Trainer is {n} lines (at most {MAX_TRAINER_LINES}: move work to steps/callbacks)"
