"""The interface every checkpoint source implements, and what it returns."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from daemon.config.schema import Schema


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One complete checkpoint found by a source.

    ``fingerprint`` identifies the checkpoint's *contents* (so a trainer that
    restarts and writes a new ``ckpt-1`` is a new checkpoint); ``written_ns`` is
    when it was finished (the newest mtime of its files) and orders checkpoints
    the way they were written, which stays right when a trainer restarts its
    step count from zero.
    """

    prefix: Path
    step: int | None
    files: tuple[Path, ...]
    written_ns: int
    fingerprint: str

    @property
    def name(self) -> str:
        return self.prefix.name

    @property
    def order_key(self) -> tuple[int, int, str]:
        return (self.written_ns, self.step if self.step is not None else -1, self.name)


@dataclass(slots=True)
class ScanResult:
    """What a scan found: complete checkpoints (oldest first) and problems worth a log line."""

    checkpoints: list[Checkpoint] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    directory_exists: bool = True
    #: Wall-clock time at which an incomplete checkpoint should be complete if
    #: nothing changes (a tree settling): scan again then, not at the next rescan.
    recheck_at: float | None = None


def list_directory(directory: Path, result: ScanResult) -> dict[str, os.DirEntry[str]] | None:
    """The entries of ``directory`` by name, or None with ``result`` saying why not.

    A directory that does not exist yet is no problem (``directory_exists``
    is cleared: the trainer has not started); a file in its place is one.
    Other errors (permissions) propagate: the supervisor reports them.
    """
    try:
        with os.scandir(directory) as it:
            return {e.name: e for e in it}
    except FileNotFoundError:
        result.directory_exists = False
    except NotADirectoryError:
        result.problems.append(f"{directory} is not a directory")
    return None


class Source(Protocol):
    """A checkpoint format. Implementations keep only caches, never decisions."""

    def scan(self, directory: Path) -> ScanResult:
        """Return the complete checkpoints in ``directory`` now (level-triggered)."""
        ...


@dataclass(frozen=True)
class SourceKind:
    """Everything the daemon needs to know about one ``source = "..."`` value.

    - ``scanner(options)`` builds the :class:`Source` that finds complete
      checkpoints (runs in the supervisor: no TensorFlow);
    - ``exporter`` names the module whose ``export(request) -> dict`` turns
      one pinned checkpoint into a SavedModel (runs in the worker child);
    - ``options`` is the schema of the ``[models.<name>]`` table;
    - ``builder`` says whether the ``builder`` key is ``"required"``,
      ``"optional"`` or ``"unused"``;
    - ``check(options, has_builder)`` returns cross-key problems (each naming
      its key relative to the options table), or an empty list;
    - ``path_keys`` are options holding paths, resolved against the
      config file's folder like every other path of the config;
    - ``weights_in_checkpoint``: the pinned checkpoint is a TensorFlow
      checkpoint holding every exported variable, so the validator can
      prove each one came from it (weight parity);
    - ``reusable_exporter``: the exporter builds the model once and restores
      each checkpoint into it, so one export worker may serve many exports
      of the model (``exporter_max_exports``, see :mod:`daemon.supervisor.warm_pool`).
    """

    name: str
    scanner: Callable[[Mapping[str, Any]], Source]
    exporter: str
    options: Schema = field(default_factory=dict)
    builder: Literal["required", "optional", "unused"] = "required"
    check: Callable[[Mapping[str, Any], bool], list[str]] | None = None
    path_keys: tuple[str, ...] = ()
    weights_in_checkpoint: bool = False
    reusable_exporter: bool = False
