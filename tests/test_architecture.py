"""The architecture's rules, read from the code (docs/architecture.md).

1. One namespace: installed, the project is ``pacsnode`` and nothing else.
2. Layers only point down: core → models → db → scp → workers → lab → app.
   A module imports only modules of its own layer or of layers below it,
   function-local imports included.
3. No import cycles between modules, function-local imports included.
4. Nobody imports the links by their folder names (``import db``): that
   would load a second copy of a module beside ``pacsnode.db``.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pacsnode"
LINK_FOLDERS = ("scp", "workers", "models", "db")

# Lower rank = lower layer. The app layer is everything in pacsnode/ that is
# not the core, a link or the lab: the CLI, the HTTP API, serve and the
# generators of the reference documents.
LAYERS = {"core": 0, "models": 1, "db": 2, "scp": 3, "workers": 4, "lab": 5, "app": 6}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module == "pacsnode":
        return "core"  # the package root only holds the version
    second = parts[1]
    if second == "core":
        return "core"
    if second in LINK_FOLDERS or second == "lab":
        return second
    return "app"


def package_files() -> list[Path]:
    """Every .py file of the package, through the links to the link folders."""
    found = []
    for folder, _dirs, files in os.walk(PACKAGE, followlinks=True):
        found += [Path(folder) / name for name in files if name.endswith(".py")]
    return sorted(found)


def module_files() -> Iterator[tuple[str, Path]]:
    for path in package_files():
        rel = path.relative_to(ROOT).with_suffix("")
        if "migrations" in rel.parts:
            continue
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


MODULES = dict(module_files())


def resolve(name: str) -> str | None:
    """The pacsnode module an imported name belongs to (``a.b.c`` may name an
    attribute of module ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported pacsnode module, line) for every import in the file,
    function-local ones included; ``from x import y`` counts ``x.y`` when
    ``y`` is a submodule, else ``x``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := resolve(alias.name)) is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = resolve(f"{base}.{alias.name}") or resolve(base)
                if target is not None:
                    yield target, node.lineno


GRAPH = {
    module: {(target, line) for target, line in imports_of(module, path) if target != module}
    for module, path in MODULES.items()
}


def test_the_graph_sees_the_whole_package() -> None:
    # Guards the test itself: the links are reached through pacsnode/<link>.
    assert {"pacsnode.scp.server", "pacsnode.workers.pipeline", "pacsnode.db.models"} <= set(
        MODULES
    )
    assert ("pacsnode.core.settings", 1) not in GRAPH["pacsnode.scp.server"]
    assert any(t == "pacsnode.core.settings" for t, _ in GRAPH["pacsnode.scp.server"])


def test_layers_only_point_down() -> None:
    violations = []
    for module, edges in GRAPH.items():
        rank = LAYERS[layer_of(module)]
        for target, line in sorted(edges):
            if LAYERS[layer_of(target)] > rank:
                violations.append(
                    f"{MODULES[module].relative_to(ROOT)}:{line}: {module} "
                    f"({layer_of(module)}) imports {target} ({layer_of(target)})"
                )
    assert not violations, "imports that point up:\n" + "\n".join(violations)


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _ in edges} for m, edges in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    # A package's __init__ that imports its own submodules (pacsnode.cli) is
    # not a cycle unless a submodule imports the package back.
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def python_files_outside_the_package() -> Iterator[Path]:
    for folder in ("tests", "bench", "scripts", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and (path.suffix == ".py" or _is_python_script(path)):
                yield path
    yield from package_files()


def _is_python_script(path: Path) -> bool:
    try:
        return path.read_bytes()[:64].startswith(b"#!") and b"python" in path.read_bytes()[:64]
    except OSError:
        return False


def test_nobody_imports_a_link_by_its_folder_name() -> None:
    offenders = []
    for path in python_files_outside_the_package():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in LINK_FOLDERS:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert not offenders, "import pacsnode.<link>, not the folder:\n" + "\n".join(offenders)


def test_link_folders_are_the_package_links() -> None:
    for folder in LINK_FOLDERS:
        link = PACKAGE / folder
        assert link.is_symlink(), f"pacsnode/{folder} must be a symbolic link to ../{folder}"
        assert link.resolve() == (ROOT / folder).resolve()


@pytest.mark.slow
def test_the_wheel_installs_one_namespace(tmp_path: Path) -> None:
    """``pip install .`` puts ``pacsnode`` and nothing else into site-packages:
    build the wheel it would install and read its file list."""
    build_dir_existed = (ROOT / "build").exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if not build_dir_existed:  # setuptools builds in the source tree
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("pacsnode-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pacsnode"}
    for expected in (
        "pacsnode/scp/server.py",
        "pacsnode/workers/pipeline.py",
        "pacsnode/db/migrations/env.py",
        "pacsnode/models/registry.py",
        "pacsnode/lab/phantom/__init__.py",
        "pacsnode/api/templates/base.html",
    ):
        assert expected in names, expected
    assert any(n.startswith("pacsnode/models/bundled/") and n.endswith(".h5") for n in names)
    assert any(n.startswith("pacsnode/db/migrations/versions/") for n in names)
