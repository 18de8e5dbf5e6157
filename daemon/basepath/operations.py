"""Operator actions on a base path: rollback, pins, and the records they leave.

No TensorFlow and no daemon needed: these run from the ``ckpt-exporter``
command while the daemon may be running on the same base path, so every write
that could race a publication happens under :class:`~daemon.basepath.publish.BasePathLock`.

Files (all in the base path's state folder ``.ckpt-exporter/``, whose name TF
Serving never takes for a version):

- ``pins.json``: a JSON list of version numbers that retention must keep.
- ``rolled_back.json``: the checkpoints whose versions were rolled back, so the
  daemon never exports them again::

      {"fingerprints": {"<fingerprint>": {"version": 5, "checkpoint": "/x/ckpt-5",
                                          "at": 1700000000.0}},
       "floor_ns": 1700000000000000000,
       "highest_version": 5}

  ``floor_ns`` is the newest ``written_ns`` of any rolled-back checkpoint.
  The daemon must treat it like its watermark: with ``export_policy =
  "latest"`` the checkpoints written between the target and the rolled-back
  version were never exported (superseded), so their fingerprints are in no
  record; without the floor the daemon would export the newest of them as a
  new version and silently undo the rollback. ``highest_version`` is the
  highest version number ever moved aside, so a publisher can avoid reusing
  a number.
- ``rolled-back/<version>-<UTC timestamp>/``: the rolled-back versions, moved
  there whole (one rename each) and kept for inspection; nothing deletes them.
- ``signature_accepted.json``: ``ckpt-exporter accept-signature MODEL``'s
  one-shot permission for the next version to break the signature contract
  (:mod:`daemon.rules.signatures`)::

      {"model": "m", "at": 1700000000.0}

  The daemon reads it when it checks an export's signatures and deletes it
  once an export that saw it is published, whether or not that export
  changed anything.

This is a separate file from ``rejected.json`` on purpose: a running
supervisor keeps ``rejected.json`` in memory and rewrites it whole at its next
rejection, which would drop anything another process had added to it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon.basepath.catalog import Published, published_versions, scan_base_path
from daemon.basepath.layout import PINS_NAME, ROLLED_BACK_NAME, state_dir
from daemon.basepath.publish import BasePathLock
from daemon.basepath.storage import BasePathStorage, storage_for
from daemon.objectstore.url import Location
from daemon.rules.planner import History

#: How long an operation waits for a publication in progress to release the lock.
LOCK_TIMEOUT_SECONDS = 30.0
_LOCK_POLL_SECONDS = 0.1


class OperationError(Exception):
    """An operation was refused or failed; the message says why and what to do."""


class LockBusy(OperationError):
    """The base-path lock stayed held by another process for the whole timeout."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


# --- paths ------------------------------------------------------------------


def rolled_back_path(base_path: Location) -> Location:
    """Where ``rolled_back.json`` of ``base_path`` lives (for messages)."""
    return state_dir(base_path) / ROLLED_BACK_NAME


# --- shared helpers ---------------------------------------------------------


def acquire_lock(base_path: Location, timeout: float = LOCK_TIMEOUT_SECONDS) -> BasePathLock:
    """Take the base-path lock, retrying for up to ``timeout`` seconds; returns it held.

    The daemon holds the lock only while it publishes (a rename and a few
    fsyncs) and, where it honours pins, while it applies retention, so a short
    wait is normal. Raises :class:`LockBusy`, naming the holder's PID, when the
    lock is still held at the end. Prints nothing.
    """
    lock = BasePathLock(base_path)
    deadline = time.monotonic() + timeout
    while not lock.try_acquire():
        if time.monotonic() >= deadline:
            holder = lock.holder()
            raise LockBusy(
                f"{lock.path} is held by PID {holder} (still after {timeout:g} s); "
                "a publication may be stuck: check that process, then try again",
                holder,
            )
        time.sleep(_LOCK_POLL_SECONDS)
    return lock


def _owned(base_path: Location, model: str) -> list[Published]:
    """This daemon's versions of ``model``, oldest first (ties by folder name)."""
    return sorted(published_versions(base_path, model), key=lambda p: (p.version, p.path.name))


def _prefix(p: Published) -> str:
    """The checkpoint prefix a version was exported from ("" if its metadata lacks it)."""
    checkpoint = p.metadata.get("checkpoint")
    return str(checkpoint.get("prefix", "")) if isinstance(checkpoint, dict) else ""


def _no_versions(base_path: Location, model: str) -> OperationError:
    return OperationError(
        f"no version of model {model!r} published by ckpt-exporter in {base_path}"
    )


def _listing(versions: Iterable[int]) -> str:
    return ", ".join(str(v) for v in sorted(set(versions))) or "none"


def tree_bytes(root: Location) -> int:
    """Bytes of the regular files of the version at ``root`` (what it costs on disk; 0 if gone)."""
    return storage_for(root.parent).version_bytes(root.name)


# --- pins -------------------------------------------------------------------


def read_pins(base_path: Location) -> frozenset[int]:
    """The pinned versions of ``base_path``: empty when the file is missing or unreadable.

    Entries that are not integers (a hand edit) are ignored, not fatal:
    retention reads this on every publication and must not stop over it.
    """
    try:
        data = storage_for(base_path).read_record(PINS_NAME)
    except (OSError, ValueError):
        return frozenset()
    if not isinstance(data, list):
        return frozenset()
    return frozenset(v for v in data if isinstance(v, int) and not isinstance(v, bool))


def _write_pins(base_path: Location, pins: Iterable[int]) -> None:
    storage_for(base_path).write_record(PINS_NAME, sorted(set(pins)))


def pin_version(
    base_path: Location, model: str, version: int, *, lock_timeout: float = LOCK_TIMEOUT_SECONDS
) -> frozenset[int]:
    """Protect ``version`` of ``model`` from retention; returns the pins afterwards.

    Refuses (:class:`OperationError`) a version that this daemon did not
    publish for ``model`` in ``base_path``: a foreign version is never deleted
    anyway, and a pin on a number that does not exist yet would silently
    protect whatever is published under it later. Pinning a pinned version is
    a no-op. Runs under the base-path lock so that, where the daemon reads the
    pins and applies retention under the same lock, a pin cannot land between
    the two.
    """
    if not storage_for(base_path).exists():
        raise _no_versions(base_path, model)
    with acquire_lock(base_path, lock_timeout):
        owned = {p.version for p in _owned(base_path, model)}
        if version not in owned:
            raise OperationError(
                f"version {version} is not a version of model {model!r} published by "
                f"ckpt-exporter in {base_path} (available: {_listing(owned)})"
            )
        pins = read_pins(base_path)
        if version not in pins:
            pins = pins | {version}
            _write_pins(base_path, pins)
        return pins


def unpin_version(
    base_path: Location, model: str, version: int, *, lock_timeout: float = LOCK_TIMEOUT_SECONDS
) -> frozenset[int]:
    """Let retention remove ``version`` again; returns the pins afterwards.

    Refuses (:class:`OperationError`) a version that is not pinned. ``model``
    only names the model in messages: a pin may outlive its version (deleted
    by hand), and unpinning it must still work.
    """
    if version not in read_pins(base_path):
        raise OperationError(
            f"version {version} of model {model!r} is not pinned in {base_path} "
            f"(pinned: {_listing(read_pins(base_path))})"
        )
    with acquire_lock(base_path, lock_timeout):
        pins = read_pins(base_path)  # again, under the lock
        if version not in pins:
            raise OperationError(f"version {version} of model {model!r} is not pinned")
        pins = pins - {version}
        _write_pins(base_path, pins)
        return pins


# --- the signature contract's one-shot acceptance ---------------------------

#: The acceptance record's name in the state folder (see the module docstring).
SIGNATURE_ACCEPTED_NAME = "signature_accepted.json"


def accept_signature(base_path: Location, model: str) -> None:
    """Let the next version of ``model`` published in ``base_path`` change its signatures.

    Writes the one-shot record (module docstring): the next export the daemon
    checks while it is there passes the signature contract whatever it
    changed, and publishing that export consumes the record. Accepting twice
    is one acceptance. Refuses (:class:`OperationError`) a base path with no
    version of ``model``: there is no signature to change.
    """
    storage = storage_for(base_path)
    if not storage.exists() or not _owned(base_path, model):
        raise _no_versions(base_path, model)
    storage.write_record(SIGNATURE_ACCEPTED_NAME, {"model": model, "at": time.time()})


def signature_accepted(base_path: Location) -> bool:
    """Whether an ``accept-signature`` record waits in ``base_path``.

    A record that is not valid JSON still counts: its presence is the
    acceptance. Raises ``OSError`` when the state folder cannot be read
    (the caller must not take that for "no").
    """
    try:
        storage_for(base_path).read_record(SIGNATURE_ACCEPTED_NAME)
    except FileNotFoundError:
        return False
    except ValueError:
        pass  # not JSON: there all the same
    return True


def consume_signature_acceptance(base_path: Location) -> None:
    """Delete the ``accept-signature`` record of ``base_path`` (none: nothing to do), durably."""
    storage_for(base_path).delete_record(SIGNATURE_ACCEPTED_NAME)


# --- the rolled-back record -------------------------------------------------


@dataclass(frozen=True)
class RecordProblem:
    """Why the rollback record cannot be used: ``kind`` is ``"io"`` or ``"corrupt"``."""

    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class RolledBack:
    """``rolled_back.json`` of one base path, read once (see the module docstring).

    ``fingerprints`` and ``floor_ns`` say which checkpoints must never be
    exported again, ``highest_version`` the highest version number ever
    rolled back (never to be reused). ``problem`` says why the record could
    not be read; the other fields are then empty, and a caller must not
    publish (reading the record as empty could re-publish a checkpoint
    someone rolled back). A missing record is no problem and rules nothing out.
    """

    fingerprints: frozenset[str] = frozenset()
    floor_ns: int = 0
    highest_version: int = 0
    problem: RecordProblem | None = None

    def rules_out(self, fingerprint: str, written_ns: int) -> bool:
        """True for a checkpoint that was rolled back, or written at or before the floor."""
        return fingerprint in self.fingerprints or written_ns <= self.floor_ns

    def apply(self, history: History) -> History:
        """``history`` with this record folded in (see :func:`apply_rolled_back`)."""
        if not self.fingerprints and not self.floor_ns:
            return history
        return dataclasses.replace(
            history,
            rejected=history.rejected | self.fingerprints,
            watermark_ns=max(history.watermark_ns, self.floor_ns),
        )


def _load_rolled_back(
    storage: BasePathStorage, base_path: Location
) -> tuple[dict[str, Any], RecordProblem | None]:
    """The record as stored, and what is wrong with it.

    Missing: ``({}, None)``. Unreadable (an ``OSError``) or not a JSON object:
    ``({}, problem)``.
    """
    path = rolled_back_path(base_path)
    try:
        data = storage.read_record(ROLLED_BACK_NAME)
    except FileNotFoundError:
        return {}, None
    except OSError as e:
        return {}, RecordProblem("io", f"{path}: {e.strerror or e}")
    except ValueError as e:
        return {}, RecordProblem("corrupt", f"{path} is not valid JSON: {e}")
    if not isinstance(data, dict):
        return {}, RecordProblem("corrupt", f"{path} holds a {type(data).__name__}, not an object")
    return data, None


def _int_field(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _fingerprints(data: Mapping[str, Any]) -> dict[str, Any]:
    fps = data.get("fingerprints")
    return {str(k): v for k, v in fps.items()} if isinstance(fps, dict) else {}


def load_rolled_back(base_path: Location) -> RolledBack:
    """Read ``rolled_back.json`` of ``base_path`` once: everything the daemon needs from it.

    Use one result for one decision (a scan, a publication) instead of the
    functions below, each of which reads the file again.
    """
    data, problem = _load_rolled_back(storage_for(base_path), base_path)
    return RolledBack(
        fingerprints=frozenset(_fingerprints(data)),
        floor_ns=_int_field(data, "floor_ns"),
        highest_version=_int_field(data, "highest_version"),
        problem=problem,
    )


def read_rolled_back(base_path: Location) -> tuple[frozenset[str], int]:
    """``(fingerprints, floor_ns)`` of the rolled-back checkpoints of ``base_path``.

    Missing or unreadable file: ``(frozenset(), 0)``, which changes nothing.
    The daemon must never export a checkpoint whose fingerprint is listed, nor
    one written at or before ``floor_ns`` (see the module docstring).
    """
    record = load_rolled_back(base_path)
    return record.fingerprints, record.floor_ns


def rolled_back_problem(base_path: Location) -> RecordProblem | None:
    """What keeps the rollback record of ``base_path`` from being read, if anything.

    A missing record is no problem. Any problem means the caller must not
    publish for this model: reading the record as empty could re-publish a
    checkpoint someone rolled back. A ``"corrupt"`` record will not fix itself,
    so the daemon pauses the model; an ``"io"`` one is usually the base path
    itself being unreadable, which every step that touches it reports.
    """
    return load_rolled_back(base_path).problem


def highest_rolled_back_version(base_path: Location) -> int:
    """The highest version number ever rolled back in ``base_path`` (0 if none)."""
    return load_rolled_back(base_path).highest_version


def apply_rolled_back(history: History, base_path: Location) -> History:
    """``history`` with the rolled-back record of ``base_path`` folded in.

    Rolled-back fingerprints join ``rejected`` and the floor raises the
    watermark, so the planner treats them exactly as it treats a rejected
    checkpoint and an already-published one.
    """
    return load_rolled_back(base_path).apply(history)


# --- rollback ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MovedVersion:
    """A version taken out of TF Serving's sight by a rollback."""

    version: int
    source: Location  # where it was, in the base path
    destination: Location  # where it is now, under .ckpt-exporter/rolled-back/
    checkpoint: str  # the checkpoint prefix it was exported from ("" if unknown)
    fingerprint: str


@dataclass(frozen=True, slots=True)
class RollbackResult:
    """What :func:`rollback` did.

    ``target`` is the newest version of the model left; ``highest_remaining``
    is the highest version of any kind left in the base path, the one TF
    Serving serves (differs from ``target`` only when a foreign version is
    higher, which ``warnings`` then says).
    """

    model: str
    target: int
    moved: tuple[MovedVersion, ...]
    highest_remaining: int | None
    warnings: tuple[str, ...]


def _choose_target(owned: list[Published], model: str, base_path: Location, to: int | None) -> int:
    versions = sorted({p.version for p in owned})
    if not versions:
        raise _no_versions(base_path, model)
    if to is None:
        if len(versions) < 2:
            raise OperationError(
                f"model {model!r} has only version {versions[0]} in {base_path}: "
                "there is no older version to roll back to"
            )
        return versions[-2]
    if to not in versions:
        raise OperationError(
            f"version {to} is not a version of model {model!r} published by ckpt-exporter "
            f"in {base_path} (available: {_listing(versions)})"
        )
    if to == versions[-1]:
        raise OperationError(
            f"version {to} is already the newest version of model {model!r}: "
            "nothing newer to roll back"
        )
    return to


def _record(
    storage: BasePathStorage,
    base_path: Location,
    doomed: list[Published],
    now: float,
    warnings: list[str],
) -> None:
    """Merge the doomed versions' checkpoints into ``rolled_back.json``, durably."""
    data, problem = _load_rolled_back(storage, base_path)
    if problem is not None and problem.kind == "io":
        # Replacing a record we merely could not read would drop its entries.
        raise OperationError(
            f"cannot read {problem.message}; make it readable and run the command again"
        )
    if problem is not None:
        warnings.append(f"{problem.message}; it is replaced by a new record")
    fingerprints = _fingerprints(data)
    floor_ns = _int_field(data, "floor_ns")
    highest = _int_field(data, "highest_version")
    for p in doomed:
        if p.fingerprint:
            fingerprints[p.fingerprint] = {
                "version": p.version,
                "checkpoint": _prefix(p),
                "at": now,
            }
        else:
            warnings.append(
                f"version {p.version} records no checkpoint fingerprint; only the "
                "write-time floor keeps its checkpoint from being exported again"
            )
        floor_ns = max(floor_ns, p.written_ns)
        highest = max(highest, p.version)
    # Durable before anything moves (BasePathStorage.write_record's contract).
    storage.write_record(
        ROLLED_BACK_NAME,
        {"fingerprints": fingerprints, "floor_ns": floor_ns, "highest_version": highest},
    )


def rollback(
    base_path: Location,
    model: str,
    to: int | None = None,
    *,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> RollbackResult:
    """Take every version of ``model`` newer than the target out of TF Serving's sight.

    Contract:

    - the target is ``to``, or by default the second-newest version this
      daemon published for ``model``; it must be one of those versions and not
      the newest (otherwise :class:`OperationError`, naming the versions);
    - runs under the base-path lock (waiting up to ``lock_timeout`` seconds,
      then :class:`LockBusy` naming the holder's PID), so it never interleaves
      with a publication or with retention;
    - first records the newer versions' checkpoints in ``rolled_back.json``
      (fingerprints merged, ``floor_ns`` raised), durably, so that the daemon
      never exports them again even if this is interrupted right after;
    - then moves each newer version whole into ``.ckpt-exporter/rolled-back/``
      (on POSIX one rename each), ascending, each move durable before the next;
    - removes the pins of the moved versions;
    - never touches a version without this model's metadata; if one higher
      than the target remains, a warning says TF Serving will serve it.

    Interrupted at any point, running it again with the same arguments
    finishes the job: what was moved stays moved and the record is merged.
    """
    storage = storage_for(base_path)
    if not storage.exists():
        raise _no_versions(base_path, model)
    warnings: list[str] = []
    with acquire_lock(base_path, lock_timeout):
        # Decide under the lock: a publication that just finished counts.
        owned = _owned(base_path, model)
        target = _choose_target(owned, model, base_path, to)
        doomed = [p for p in owned if p.version > target]
        now = time.time()

        # 1. The record, before anything moves: a crash between the two steps
        #    leaves versions visible that the daemon will not export again
        #    (harmless, and the rerun finishes), never the reverse, where the
        #    daemon would re-export a version that has just been rolled back.
        _record(storage, base_path, doomed, now, warnings)

        # 2. The moves. TF Serving serves the highest version, so removing them
        #    in ascending order keeps the highest one visible until last: the
        #    server sees one transition, from the old highest straight to the
        #    target, and never loads an intermediate rolled-back version.
        #    Each move is durable before the next starts (move_to_rolled_back
        #    returns only then), so that after a power loss the order still
        #    holds: a lower version can never come back while a higher one is gone.
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        moved: list[MovedVersion] = []
        for p in doomed:
            try:
                dest = storage.move_to_rolled_back(p.path.name, f"{p.version}-{stamp}")
            except OSError as e:
                done = _listing(m.version for m in moved)
                raise OperationError(
                    f"could not move version {p.version} out of {base_path}: {e}; "
                    f"moved so far: {done}. Its checkpoint is already recorded as rolled "
                    "back; fix the cause and run the same rollback again to finish"
                ) from e
            moved.append(
                MovedVersion(
                    version=p.version,
                    source=p.path,
                    destination=dest,
                    checkpoint=_prefix(p),
                    fingerprint=p.fingerprint,
                )
            )

        # 3. A pin on a number that is gone would protect whatever is later
        #    published under the same number.
        pins = read_pins(base_path)
        unpinned = sorted(pins & {m.version for m in moved})
        if unpinned:
            _write_pins(base_path, pins - set(unpinned))
            warnings.append(f"pins removed with the rolled-back versions: {_listing(unpinned)}")

        remaining = scan_base_path(base_path)
    highest = max((e.version for e in remaining), default=None)
    if highest is not None and highest != target:
        warnings.append(
            f"version {highest} in {base_path} was not published by ckpt-exporter for "
            f"model {model!r} and is higher than {target}: TF Serving will serve "
            f"{highest}, not {target}; move it away to serve {target}"
        )
    return RollbackResult(
        model=model,
        target=target,
        moved=tuple(moved),
        highest_remaining=highest,
        warnings=tuple(warnings),
    )
