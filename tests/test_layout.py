"""The package's layering, checked at run time: stage folders, no import circle, h5py only in the store,
no torch in analysis or the dashboard, short files, public docs inside the repository, and a wheel
that holds every module."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "routescope"
MAX_LINES = 400


def package_files() -> list[Path]:
    """Every .py file of the package as its path under routescope/, through the symlinked stage folders."""
    found = []
    for folder, _, files in os.walk(PACKAGE, followlinks=True):  # Path.rglob does not follow links before 3.13
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name; the symlinked stage folders included."""
    modules = {}
    for path in package_files():
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("routescope", *parts))
        modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, at any depth of its code (imports inside functions count too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    """The checker itself: a known circle is found, a known tree is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_stage_folders_exist() -> None:
    for stage in ("store", "record", "analysis", "layers", "integrations"):
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    for linked in ("kernels", "trainers", "dashboards"):
        assert (PACKAGE / linked).is_symlink() and (PACKAGE / linked).resolve() == REPO / linked
    assert (PACKAGE / "cli.py").is_file()


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the walk saw the whole package, symlinked folders included
    assert "routescope.kernels.tree_triton" in graph and "routescope.dashboards.app" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_private_name_imported_across_modules() -> None:
    modules = package_modules()
    offenders = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("routescope")):
                where = "." * node.level + (node.module or "")
                offenders += [f"{name}: from {where} import {a.name}" for a in node.names if a.name.startswith("_")
                              and a.name != "__version__"]  # fmt: skip
                if any(part.startswith("_") for part in (node.module or "").split(".")):
                    offenders.append(f"{name}: from {where}")
    assert not offenders, offenders


def test_h5py_only_in_the_store() -> None:
    outside = []
    for name, path in package_modules().items():
        if name.startswith("routescope.store"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(
                node, ast.ImportFrom) else []  # fmt: skip
            if any(n == "h5py" or n.startswith("h5py.") for n in names):
                outside.append(name)
    assert not outside, f"h5py imported outside routescope/store: {outside}"


def test_nothing_imports_against_the_flow() -> None:
    """Kernels know nothing of the store; the store nothing of layers, recording or analysis; analysis and the
    dashboard nothing of torch-side stages."""
    graph = import_graph()
    rules = {
        "routescope.kernels": ("routescope.store", "routescope.record", "routescope.analysis", "routescope.layers"),
        "routescope.store": ("routescope.layers", "routescope.record", "routescope.analysis", "routescope.kernels",
                             "routescope.dashboards", "routescope.trainers"),
        "routescope.analysis": ("routescope.layers", "routescope.record", "routescope.kernels", "routescope.trainers",
                                "routescope.dashboards"),
        "routescope.dashboards": ("routescope.layers", "routescope.record", "routescope.kernels", "routescope.trainers"),
    }  # fmt: skip
    bad = [f"{m} -> {d}" for m, deps in graph.items() for stage, banned in rules.items() if m.startswith(stage)
           for d in deps if d.startswith(banned)]  # fmt: skip
    assert not bad, bad


@pytest.mark.parametrize("module", ["routescope.analysis", "routescope.dashboards.app", "routescope.store"])
def test_reading_side_loads_no_torch(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", f"importing {module} loaded {out.stdout.strip()}"


def test_files_are_short() -> None:
    long = {str(p.relative_to(REPO)): n for p in [*package_modules().values()] if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_no_reference_outside_the_repository() -> None:
    """Users never see the team's design notes: the package, README, docs and notebooks point only inside the repo."""
    banned = ("DESIGN" + ".md", "../" + "shared")
    places = [REPO / "README.md", REPO / "BENCHMARKS.md", *package_files(), *(REPO / "docs").rglob("*.md"),
              *(REPO / "notebooks").glob("*"), *(REPO / "benchmarks").glob("*.py"), REPO / "pyproject.toml"]  # fmt: skip
    hits = [f"{p.relative_to(REPO)}: {word}" for p in places if p.is_file() for word in banned if word in p.read_text()]
    assert not hits, hits


def test_docs_cover_every_file_variable_and_metric() -> None:
    from routescope.analysis.family import FAMILY_ANALYSES
    from routescope.store.format import RUN_FIXED_SCALARS
    from routescope.store.schema import COMMON_TRACES, FAMILIES

    file_format = (REPO / "docs" / "file-format.md").read_text()
    variables = {*COMMON_TRACES, *RUN_FIXED_SCALARS, *(v for f in FAMILIES.values() for v in (*f.group_variables(), *f.traces,
                                                                                           *f.layer_vars))}  # fmt: skip
    assert not [v for v in variables if f"`{v}`" not in file_format]
    metrics = (REPO / "docs" / "metrics.md").read_text()
    keys = {m.key for f in FAMILY_ANALYSES.values() for m in f.columns}
    assert not [k for k in keys if f"`{k}`" not in metrics]


def test_source_tree_imports_resolve_without_install() -> None:
    """`python -m pytest` from the repository root imports the package from the tree itself: every stage resolves."""
    code = ("import routescope, routescope.kernels.tree_reference, routescope.trainers.presets, routescope.dashboards.figures;"
            "print(routescope.__file__); print(routescope.kernels.tree_reference.__file__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})  # fmt: skip
    package_file, kernel_file = out.stdout.split()
    assert Path(package_file).resolve() == PACKAGE / "__init__.py"
    assert Path(kernel_file).resolve() == REPO / "kernels" / "tree_reference.py"


@pytest.mark.slow
def test_wheel_holds_every_module(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a clean copy: a stale build/ folder in the checkout must not leak into the wheel
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                                                "__pycache__", "runs", "*.h5"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True)  # fmt: skip
    (wheel,) = tmp_path.glob("routescope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"/".join(("routescope", *p.relative_to(PACKAGE).parts)) for p in package_files()}
    assert expected - names == set()
    assert all(not n.endswith("/") for n in names)  # symlinks became files, not links
