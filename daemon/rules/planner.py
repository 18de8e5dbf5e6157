"""Planning: which checkpoint to export next for one model. Pure functions only.

The planner turns *state* (the checkpoints on disk, what is already published,
what failed) into a *decision*, so a restart, a dropped inotify event or a
rescan all lead to the same answer.

Rules:

- A checkpoint is *done* when a published version records its fingerprint, or
  when it was written no later than the newest published checkpoint (the
  watermark). The watermark keeps the answer right after retention deleted old
  versions, and uses write time rather than step so that a trainer restarting
  from step 0 still produces new versions.
- A checkpoint that failed for good (``rejected``) is never planned again; one
  that failed transiently waits until its ``retry_at``.
- ``export_policy = "latest"`` exports only the newest candidate (the older ones
  are superseded); ``"all"`` exports every candidate, oldest first.
- ``min_interval_seconds`` delays the next export after the last publication.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from daemon.sources.base import Checkpoint


@dataclass(frozen=True, slots=True)
class History:
    """What is known about a model's past exports."""

    published_fingerprints: frozenset[str] = frozenset()
    watermark_ns: int = 0  # written_ns of the newest published checkpoint
    rejected: frozenset[str] = frozenset()
    retry_at: Mapping[str, float] = field(default_factory=dict)
    last_publish_time: float | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """The decision for one model now.

    ``next`` is the checkpoint to export now (None: nothing, or not yet);
    ``pending`` counts the checkpoints that will still be exported, ``next``
    included; ``wait_until`` is when to look again if something is waiting on
    a timer; ``superseded`` are candidates skipped by ``"latest"``.
    """

    next: Checkpoint | None
    pending: int
    wait_until: float | None = None
    superseded: tuple[Checkpoint, ...] = ()


def candidates(checkpoints: Sequence[Checkpoint], history: History) -> list[Checkpoint]:
    """Checkpoints not yet done and not rejected, oldest first."""
    out = [
        c
        for c in checkpoints
        if c.fingerprint not in history.published_fingerprints
        and c.fingerprint not in history.rejected
        and c.written_ns > history.watermark_ns
    ]
    out.sort(key=lambda c: c.order_key)
    return out


def plan(
    checkpoints: Sequence[Checkpoint],
    history: History,
    *,
    export_policy: str,
    min_interval_seconds: float,
    now: float,
    busy: Collection[str] = (),
) -> Plan:
    """Decide what to export next for one model (see module docstring)."""
    if export_policy not in ("latest", "all"):
        raise ValueError(f"unknown export_policy {export_policy!r}")
    todo = candidates(checkpoints, history)
    superseded: tuple[Checkpoint, ...] = ()
    if export_policy == "latest":
        # Pick the newest before dropping busy ones: while the newest is being
        # exported, the older candidates are superseded by it, not next in line.
        superseded = tuple(todo[:-1])
        todo = todo[-1:]
    todo = [c for c in todo if c.fingerprint not in busy]
    if not todo:
        return Plan(next=None, pending=0, superseded=superseded)

    waits: list[float] = []
    if history.last_publish_time is not None and min_interval_seconds > 0:
        due = history.last_publish_time + min_interval_seconds
        if now < due:
            waits.append(due)
    chosen = None
    if not waits:
        for c in todo:
            retry = history.retry_at.get(c.fingerprint)
            if retry is not None and now < retry:
                waits.append(retry)
                if export_policy == "all":
                    break  # keep step order: do not jump past a checkpoint waiting to retry
                continue
            chosen = c
            break
    return Plan(
        next=chosen,
        pending=len(todo),
        wait_until=min(waits) if waits and chosen is None else None,
        superseded=superseded,
    )
