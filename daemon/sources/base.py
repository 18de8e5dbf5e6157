"""The interface every checkpoint source implements, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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


class Source(Protocol):
    """A checkpoint format. Implementations keep only caches, never decisions."""

    def scan(self, directory: Path) -> ScanResult:
        """Return the complete checkpoints in ``directory`` now (level-triggered)."""
        ...
