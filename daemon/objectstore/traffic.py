"""Counters of object-store traffic: requests, bytes and retries (stdlib only).

The backends (:mod:`~daemon.objectstore.s3`, :mod:`~daemon.objectstore.gcs`)
update one process-wide :data:`TRAFFIC`; the metrics module reads it with
:meth:`Traffic.snapshot` and exposes it. Nothing here knows about Prometheus.

Contract: every public method is thread-safe (uploads run parts in
parallel threads). ``requests`` counts operations of the
:class:`~daemon.objectstore.client.ObjectStore` interface (one ``upload`` is
one request however many HTTP calls it took) by ``(scheme, operation,
outcome)``, where ``outcome`` is ``"ok"`` or the error kind it ended with;
``retries`` counts HTTP attempts repeated after a retryable failure;
``bytes_*`` count payload bytes that went over the wire successfully.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TrafficSnapshot:
    """A consistent copy of every counter at one moment (safe to keep and compare)."""

    #: ``(scheme, operation, outcome) -> count``; ``outcome`` is ``"ok"`` or an error kind.
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: ``scheme -> bytes`` written to the store.
    bytes_uploaded: dict[str, int] = field(default_factory=dict)
    #: ``scheme -> bytes`` read from the store.
    bytes_downloaded: dict[str, int] = field(default_factory=dict)
    #: ``scheme -> HTTP attempts`` repeated after a retryable failure.
    retries: dict[str, int] = field(default_factory=dict)

    def requests_total(
        self, scheme: str, operation: str | None = None, outcome: str | None = None
    ) -> int:
        """The sum of ``requests`` for ``scheme``, optionally one operation and/or outcome."""
        return sum(
            n
            for (s, op, out), n in self.requests.items()
            if s == scheme and operation in (None, op) and outcome in (None, out)
        )


class Traffic:
    """Process-wide counters; see the module docstring for what each counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._up: Counter[str] = Counter()
        self._down: Counter[str] = Counter()
        self._retries: Counter[str] = Counter()

    def request(self, scheme: str, operation: str, outcome: str) -> None:
        """Count one finished operation (``outcome``: ``"ok"`` or an error kind)."""
        with self._lock:
            self._requests[(scheme, operation, outcome)] += 1

    def uploaded(self, scheme: str, nbytes: int) -> None:
        """Count ``nbytes`` written to the store."""
        if nbytes:
            with self._lock:
                self._up[scheme] += nbytes

    def downloaded(self, scheme: str, nbytes: int) -> None:
        """Count ``nbytes`` read from the store."""
        if nbytes:
            with self._lock:
                self._down[scheme] += nbytes

    def retry(self, scheme: str, n: int = 1) -> None:
        """Count ``n`` repeated HTTP attempts."""
        if n:
            with self._lock:
                self._retries[scheme] += n

    def snapshot(self) -> TrafficSnapshot:
        """A copy of every counter, taken under the lock (so the copy is consistent)."""
        with self._lock:
            return TrafficSnapshot(
                requests=dict(self._requests),
                bytes_uploaded=dict(self._up),
                bytes_downloaded=dict(self._down),
                retries=dict(self._retries),
            )

    def reset(self) -> None:
        """Zero every counter (tests only: counters of a live daemon only grow)."""
        with self._lock:
            self._requests.clear()
            self._up.clear()
            self._down.clear()
            self._retries.clear()


#: The counters every backend of this process updates.
TRAFFIC = Traffic()
