"""The folder layout is the architecture: lower floors never import upper ones, and no module imports form a cycle.

Read from the source with `ast` (nothing is imported), so the rule holds for
lazy imports inside functions too (a lazy cycle is still two modules that
need each other); imports under `if TYPE_CHECKING:` serve annotations only
and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

PACKAGE = Path(__file__).resolve().parent.parent / "tun2g"

# Floors, bottom up; the first matching prefix names a module's floor.
FLOORS: list[tuple[int, str]] = [
    (0, "tun2g.errors"), (0, "tun2g.log"), (0, "tun2g.phi"), (0, "tun2g.requestid"), (0, "tun2g.backend"),
    (0, "tun2g.metrics"), (0, "tun2g.config"),
    (0, "tun2g.storage"), (0, "tun2g.policy"), (0, "tun2g.transport.base"), (0, "tun2g.transport.kcp_wire"), (0, "tun2g.cluster.hop"), (0, "tun2g.cluster.heartbeat"),
    (0, "tun2g.smux.frame"), (0, "tun2g.smux.config"), (0, "tun2g.smux.state"), (0, "tun2g.smux.errors"),
    (0, "tun2g.http.parser"), (0, "tun2g.http.heads"), (0, "tun2g.http.encode"),
    (0, "tun2g.tcp.sni"), (0, "tun2g.tcp.wire"), (0, "tun2g.tcp.edge"),
    (1, "tun2g.smux"), (1, "tun2g.tcp"), (1, "tun2g.http"), (1, "tun2g.transport"),
    (2, "tun2g.control"), (2, "tun2g.pages"),
    (3, "tun2g.cluster"),
    (4, "tun2g.server"), (4, "tun2g.client"),
    (5, "tun2g.cli"),
    (0, "tun2g"),  # the package itself: __version__
]
# Roles on one floor that must not know each other.
STRANGERS = {("tun2g.server", "tun2g.client"), ("tun2g.client", "tun2g.server")}


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _floor(module: str) -> int:
    for floor, prefix in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            return floor
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, package: Path) -> tuple[set[str], set[str]]:
    """(every tun2g module imported anywhere at run time, those imported at module level)."""
    tree = ast.parse(path.read_text(), str(path))
    module = _module_name(path, package)
    everywhere: set[str] = set()
    top_level: set[str] = set()

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(parent[:len(parent) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}", package) else base
                         for alias in child.names]
            for name in names:
                if name.startswith("tun2g"):
                    everywhere.add(name)
                    if at_top:
                        top_level.add(name)
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, at_top and not nested)

    visit(tree, True)
    return everywhere, top_level


def _is_module(name: str, package: Path) -> bool:
    relative = Path(*name.split(".")[1:])
    return (package / relative).with_suffix(".py").exists() or (package / relative / "__init__.py").exists()


def _graph(package: Path) -> dict[str, tuple[set[str], set[str]]]:
    return {_module_name(path, package): _imports(path, package) for path in sorted(package.rglob("*.py"))}


def _role(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _layering_violations(package: Path) -> list[str]:
    wrong = []
    for module, (imported, _top) in _graph(package).items():
        for target in imported:
            if _floor(target) > _floor(module):
                wrong.append(f"{module} (floor {_floor(module)}) imports {target} (floor {_floor(target)})")
            elif (_role(module), _role(target)) in STRANGERS:
                wrong.append(f"{module} imports {target}: the two roles must not know each other")
    return sorted(wrong)


def _cycles(package: Path) -> list[str]:
    graph = {module: {t for t in imported if t != module} for module, (imported, _top) in _graph(package).items()}
    # A package's __init__ re-exporting its modules is not a cycle through its members.
    for module in graph:
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def walk(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                walk(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    return cycles


def test_no_module_imports_an_upper_floor_or_a_stranger_role():
    wrong = _layering_violations(PACKAGE)
    assert not wrong, "\n".join(wrong)


def test_imports_form_no_cycle():
    cycles = _cycles(PACKAGE)
    assert not cycles, "\n".join(cycles)


def test_the_checks_catch_upward_imports_strangers_and_cycles(tmp_path):
    package = tmp_path / "tun2g"
    files = {
        "__init__.py": "",
        "smux/__init__.py": "",
        "smux/frame.py": "def f():\n    from tun2g.server import router\n",  # lazy, still upward
        "server/__init__.py": "",
        "server/router.py": "from tun2g.client.client import Client\n",
        "client/__init__.py": "",
        "client/client.py": "from tun2g.client import connect\n",
        "client/connect.py": "from .client import Client\nfrom typing import TYPE_CHECKING\n"
                             "if TYPE_CHECKING:\n    from tun2g.server import router\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    assert _layering_violations(package) == [
        "tun2g.server.router imports tun2g.client.client: the two roles must not know each other",
        "tun2g.smux.frame (floor 0) imports tun2g.server.router (floor 4)",
    ]
    assert _cycles(package) == ["tun2g.client.client -> tun2g.client.connect -> tun2g.client.client"]
