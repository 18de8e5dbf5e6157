"""What a completeness check of a file says, shared by :mod:`.zip_archive` and :mod:`.hdf5`.

A check reads a file through ``read_at(offset, length)`` (as ``os.pread``
does: fewer bytes only at the end of the file) and knows the file's size,
taken by the caller before the check. It answers one of three verdicts:

- :attr:`Verdict.COMPLETE`: the container's own end-of-write marks are all
  present and agree with the size (a ZIP's end record and central directory,
  an HDF5 superblock's end-of-file address);
- :attr:`Verdict.INCOMPLETE`: they are missing or disagree: a file still being
  written (or one truncated for good; only time tells the two apart);
- :attr:`Verdict.UNDECIDED`: the file uses something the check does not
  read (an unknown version, an undefined address, bytes beyond the recorded
  end): the caller falls back to waiting until the file stops changing.

Standard library only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

#: ``read_at(offset, length)``: up to ``length`` bytes from ``offset``.
ReadAt = Callable[[int, int], bytes]


class Verdict(enum.Enum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    UNDECIDED = "undecided"


@dataclass(frozen=True, slots=True)
class Completeness:
    """A verdict and, unless complete, why (a phrase for a log line)."""

    verdict: Verdict
    reason: str = ""

    @property
    def complete(self) -> bool:
        return self.verdict is Verdict.COMPLETE


COMPLETE = Completeness(Verdict.COMPLETE)


def incomplete(reason: str) -> Completeness:
    return Completeness(Verdict.INCOMPLETE, reason)


def undecided(reason: str) -> Completeness:
    return Completeness(Verdict.UNDECIDED, reason)


def bytes_reader(data: bytes) -> ReadAt:
    """``read_at`` over bytes in memory (tests, and files already read whole)."""

    def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return read_at
