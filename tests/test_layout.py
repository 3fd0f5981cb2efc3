"""The shape of the code, as tests: the file list reads as the pipeline, the import graph has no cycles, the
library never reaches Prefect, and no module grows into a room too big to find one's way in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from sparse_vggt import pipeline

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "sparse_vggt"
MAX_LINES = 600  # "about 500": a module past this is split by idea (see docs/DESIGN.md, Layout)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _module_level_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Library modules imported when ``name`` is imported (module-level statements; TYPE_CHECKING and function
    bodies excluded: those run later and cannot form an import cycle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sparse_vggt")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.startswith("sparse_vggt"):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    out.add(sub if sub in known else base)
    return out


def test_stage_modules_are_named_after_their_cli_verbs():
    for stage in pipeline.STAGES:
        assert stage.module == f"sparse_vggt.{stage.name}", stage
        assert (LIBRARY / f"{stage.name}.py").exists() or (LIBRARY / stage.name / "__init__.py").exists()


def test_library_import_graph_has_no_cycles():
    known = _modules()
    edges = {m: _module_level_imports(m, p, known) & set(known) for m, p in known.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges[m]):
            if n == m:
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if not state.get(n):
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(known):
        if not state.get(m):
            visit(m)


def test_no_module_is_too_big():
    big = {str(p.relative_to(REPO)): n for p in [*LIBRARY.rglob("*.py"), *(REPO / "flows").glob("*.py"),
                                                 *(REPO / "tasks").glob("*.py")]
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these by idea: {big}"


def test_the_library_never_imports_prefect():
    """Every library module imports without Prefect, flows or tasks (the CLI reaches them only through
    `scheduler.load_runner` and the deploy command, at call time)."""
    code = ("import importlib, pkgutil, sys, sparse_vggt\n"
            "for m in pkgutil.walk_packages(sparse_vggt.__path__, 'sparse_vggt.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'flows', 'tasks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
