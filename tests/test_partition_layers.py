"""Layering of partition directories: passes and runtime never import the partition verb (runtime reads
manifests through ``maia_onnx.partition.manifest`` only), and the partition package has no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERBS = ("maia_onnx.partition", "maia_onnx.batch", "maia_onnx.analyze", "maia_onnx.cli", "maia_onnx.quantize")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions (``from a import b`` counts a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _sources(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no sources under {folder}/"
    return files


def test_imported_modules_sees_function_local_imports(tmp_path):
    # the checker below must not pass because it misses imports: it sees them at every level
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from maia_onnx.partition import writer\n    import maia_onnx.batch\n")
    assert {"os", "maia_onnx.partition", "maia_onnx.partition.writer", "maia_onnx.batch"} <= imported_modules(f)


@pytest.mark.parametrize("folder", ["passes", "runtime"])
def test_passes_and_runtime_import_no_verb(folder):
    offenders = []
    for path in _sources(folder):
        for module in imported_modules(path):
            if folder == "runtime" and _is_under(module, "maia_onnx.partition.manifest"):
                continue  # the schema and its reader: what the runtime needs to load a partition
            if any(_is_under(module, verb) for verb in VERBS):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, offenders


def test_partition_package_has_no_import_cycle():
    package = ROOT / "maia_onnx" / "partition"
    names = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    assert {"manifest", "writer", "plan", "reshard", "checkpoint"} <= names
    graph = {}
    for name in names:
        deps = set()
        for module in imported_modules(package / f"{name}.py"):
            for other in names:
                if _is_under(module, f"maia_onnx.partition.{other}") or module == f"maia_onnx.partition.{other}":
                    deps.add(other)
            if module == "maia_onnx.partition":
                deps.add("__init__")  # the package itself re-exports everything: a submodule must not use it
        graph[name] = deps - {name}
    assert all("__init__" not in deps for deps in graph.values()), graph
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, f"import cycle: {' -> '.join(trail + (node,))}"
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, trail + (node,))
        state[node] = 2
        order.append(node)

    for name in sorted(graph):
        visit(name, ())
    assert graph["manifest"] == set()  # the schema depends on no other part of the package


def test_reading_a_manifest_loads_neither_writer_nor_passes():
    code = (
        "import sys, maia_onnx.partition.manifest, maia_onnx.runtime.executor\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('maia_onnx.partition.writer', 'maia_onnx.partition.plan',"
        " 'maia_onnx.passes')))\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
