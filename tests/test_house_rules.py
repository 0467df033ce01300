"""The project's structure, checked from its source (docs/architecture.md draws it):

- packages import only downwards, in the order of `LAYERS`, and no module takes part in an import circle;
- no module uses another module's private names (imported, or as attributes of its objects);
- no module is over 600 lines, the scripts in tools/, benchmarks/ and examples/ included (the C++ kernel
  template is not a Python module).

Imports under `if TYPE_CHECKING:` are annotations only and do not count; lazy imports inside functions do.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"gaugecompile": ROOT / "gaugecompile", "gaugecompile.passes": ROOT / "passes",
           "gaugecompile.codegen": ROOT / "codegen"}

#: Packages (or top-level modules) from the bottom up: each may import the ones before it, never one after it.
LAYERS = (
    ("gaugecompile.rope", "gaugecompile.block_tables", "gaugecompile.kv_format"),
    ("gaugecompile.codegen",),
    ("gaugecompile.ops",),
    ("gaugecompile.cache",),
    ("gaugecompile.passes",),
    ("gaugecompile.backend", "gaugecompile.explain"),
    ("gaugecompile.batching", "gaugecompile.onnx"),
    ("gaugecompile.models",),
    ("gaugecompile.research",),
    ("gaugecompile.bench",),
    ("gaugecompile.cli",),
    ("gaugecompile",),  # the package's own __init__: the public API, re-exported from below
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if package == "gaugecompile" and parts[0] in ("passes", "codegen"):
                continue  # (an installed tree's mapped packages)
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    """The entry of `LAYERS` that `module` belongs to (the longest matching prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return ".".join(parts[:n])
    raise AssertionError(f"{module}: in no layer of LAYERS (add it where it belongs)")


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            out.update(id(n) for child in node.body for n in ast.walk(child))
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> dict[str, set[tuple[str, str | None]]]:
    """Per module, the (module, name) pairs it imports from the project (name None for `import x`)."""
    out: dict[str, set[tuple[str, str | None]]] = defaultdict(set)
    for module, tree in TREES.items():
        annotations = _type_checking_blocks(tree)
        for node in ast.walk(tree):
            if id(node) in annotations:
                continue
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                if target.startswith("gaugecompile"):
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        out[module].add((sub, None) if sub in MODULES else (target, alias.name))
            elif isinstance(node, ast.Import):
                out[module].update((a.name, None) for a in node.names if a.name.startswith("gaugecompile"))
    return out


IMPORTS = _imports()


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


def test_packages_import_only_downwards():
    upward = sorted(f"{a} -> {b}" for a, targets in IMPORTS.items() for b, _ in targets
                    if b in MODULES and RANK[_layer(b)] > RANK[_layer(a)])
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {a: {b for b, _ in targets if b in MODULES and b != a} for a, targets in IMPORTS.items()}
    # a package's __init__ re-exporting its modules is not a circle with them
    graph = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def _private_definitions() -> dict[str, set[str]]:
    """Per module, the private names it defines: top-level functions, classes and assignments, and attributes
    it sets or methods it defines on its own classes (`self._x = ...`, `def _x`)."""
    out: dict[str, set[str]] = defaultdict(set)
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out[module].add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    out[module].add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                out[module].add(node.id)
    return {m: {n for n in names if n.startswith("_") and not n.startswith("__")} for m, names in out.items()}


def test_no_private_name_crosses_modules():
    defined = _private_definitions()
    owners: dict[str, set[str]] = defaultdict(set)
    for module, names in defined.items():
        for name in names:
            owners[name].add(module)
    found = [f"{a} imports {name} from {b}" for a, targets in IMPORTS.items() for b, name in targets
             if name is not None and name.startswith("_") and not name.startswith("__")]
    for module, tree in TREES.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "super"):
                continue
            elsewhere = owners.get(node.attr, set()) - {module}
            if elsewhere and node.attr not in defined.get(module, set()):
                found.append(f"{module}:{node.lineno} uses .{node.attr} of {sorted(elsewhere)[0]}")
    assert not found, "private names used across modules:\n" + "\n".join(sorted(found))


def test_modules_stay_small():
    scripts = {str(p.relative_to(ROOT)): p for d in ("tools", "benchmarks", "examples")
               for p in (ROOT / d).glob("*.py")}
    sizes = {module: len(path.read_text().splitlines()) for module, path in {**MODULES, **scripts}.items()}
    large = sorted(f"{module}: {n} lines" for module, n in sizes.items() if n > 600)
    assert not large, "modules over 600 lines (split them along their seams):\n" + "\n".join(large)
