"""The package layout of docs/DESIGN.md (Layers): every import in fluxtrt/, at module level or inside a function,
goes down the layer order (or stays inside its own package), the modules of one package import each other without
a cycle, the product never imports the stages or the benchmark, and the size budget holds (modules of at most 400
lines, functions of at most 60 lines of code unless a ``# long:`` comment on the ``def`` line says why)."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fluxtrt"

# Bottom first. A unit is a subpackage or a top-level module of fluxtrt ("__init__" is the package root, which holds
# the version). A unit may import units of lower layers only; units of one layer do not import each other.
LAYERS = (
    ("__init__", "errors"),
    ("io", "timing", "environment"),
    ("specs",),
    ("config",),
    ("schedulers", "models", "kernels"),
    ("export",),
    ("quant",),
    ("backends",),
    ("lora",),
    ("pipeline",),
    ("engines",),
    ("console", "parallel"),
    ("infer",),
    ("serve",),
    ("stages",),
    ("bench",),
    ("cli",),
    ("__main__",),
)
# The lab: the PyTorch stages and the comparison (and the command line over everything). No other unit, the product,
# imports them.
LAB = ("stages", "bench", "cli", "__main__")
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(("fluxtrt", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported fluxtrt module) of every import statement in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fluxtrt"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fluxtrt":
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.append((node.lineno, node.module))
    return found


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS (and in docs/DESIGN.md)"


def test_imports_go_down_the_layers():
    violations = []
    for module, path in _modules().items():
        here = _unit(module)
        for line, target in _imports(path):
            there = _unit(target)
            if there != here and RANK.get(there, -1) >= RANK.get(here, -1):
                violations.append(f"{path.relative_to(ROOT.parent)}:{line}: {here} imports {target}")
    assert not violations, "imports that go up a layer or sideways:\n" + "\n".join(violations)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from fluxtrt.cli import main\n    import fluxtrt.bench.compare\n")
    assert _imports(path) == [(2, "fluxtrt.cli"), (3, "fluxtrt.bench.compare")]


def _imported_modules(path: Path, modules: Iterable[str]) -> list[tuple[int, str]]:
    """(line, fluxtrt module) of every import in the file, nested ones included; ``from package import module``
    names the module, ``from module import name`` the module."""
    modules = set(modules)

    def module_of(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, module_of(a.name)) for a in node.names if a.name.split(".")[0] == "fluxtrt"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fluxtrt":
            found += [(node.lineno, module_of(f"{node.module}.{a.name}")) for a in node.names]
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``edges`` (module -> modules it imports): each strongly connected set of more than one
    module, sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(a: str) -> None:
        index[a] = low[a] = len(index)
        stack.append(a)
        for b in sorted(edges.get(a, ())):
            if b not in index:
                visit(b)
                low[a] = min(low[a], low[b])
            elif b in stack:
                low[a] = min(low[a], index[b])
        if low[a] == index[a]:
            component = []
            while True:
                b = stack.pop()
                component.append(b)
                if b == a:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for a in sorted(edges):
        if a not in index:
            visit(a)
    return sorted(found)


def test_the_cycle_finder_finds_loops_and_only_loops():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"], ["d", "e"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "f": {"a", "c"}}) == []


def test_modules_of_one_package_import_each_other_without_a_cycle():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        for _, target in _imported_modules(path, modules):
            if target != module and _unit(target) == _unit(module):
                edges.setdefault(module, set()).add(target)
    cycles = _cycles(edges)
    assert not cycles, "module cycles (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_product_imports_neither_the_stages_nor_the_benchmark():
    modules = _modules()
    violations = []
    for module, path in modules.items():
        if _unit(module) in LAB:
            continue
        for line, target in _imported_modules(path, modules):
            if _unit(target) in ("stages", "bench"):
                violations.append(f"{path.relative_to(ROOT.parent)}:{line}: imports {target}")
    assert not violations, "the product imports the lab:\n" + "\n".join(violations)


def test_the_import_reader_names_modules_and_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "from fluxtrt.models import lowvram, load_components\ndef f():\n    from fluxtrt.stages.config import X\n"
    )
    modules = ["fluxtrt.models", "fluxtrt.models.lowvram", "fluxtrt.stages", "fluxtrt.stages.config"]
    got = _imported_modules(path, modules)
    assert got == [(1, "fluxtrt.models.lowvram"), (1, "fluxtrt.models"), (3, "fluxtrt.stages.config")]


def _long_functions(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = node.body
        doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        start = body[0].end_lineno + 1 if doc and len(body) > 1 else body[0].lineno
        code = node.end_lineno - start + 1
        header = " ".join(lines[node.lineno - 1 : body[0].lineno - 1])
        if code > MAX_FUNCTION_LINES and "# long:" not in header:
            out.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({code} lines)")
    return out


@pytest.mark.parametrize("path", list(_modules().values()), ids=lambda p: str(p.relative_to(ROOT)))
def test_size_budget(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path} has {lines} lines: split it by concern"
    assert not _long_functions(path), _long_functions(path)
