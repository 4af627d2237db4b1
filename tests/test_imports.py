"""Import structure, read from the source with ast (nothing is imported): ``kernels/`` stands on its own, the
benchmark wing hangs off the CLI only, and no two modules of the package import each other at module level.

An import inside a function body (or under ``if TYPE_CHECKING:``) is lazy: it runs after every module-level import
has finished, so it cannot close a cycle.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hf_fp8cache"
KERNELS = "hf_fp8cache.kernels"  # the folder kernels/, installed as hf_fp8cache.kernels (pyproject package-dir)
# What kernels/ may import besides itself.
KERNELS_MAY_IMPORT = {"torch", "triton", "numpy"} | set(sys.stdlib_module_names)


@dataclass(frozen=True)
class Import:
    """One module imported by another: ``target`` is absolute (a module, or the package a name comes from)."""

    importer: str
    target: str
    line: int
    lazy: bool


def _module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for the package and its kernels."""
    files = {}
    for package, folder in ((PACKAGE, root / "hf_fp8cache"), (KERNELS, root / "kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def _import_nodes(node: ast.AST, lazy: bool = False):
    """(import statement, lazy) for every import under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, lazy
        elif isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for statement in child.body:
                yield from _import_nodes(ast.Module(body=[statement], type_ignores=[]), True)
            for statement in child.orelse:
                yield from _import_nodes(ast.Module(body=[statement], type_ignores=[]), lazy)
        else:
            yield from _import_nodes(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _imports(files: dict[str, Path]) -> list[Import]:
    found = []
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, lazy in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # a submodule imported by name is that module; any other name comes from the package's __init__
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            found += [Import(module, target, node.lineno, lazy) for target in dict.fromkeys(targets)]
    return found


FILES = _module_files(ROOT)
IMPORTS = _imports(FILES)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _is_bench(name: str) -> bool:
    """The benchmark wing: the package hf_fp8cache.bench, and the hf_fp8cache.benchmark* modules it grows from."""
    return name.startswith(PACKAGE + ".bench")


def _module_level_graph(files: dict[str, Path], imports: list[Import]) -> dict[str, set[str]]:
    """Module -> the package modules its module-level imports run: each target, and the packages above it (their
    ``__init__`` runs first) except the importer's own, which are already being imported."""
    graph: dict[str, set[str]] = {module: set() for module in files}
    for imp in imports:
        if imp.lazy or not _within(imp.target, PACKAGE):
            continue
        parts = imp.target.split(".")
        above = {".".join(parts[:n]) for n in range(1, len(parts))}
        runs = {imp.target} | {package for package in above if not _within(imp.importer, package)}
        graph[imp.importer] |= {module for module in runs if module in files and module != imp.importer}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) for each back edge a depth-first walk meets."""
    cycles, state, path = [], {}, []

    def walk(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module)
    return cycles


def test_the_walk_resolves_imports_and_finds_only_module_level_cycles(tmp_path):
    sources = {
        "hf_fp8cache/__init__.py": "from . import a\n",
        "hf_fp8cache/a.py": "from .kernels import name, ops\n\n\ndef f():\n    from . import b\n",
        "hf_fp8cache/b.py": "import torch\n\nfrom hf_fp8cache import a\n",
        "kernels/__init__.py": "name = 1\n",
        "kernels/ops.py": "from ..b import torch\n",
    }
    for name, source in sources.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(source)
    files = _module_files(tmp_path)
    imports = _imports(files)
    assert {(imp.importer, imp.target, imp.lazy) for imp in imports} == {
        ("hf_fp8cache", "hf_fp8cache.a", False),
        ("hf_fp8cache.a", "hf_fp8cache.kernels", False),  # a name from the package's __init__
        ("hf_fp8cache.a", "hf_fp8cache.kernels.ops", False),  # a submodule
        ("hf_fp8cache.a", "hf_fp8cache.b", True),
        ("hf_fp8cache.b", "torch", False),
        ("hf_fp8cache.b", "hf_fp8cache.a", False),
        ("hf_fp8cache.kernels.ops", "hf_fp8cache.b", False),
    }
    # a -> b -> a is no cycle (a imports b lazily); a -> kernels.ops -> b -> a is one
    cycle = ["hf_fp8cache.a", "hf_fp8cache.kernels.ops", "hf_fp8cache.b", "hf_fp8cache.a"]
    assert _cycles(_module_level_graph(files, imports)) == [cycle]
    # and the real tree is walked: the package, its kernels and the CLI are all there
    assert {KERNELS, f"{KERNELS}.attention", f"{PACKAGE}.cache", f"{PACKAGE}.cli"} <= set(FILES)


def test_kernels_import_nothing_outside_kernels():
    outside = [
        f"{imp.importer} (line {imp.line}) imports {imp.target}"
        for imp in IMPORTS
        if _within(imp.importer, KERNELS)
        and not _within(imp.target, KERNELS)
        and imp.target.split(".")[0] not in KERNELS_MAY_IMPORT
    ]
    assert not outside, "kernels/ must stand on its own: " + "; ".join(outside)


def test_only_the_cli_imports_the_benchmarks_and_only_lazily():
    reaching_in = [
        f"{imp.importer} (line {imp.line}{', lazy' if imp.lazy else ''}) imports {imp.target}"
        for imp in IMPORTS
        if _is_bench(imp.target) and not _is_bench(imp.importer) and not (imp.importer == f"{PACKAGE}.cli" and imp.lazy)
    ]
    assert not reaching_in, "the library must not depend on its benchmarks: " + "; ".join(reaching_in)


def test_no_module_level_import_cycles():
    cycles = _cycles(_module_level_graph(FILES, IMPORTS))
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_benchmark_modules_share_only_common_and_no_private_names():
    """The wing's modules once imported each other's private helpers in a circle; now each imports common alone."""
    wrong = []
    for path in sorted((ROOT / "hf_fp8cache" / "bench").glob("*.py")):
        for node, _ in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module not in (None, "common"):
                wrong.append(f"{path.name} imports .{node.module}")
            names = [alias.name for alias in node.names if alias.name.startswith("_")]
            wrong += [f"{path.name} imports the private {name}" for name in names]
    assert not wrong, "; ".join(wrong)
