"""Find a model's builder module without running any of its code.

The supervisor never imports the user's builder (it would import TensorFlow
and run arbitrary code in the process that must stay up). Yet a builder
module that cannot be found is a config error like any other, and should stop
the daemon at start (exit 78) or keep the old config on reload, instead of
failing every export later. So this module asks Python's import machinery
where the module *would* come from, the way the worker child will import it:
``python_path`` first, then the working directory (``python -m`` puts it on
the child's ``sys.path``), then this interpreter's own paths and finders.

Contract: :func:`builder_problem` reads directories only; it executes no
package ``__init__`` and no module. It cannot tell whether the module imports
cleanly or the function exists and works: those surface at the first export,
which then pauses the model (see ``MODEL_FAILURES`` in the supervisor).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path

from daemon.config import interpreters
from daemon.config.loading import Config, ConfigError, ModelConfig

#: How Python finds modules in a folder: the public equivalents of what
#: ``sys.path_hooks`` installs for plain directories.
_LOADERS = (
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
)


def _find(name: str, folders: Sequence[str]) -> ModuleSpec | None:
    """The spec of ``name`` (dotted) in the first of ``folders`` that has it.

    A regular module or package wins at once; folders without ``__init__``
    are gathered into one namespace package, as the import system does.
    ``PathFinder`` cannot be used below the top level here: for a namespace
    package it wants the parent imported.
    """
    portions: list[str] = []
    for folder in folders:
        spec = importlib.machinery.FileFinder(folder, *_LOADERS).find_spec(name)
        if spec is None:
            continue
        if spec.loader is not None:
            return spec
        portions.extend(spec.submodule_search_locations or [])
    if not portions:
        return None
    spec = ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = portions
    return spec


def _locate(spec: str, python_path: Sequence[Path]) -> tuple[ModuleSpec | None, str | None]:
    """The module spec of ``spec`` (``"module:function"``), or None and why not."""
    module_name = spec.partition(":")[0]
    parts = module_name.split(".")
    found = _find(parts[0], [str(p) for p in python_path] + [os.getcwd()])
    if found is None:
        # Installed packages may come from a finder that is not a folder on
        # sys.path (editable installs): ask the interpreter's own machinery.
        # For a top-level name this runs finders only, never the module.
        found = importlib.util.find_spec(parts[0])
    for i in range(1, len(parts)):
        if found is None:
            break
        if found.submodule_search_locations is None:
            package = ".".join(parts[:i])
            return None, (
                f"builder module {package!r} is a module, not a package: it has no {parts[i]!r}"
            )
        # A package's folders are known from its spec, without running its __init__.
        found = _find(".".join(parts[: i + 1]), list(found.submodule_search_locations))
    if found is not None:
        return found, None
    where = ", ".join(str(p) for p in python_path) or "none"
    return None, (
        f"module {module_name!r} not found (python_path: {where}; then the working directory "
        f"{os.getcwd()} and the packages of {sys.executable}); fix the module name or add "
        "its folder to python_path"
    )


def builder_problem(spec: str, python_path: Sequence[Path]) -> str | None:
    """Why the module of ``spec`` (``"module:function"``) cannot be found, or None."""
    return _locate(spec, python_path)[1]


def builder_file(spec: str, python_path: Sequence[Path]) -> Path | None:
    """The source file of the builder's module, where it has one (found without running it)."""
    found, _ = _locate(spec, python_path)
    if found is None or not found.has_location or not found.origin:
        return None
    return Path(found.origin)


def model_builder_file(m: ModelConfig) -> Path | None:
    """:func:`builder_file` of model ``m``, located by its ``worker_python`` where it has one."""
    if not m.builder:
        return None
    if m.worker_python is None:
        return builder_file(m.builder, m.python_path)
    report = interpreters.report_for(m)
    found = report["builder_file"] if report is not None else None
    return Path(found) if found else None


def check_builders(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming every model whose builder module is missing.

    A model with ``worker_python`` has its interpreter checked and its
    builder located there instead (:func:`interpreters.check_interpreters`).
    """
    problems = []
    for i, m in enumerate(cfg.models):
        if not m.builder or m.worker_python is not None:
            continue
        problem = builder_problem(m.builder, m.python_path)
        if problem is not None:
            problems.append(f"models[{i}] ({m.name}).builder: {problem}")
    if problems:
        raise ConfigError(str(cfg.path) if cfg.path else "config", problems)
    interpreters.check_interpreters(cfg)
