"""The import graph follows the layers: api -> engine -> prompt_store, and never back up.

Read from the source (every import statement, including those inside functions), so a lazy import
that climbs a layer is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower layers first; a module may import its own layer and the ones below it, never one above.
# The folders show the parts: what the machine gives (server/machine), the step core (server/engine), loading the
# model (server/model), the HTTP service and training (server/api, server/train), the process's start
# (server/process: the command line, serve, logs).
LAYERS = [
    ("prompt_store", "server.machine"),
    ("server.engine",),
    ("server.config", "server.demo", "server.model"),
    ("server.api", "server.train"),
    ("server.process",),
]


def layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def modules() -> list[tuple[str, Path]]:
    out = []
    for package in ("server", "prompt_store"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out.append((name, path))
    return out


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_every_module_belongs_to_a_layer():
    assert [name for name, _ in modules() if layer_of(name) is None and name != "server"] == []


@pytest.mark.parametrize(("name", "path"), modules(), ids=[name for name, _ in modules()])
def test_imports_only_go_down(name, path):
    rank = layer_of(name)
    if rank is None:
        return  # the `server` package marker itself
    upward = sorted(m for m in imports_of(path) if (r := layer_of(m)) is not None and r > rank)
    assert upward == [], f"{name} (layer {LAYERS[rank]}) imports from a layer above it: {upward}"


def test_the_engine_knows_no_http():
    web = ("fastapi", "starlette", "uvicorn", "pydantic_settings", "prometheus_client")
    for name, path in modules():
        if name.startswith(("server.engine", "prompt_store")):
            assert not [m for m in imports_of(path) if m.split(".")[0] in web], name


def test_every_source_folder_is_a_package():
    """setuptools' find_packages skips a folder without __init__.py: the wheel would lack it."""
    folders = {path.parent for package in ("server", "prompt_store") for path in (ROOT / package).rglob("*.py")}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()) == []


def module_level_imports(path: Path) -> set[str]:
    """The modules `path` imports when it loads: its top-level imports, not those under `if TYPE_CHECKING:` or
    inside functions (those cannot make a circle at import time)."""
    known = dict(modules())
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from package import submodule` loads the submodule, not a circle
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
    return found


def test_no_import_circle_among_promptswaps_modules():
    known = dict(modules())
    graph = {name: {m for m in module_level_imports(path) if m in known} - {name}
             for name, path in modules()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for nxt in sorted(graph[name]):
            if seen.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*path[path.index(nxt):], nxt])}")
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[name] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])
