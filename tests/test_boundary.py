"""The process boundary, enforced: what each side of the daemon may import.

The supervisor side (the loop, the CLI, config, rules, base path, sources)
never imports TensorFlow, Keras, NumPy or anything under ``daemon.children``:
it must start fast, stay small, and survive any crash in TensorFlow code.
``daemon.formats`` is standard library only. Each check runs in a fresh
interpreter, so that what another test imported cannot hide a violation,
and walks every module of the packages, not only what one entry point
happens to import. A last check reads the module-level imports of the whole
package and fails on any import cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "daemon"

#: Every module of these packages is imported by the supervisor side or the CLI.
SUPERVISOR_SIDE = [
    "daemon.cli",
    "daemon.protocol",
    "daemon.durable",
    "daemon.supervisor",
    "daemon.config",
    "daemon.rules",
    "daemon.basepath",
    "daemon.sources",
    "daemon.formats",
]
FORBIDDEN_ROOTS = ("tensorflow", "keras", "numpy", "tf_keras", "h5py", "jax")

_PROBE = r"""
import importlib, json, pkgutil, sys
names = json.loads(sys.argv[1])
for name in names:
    module = importlib.import_module(name)
    walk = getattr(module, "__path__", []) if name.startswith("daemon") else []
    for info in pkgutil.walk_packages(walk, name + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after_importing(names: list[str]) -> list[str]:
    """``sys.modules`` of a fresh interpreter after importing ``names`` and every submodule."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(names)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    ).stdout
    loaded: list[str] = json.loads(out)
    return loaded


def _forbidden(loaded: list[str]) -> list[str]:
    return [
        m
        for m in loaded
        if m.split(".")[0] in FORBIDDEN_ROOTS
        or m == "daemon.children"
        or m.startswith("daemon.children.")
    ]


def test_the_supervisor_side_imports_no_tensorflow_numpy_or_children() -> None:
    loaded = _modules_after_importing(SUPERVISOR_SIDE)
    assert "daemon.supervisor.loop" in loaded and "daemon.cli" in loaded  # the probe ran
    assert _forbidden(loaded) == []


def test_the_boundary_check_catches_a_violation() -> None:
    # The same probe must see a child module, or NumPy imported at module level.
    assert "daemon.children.worker" in _forbidden(
        _modules_after_importing(["daemon.children.worker"])
    )
    assert "numpy" in _forbidden(_modules_after_importing(["numpy"]))


def test_formats_is_standard_library_only() -> None:
    loaded = _modules_after_importing(["daemon.formats"])
    baseline = set(_modules_after_importing([]))
    extra = [m for m in loaded if m not in baseline]
    third_party = [
        m
        for m in extra
        if m.split(".")[0] not in sys.stdlib_module_names
        and not (m == "daemon" or m.startswith("daemon.formats"))
    ]
    assert any(m.startswith("daemon.formats.") for m in extra)
    assert third_party == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """``module -> daemon modules it imports at module level`` (not inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_daemon_modules() -> None:
    graph = _import_graph()
    assert "daemon.supervisor.loop" in graph and "daemon.children.worker" in graph
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (name.startswith(d + ".") and d in graph)}
    assert _cycle(graph) is None
