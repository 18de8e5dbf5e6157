"""The interface every checkpoint source implements, and what it returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from daemon.config.schema import Schema
from daemon.objectstore.url import ObjectURL
from daemon.sources.directory import CheckpointDirectory, Entry


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One complete checkpoint found by a source.

    ``fingerprint`` identifies the checkpoint's *contents* (so a trainer that
    restarts and writes a new ``ckpt-1`` is a new checkpoint); ``written_ns`` is
    when it was finished (the newest mtime of its files) and orders checkpoints
    the way they were written, which stays right when a trainer restarts its
    step count from zero.

    In a checkpoint directory on an object store, ``prefix`` and ``files`` are
    :class:`~daemon.objectstore.url.ObjectURL` (``.name``, ``.parent`` and
    ``str()`` as a ``Path``'s) and ``written_ns`` is the store's last-modified
    time; :func:`daemon.supervisor.staging.fetch_checkpoint` downloads them.
    ``sizes`` holds the size of each of ``files`` in the same order, as the
    scan saw them (empty when a source does not record them).
    """

    prefix: Path | ObjectURL
    step: int | None
    files: tuple[Path | ObjectURL, ...]
    written_ns: int
    fingerprint: str
    sizes: tuple[int, ...] = ()

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


def list_directory(
    directory: CheckpointDirectory, result: ScanResult, *, recursive: bool = False
) -> dict[str, Entry] | None:
    """The entries of ``directory`` by name, or None with ``result`` saying why not.

    A directory that does not exist yet (on an object store: nothing under the
    prefix) is no problem (``directory_exists`` is cleared: the trainer has not
    started); a file in its place is one. Other errors (permissions, and every
    :class:`~daemon.objectstore.client.ObjectStoreError`) propagate: the
    supervisor reports them. ``recursive``: see
    :meth:`~daemon.sources.directory.CheckpointDirectory.entries`.
    """
    try:
        entries = directory.entries(recursive=recursive)
    except NotADirectoryError:
        result.problems.append(f"{directory.location} is not a directory")
        return None
    if entries is None:
        result.directory_exists = False
    return entries


class Source(Protocol):
    """A checkpoint format. Implementations keep only caches, never decisions."""

    def scan(self, directory: Path | ObjectURL) -> ScanResult:
        """Return the complete checkpoints in ``directory`` now (level-triggered).

        ``directory`` is an :class:`~daemon.objectstore.url.ObjectURL` only for
        a source whose kind has ``remote_dirs``; reading it may raise
        :class:`~daemon.objectstore.client.ObjectStoreError`.
        """
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
      prove each one came from it (weight parity); a source whose options
      have ``weight_parity`` (``command``) may ask for less (see
      :mod:`daemon.sources.command`);
    - ``reusable_exporter``: the exporter builds the model once and restores
      each checkpoint into it, so one export worker may serve many exports
      of the model (``exporter_max_exports``, see :mod:`daemon.supervisor.warm_pool`);
    - ``remote_dirs``: the scanner reads a ``checkpoint_dir`` on an object
      store (``gs://``, ``s3://``: an :class:`~daemon.objectstore.url.ObjectURL`),
      polled by listing, and the supervisor fetches each checkpoint into
      staging (:func:`daemon.supervisor.staging.fetch_checkpoint`) before the
      export; False: local directories only;
    - ``rewrites_in_place``: a trainer may write a new checkpoint into the
      same file (Keras' ``ModelCheckpoint`` truncates ``best.keras`` and
      writes it again), so staging copies the files instead of hard-linking
      them: a link would change under the export.
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
    remote_dirs: bool = False
    rewrites_in_place: bool = False
