"""The publish lock of a base path on an object store: a lease object.

An object store has no ``flock(2)``, and a lock file would outlive a crashed
holder. A *lease* is one object (the storage names it: ``.ckpt-exporter/lock``,
:data:`~daemon.basepath.layout.LOCK_NAME`), holding who owns it and until
when. The rules, each one conditional write:

- take a free lease: create-only write (``If-None-Match: *`` /
  ``ifGenerationMatch=0``): of two daemons starting at once exactly one wins;
- renew: replace it only if it is still the object we wrote (its token),
  every ``ttl / 3`` seconds, from a thread of ours, so a holder that is busy
  uploading for minutes keeps it;
- take over an expired lease: replace it only if it is still the expired
  object we read, so of two daemons taking over at once exactly one wins. A
  lease that cannot be read (the store failing) is never taken over; one
  whose content names no expiry (not written by us) expires ``ttl`` after
  its last write. One written from this very machine (host, boot and PID
  namespace) by a process that is gone is taken over at once, the same
  conditional way: a daemon restarted after a crash does not wait out its
  own dead lease;
- release: delete it, if we still hold it. A store failing then leaves the
  lease to expire on its own.

A renewal that finds the lease replaced means another process took it over
(we were paused past the expiry): the lease is *lost*, :meth:`LeaseLock.held`
turns false and the publisher must not commit a version. :meth:`LeaseLock.held`
also turns false once the last *successful* write's expiry has passed (a
store that fails every renewal does not extend it). Expiry compares the
writer's clock with the reader's, so it assumes clocks within a few seconds
of each other (NTP); :data:`TAKEOVER_GRACE_SECONDS` absorbs that.

Leases this process holds are registered by base path, so that the publish
step, which gets its own storage object, can check the lease is still held
right before the commit write.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from daemon.objectstore.client import ObjectInfo, ObjectStore, ObjectStoreError
from daemon.objectstore.url import ObjectURL

#: How long a lease lasts without renewal (read when a :class:`LeaseLock` is made).
LEASE_SECONDS = 60.0
#: How long past its expiry a lease is left to its holder before a takeover,
#: for clock skew between machines (read at each takeover attempt).
TAKEOVER_GRACE_SECONDS = 10.0

_held: dict[ObjectURL, LeaseLock] = {}
_held_lock = threading.Lock()


def held_lease(base: ObjectURL) -> LeaseLock | None:
    """The lease this process holds on ``base``, or None."""
    with _held_lock:
        return _held.get(base)


class LeaseLock:
    """A lease on one base path; one object is one would-be holder (see the module docstring)."""

    def __init__(
        self, store: ObjectStore, base: ObjectURL, key: str, ttl: float | None = None
    ) -> None:
        self.store = store
        self.base = base
        self.key = key
        #: Seconds a write of the lease lasts; :data:`LEASE_SECONDS` unless given.
        self.ttl = LEASE_SECONDS if ttl is None else ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._token: str | None = None
        self._expires = 0.0
        self._lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._mutex = threading.Lock()

    @property
    def path(self) -> ObjectURL:
        """Where the lease lives, for messages."""
        return ObjectURL(self.base.scheme, self.base.bucket, self.key, self.base.endpoint)

    def _body(self) -> tuple[bytes, float]:
        """The lease's content for a write starting now, and the expiry it names.

        The expiry is counted from before the write, so the holder's view of
        it is never later than what another process reads.
        """
        expires = time.time() + self.ttl
        body = json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "machine": MACHINE,
                "expires_at": expires,
                "ttl_seconds": self.ttl,
            }
        ).encode()
        return body, expires

    def _write(self, *, if_absent: bool = False, if_token: str | None = None) -> ObjectInfo:
        """Write the lease (conditionally); only a write that succeeded moves the expiry."""
        body, expires = self._body()
        info = self.store.put(self.key, body, if_absent=if_absent, if_token=if_token)
        self._expires = expires
        return info

    def try_acquire(self) -> bool:
        """Take the lease without waiting: True if this object holds it now."""
        info: ObjectInfo | None
        try:
            info = self._write(if_absent=True)
        except ObjectStoreError as e:
            if e.kind != "precondition":
                raise
            info = self._take_over_expired()
        if info is None:
            return False
        self._token = info.token
        self._lost = False
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self._renewer.start()
        with _held_lock:
            _held[self.base] = self
        return True

    def _create_again(self) -> ObjectInfo | None:
        """The lease was released between our write and our read: try once more, create-only."""
        try:
            return self._write(if_absent=True)
        except ObjectStoreError as e:
            if e.kind == "precondition":
                return None
            raise

    def _take_over_expired(self) -> ObjectInfo | None:
        current = self.store.head(self.key)
        if current is None:
            return self._create_again()
        # Read after the head: the content is at least as new as the token
        # the replace below names, so an expiry read here never belongs to an
        # older lease than the one replaced.
        try:
            raw = self.store.get(self.key)
        except ObjectStoreError as e:
            if e.kind == "not_found":
                return self._create_again()
            raise  # unreadable is not expired: a live holder must not lose it to a flaky read
        expires = _expires_at(_parse(raw))
        if expires is None:
            # Not a lease of ours (garbage, another tool): it expires a lease's
            # time after its last write.
            expires = current.updated_ns / 1e9 + self.ttl
        if time.time() < expires + TAKEOVER_GRACE_SECONDS and not _holder_dead(_parse(raw)):
            return None
        try:
            # Replace only the expired lease we looked at: of two daemons
            # taking it over at once, the second write fails here.
            return self._write(if_token=current.token)
        except ObjectStoreError as e:
            if e.kind in ("precondition", "not_found"):
                return None
            raise

    def _read(self) -> dict[str, object]:
        """The lease's content, or ``{}`` when absent or unreadable (for messages only)."""
        try:
            return _parse(self.store.get(self.key))
        except ObjectStoreError:
            return {}

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._mutex:
                if self._token is None:
                    return
                try:
                    info = self._write(if_token=self._token)
                except ObjectStoreError as e:
                    if e.kind in ("precondition", "not_found"):
                        self._lost = True  # taken over: we were paused past the expiry
                        return
                    continue  # the store is failing: try again, the lease may still hold
                self._token = info.token

    def held(self) -> bool:
        """True while this object holds the lease and it has not expired or been taken over."""
        return self._token is not None and not self._lost and time.time() < self._expires

    def holder(self) -> str:
        """Who holds (or last held) the lease, for messages."""
        data = self._read()
        if not data:
            return "unknown"
        expires = _expires_at(data)
        left = f", expires in {expires - time.time():.0f} s" if expires is not None else ""
        return f"pid {data.get('pid', '?')} on {data.get('host', '?')}{left}"

    def release(self) -> None:
        """Give the lease up; a no-op when this object does not hold it.

        Never raises for the store: a lease that cannot be deleted now
        expires on its own (``ttl`` plus the takeover grace).
        """
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with self._mutex:
            token, self._token = self._token, None
        with _held_lock:
            if _held.get(self.base) is self:
                del _held[self.base]
        if token is None or self._lost:
            return
        with contextlib.suppress(ObjectStoreError):
            current = self.store.head(self.key)
            # Delete only our own lease (not one taken over after we lost it).
            # A takeover between this head and the delete would need our lease
            # to have expired in between, which renewal up to now rules out.
            if current is not None and current.token == token:
                self.store.delete(self.key)


def _parse(raw: bytes) -> dict[str, object]:
    """A lease's content as a dict (``{}`` when it is not a JSON object)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _machine() -> str:
    """Who can tell whether a PID is alive: this host, this boot, this PID namespace.

    Two containers may share a host name, and a PID dead here may be alive
    in another PID namespace; only a lease written from the very same
    namespace of the same boot may be judged by its PID.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""  # cannot tell: never judged by PID
    return f"{socket.gethostname()}/{boot}/{pidns}"


#: This process's :func:`_machine` (fixed for its lifetime).
MACHINE = _machine()


def _holder_dead(data: dict[str, object]) -> bool:
    """True when the lease was written on this machine by a process that is gone.

    A daemon restarted after a crash then takes its own old lease at once
    instead of waiting out the expiry (the takeover is still conditional on
    the lease's token). A PID reused by another process reads as alive:
    the lease is then left to expire, the safe side.
    """
    pid = data.get("pid")
    if not MACHINE or data.get("machine") != MACHINE or not isinstance(pid, int):
        return False
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _expires_at(data: dict[str, object]) -> float | None:
    value = data.get("expires_at")
    return float(value) if isinstance(value, int | float) else None
