"""The layout's promises (docs/design.md "Layout"), checked on the source as it is.

- The builder takes from the client only the shared layer; the client imports nothing from the
  builder, the synthetic generator or the tests, and no package reaches into ``tests/``.
- Inside the client no two modules import each other at import time (no circles).
- Every function reads on one screen.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("builder", "lymphatlas_ds", "lymphatlas_synth")
CODE_FOLDERS = (*PACKAGES, "tools", "benchmarks")
# The client modules the builder may import: docs/design.md lists them as the shared layer.
SHARED_LAYER = {"schema", "codec", "manifest", "lineage", "_io", "_lock", "_target", "errors", "statistics", "metrics", "figures", "cli",
                "progress", "lesions"}
# One screen: from the `def` line to the function's last line, docstring included.
MAX_FUNCTION_LINES = 60


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path, *, runtime_only: bool = False) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved), anywhere in the file.

    ``runtime_only``: only imports that run when the module is imported (module level, outside
    ``if TYPE_CHECKING:``), the ones that can make an import circle.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    nodes = _module_level(tree.body) if runtime_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            members = [f"{base}.{alias.name}" for alias in node.names]
            names.update(members)
            if not all(_is_module(m) for m in members):  # `from pkg import name`: pkg itself is imported
                names.add(base)
    return names


def _is_module(name: str) -> bool:
    """Whether a dotted name is a module or package of this checkout."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements that run at import time: the module body, into try/if blocks, not TYPE_CHECKING."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.extend(_module_level(node.orelse))
        elif isinstance(node, (ast.If, ast.Try)):
            for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                out.extend(_module_level(block))
            for handler in getattr(node, "handlers", []):
                out.extend(_module_level(handler.body))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_builder_takes_only_the_shared_layer_from_the_client() -> None:
    found = {}
    for path in _sources("builder"):
        for name in _imports(path):
            parts = name.split(".")
            # `import lymphatlas_ds` or `from lymphatlas_ds import load_lymphatlas` loads the whole client
            # (the card's code examples are strings, not imports)
            if name == "lymphatlas_ds" or (parts[0] == "lymphatlas_ds" and parts[1] not in SHARED_LAYER):
                found.setdefault(_rel(path), set()).add(name)
    assert not found, f"the builder imports client modules outside the shared layer {sorted(SHARED_LAYER)}: {found}"
    design = (ROOT / "docs" / "design.md").read_text()
    undocumented = sorted(m for m in SHARED_LAYER if f"{m}.py" not in design)
    assert not undocumented, f"shared-layer modules not listed in docs/design.md: {undocumented}"


@pytest.mark.parametrize("folder", ["lymphatlas_ds", "builder", "lymphatlas_synth", "tools", "benchmarks"])
def test_no_package_reaches_into_tests_and_the_client_into_the_builder(folder: str) -> None:
    forbidden = {"tests"} | ({"builder", "lymphatlas_synth", "tools"} if folder == "lymphatlas_ds" else set())
    found = {
        _rel(path): sorted(n for n in _imports(path) if n.split(".")[0] in forbidden)
        for path in _sources(folder)
    }
    found = {k: v for k, v in found.items() if v}
    assert not found, f"{folder} imports {sorted(forbidden)}: {found}"


def test_client_modules_do_not_import_each_other_in_a_circle() -> None:
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in _sources("lymphatlas_ds")
    }
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module] = set()
        for name in _imports(path, runtime_only=True):
            # `from lymphatlas_ds.schema import Split` imports lymphatlas_ds.schema
            target = name if name in modules else name.rsplit(".", 1)[0]
            if target in modules and target != module and target != "lymphatlas_ds":
                graph[module].add(target)
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append(trail + [start])
                elif nxt not in trail and len(trail) < len(graph):
                    stack.append((nxt, trail + [nxt]))
    assert not cycles, f"import circles in the client: {sorted({' -> '.join(c) for c in cycles})}"


def test_every_function_reads_on_one_screen() -> None:
    long = []
    for path in _sources(*CODE_FOLDERS):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{_rel(path)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions longer than {MAX_FUNCTION_LINES} lines: split them into named steps: {long}"


def test_importing_the_client_loads_neither_the_builder_nor_torch(tmp_path: Path) -> None:
    """As a user types it, from another folder: the client alone, light to import."""
    code = (
        "import sys, lymphatlas_ds\n"
        "bad = sorted(m for m in ('builder', 'lymphatlas_synth', 'tests', 'torch') if m in sys.modules)\n"
        "sys.exit(f'imported with the client: {bad}' if bad else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
