"""A stand-in for TF Serving on an object store, run as a thread by the object-store fault tests.

What TF Serving's file-system source does on ``s3://`` or ``gs://`` (see
``daemon/basepath/objects.py``): it lists the base prefix with a delimiter,
takes as versions the names ``absl::SimpleAtoi`` accepts
(:func:`daemon.rules.versions.parse_version`), and loads the highest one
without checking first that ``saved_model.pb`` is there. A load without
``saved_model.pb`` fails and is retried a few times; then that number stays
failed until a higher one appears. A ``saved_model.pb`` whose variables are
missing loads "successfully" with no weights (tensorflow/serving#1086).

:class:`ObjectReader` does the same every ``poll`` seconds (50 ms), with the
S3/GCS client of the daemon and no TensorFlow:

- a load finds ``saved_model.pb``: then ``variables/variables.index`` and
  every data shard the index names (each at least as long as the tensors it
  holds) must be there. If one is not, and ``saved_model.pb`` is *still*
  there with the same ETag afterwards, the version was loaded without its
  variables: a **violation**. (Removal deletes ``saved_model.pb`` first, so a
  version being removed while it is loaded shows ``saved_model.pb`` gone on
  the second look; that load just failed.)
- a load finds no ``saved_model.pb``: it is retried ``retries`` times,
  ``retry_interval`` apart, then the number is **given up** for good.
- per number it records what it saw (``saved_model.pb``'s ETag and size,
  the commit record's ETag and checkpoint fingerprint) and flags a number
  **reused**: its ``saved_model.pb`` or commit record changed after it was
  seen, or the number disappeared from the listing and came back.

Store errors (a flaky server) are counted and the poll goes on. Start it with
:meth:`ObjectReader.start`; :meth:`ObjectReader.stop` ends the thread and
returns the :class:`ReaderReport`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from daemon.basepath.layout import METADATA_RELPATH
from daemon.formats.bundle import BundleFormatError, parse_index
from daemon.objectstore.client import ObjectStore, ObjectStoreError
from daemon.objectstore.url import ObjectURL
from daemon.rules.versions import parse_version

SAVED_MODEL_PB = "saved_model.pb"
VARIABLES_INDEX = "variables/variables.index"
COMMIT = METADATA_RELPATH.as_posix()


@dataclass
class Seen:
    """What the reader saw of one version number."""

    number: int
    first_listed: float
    #: ETag and size of ``saved_model.pb`` when first seen present.
    pb: tuple[str, int] | None = None
    #: ETag of the commit record when first seen, and the fingerprint it names.
    commit_token: str | None = None
    fingerprint: str | None = None
    #: When a load of this number succeeded (every file present), else None.
    loaded_at: float | None = None
    #: Loads that found no ``saved_model.pb`` (retried), and loads that failed
    #: because the version was being removed under them.
    failed_loads: int = 0
    removed_during_load: int = 0
    given_up: bool = False
    #: Listed, then absent from a later listing.
    disappeared: bool = False


@dataclass
class ReaderReport:
    """Everything the reader saw; the test asserts on it."""

    seen: dict[int, Seen] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    #: The versions loaded, in load order (what the server served, one after another).
    loads: list[int] = field(default_factory=list)
    polls: int = 0
    store_errors: int = 0

    @property
    def loaded(self) -> set[int]:
        return set(self.loads)

    @property
    def given_up(self) -> set[int]:
        return {n for n, s in self.seen.items() if s.given_up}


class ObjectReader(threading.Thread):
    """Lists ``base`` every ``poll`` seconds and loads the highest version (module docstring)."""

    def __init__(
        self,
        store: ObjectStore,
        base: ObjectURL,
        *,
        poll: float = 0.05,
        retries: int = 3,
        retry_interval: float = 0.1,
    ) -> None:
        super().__init__(name="object-reader", daemon=True)
        self.store = store
        self.base = base
        self.poll = poll
        self.retries = retries
        self.retry_interval = retry_interval
        self.report = ReaderReport()
        self._stop_event = threading.Event()
        self._mutex = threading.Lock()
        self._listed: set[int] = set()
        self._failure: BaseException | None = None

    # --- the thread ---------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                try:
                    self._poll_once()
                except ObjectStoreError:
                    with self._mutex:
                        self.report.store_errors += 1
                self._stop_event.wait(self.poll)
        except BaseException as e:  # reported by stop(): a reader bug must fail the test
            self._failure = e

    def stop(self, timeout: float = 30) -> ReaderReport:
        """End the thread; its report (raises what crashed the thread, if anything)."""
        self._stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "the object reader did not stop"
        if self._failure is not None:
            raise AssertionError(f"the object reader crashed: {self._failure!r}") from (
                self._failure
            )
        return self.report

    def snapshot(self) -> ReaderReport:
        """A copy of the report so far (safe to read while the thread runs)."""
        with self._mutex:
            r = self.report
            return ReaderReport(
                seen={n: Seen(**vars(s)) for n, s in r.seen.items()},
                violations=list(r.violations),
                reused=list(r.reused),
                loads=list(r.loads),
                polls=r.polls,
                store_errors=r.store_errors,
            )

    def wait_loaded(self, number: int, timeout: float = 60) -> None:
        """Until the reader has loaded ``number`` (or fail saying what it saw of it)."""
        deadline = time.monotonic() + timeout
        while number not in self.snapshot().loaded:
            assert self.is_alive(), f"the object reader died: {self._failure!r}"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the reader never loaded version {number}: {self.snapshot().seen.get(number)}"
                )
            time.sleep(0.05)

    # --- one poll -----------------------------------------------------------

    def _key(self, number_name: str, rel: str) -> str:
        return self.base.key(f"{number_name}/{rel}")

    def _poll_once(self) -> None:
        listing = self.store.list(self.base.folder_key())
        names: dict[int, str] = {}
        for folder in listing.folders:
            name = self.base.name_of(folder).rstrip("/")
            v = parse_version(name)
            if v is not None:
                names[v] = name
        now = time.time()
        with self._mutex:
            self.report.polls += 1
            for v in names:
                s = self.report.seen.get(v)
                if s is None:
                    self.report.seen[v] = Seen(number=v, first_listed=now)
                elif s.disappeared and v not in self._listed:
                    self._reuse(v, "it disappeared from the listing and came back")
            for v in self._listed - set(names):
                self.report.seen[v].disappeared = True
            self._listed = set(names)
        if not names:
            return
        top = max(names)
        self._check_identity(top, names[top])
        s = self.report.seen[top]
        if s.loaded_at is None and not s.given_up:
            self._load(top, names[top])

    def _reuse(self, number: int, why: str) -> None:
        # Caller holds the mutex.
        self.report.reused.append(f"version {number}: {why}")

    def _check_identity(self, number: int, name: str) -> None:
        """Record what ``saved_model.pb`` and the commit record are; flag a change."""
        pb = self.store.head(self._key(name, SAVED_MODEL_PB))
        commit = self.store.head(self._key(name, COMMIT))
        fingerprint: str | None = None
        if commit is not None:
            s = self.report.seen[number]
            if s.commit_token != commit.token:
                fingerprint = self._fingerprint(name)
        with self._mutex:
            s = self.report.seen[number]
            if pb is not None:
                ident = (pb.token, pb.size)
                if s.pb is None:
                    s.pb = ident
                elif s.pb != ident:
                    self._reuse(number, f"saved_model.pb changed from {s.pb} to {ident}")
            if commit is not None and s.commit_token != commit.token:
                if s.commit_token is not None:
                    self._reuse(
                        number,
                        f"commit record changed ({s.fingerprint} -> {fingerprint})",
                    )
                s.commit_token = commit.token
                s.fingerprint = fingerprint

    def _fingerprint(self, name: str) -> str | None:
        try:
            meta: Any = json.loads(self.store.get(self._key(name, COMMIT)))
            return str(meta["checkpoint"]["fingerprint"])
        except ObjectStoreError as e:
            if e.kind == "not_found":
                return None
            raise
        except (ValueError, KeyError, TypeError):
            return "<unreadable commit record>"

    def _load(self, number: int, name: str) -> None:
        """Load ``number`` as the server does, retrying a load without ``saved_model.pb``."""
        for attempt in range(self.retries + 1):
            if attempt and self._stop_event.wait(self.retry_interval):
                return
            outcome = self._try_load(number, name)
            if outcome != "no_saved_model":
                return
        with self._mutex:
            self.report.seen[number].given_up = True

    def _try_load(self, number: int, name: str) -> str:
        """``"loaded"``, ``"no_saved_model"``, ``"removed"`` or ``"violation"``."""
        pb = self.store.head(self._key(name, SAVED_MODEL_PB))
        if pb is None:
            with self._mutex:
                self.report.seen[number].failed_loads += 1
            return "no_saved_model"
        missing = self.missing_files(name)
        if not missing:
            with self._mutex:
                s = self.report.seen[number]
                s.loaded_at = time.time()
                self.report.loads.append(number)
            return "loaded"
        again = self.store.head(self._key(name, SAVED_MODEL_PB))
        with self._mutex:
            s = self.report.seen[number]
            if again is not None and again.token == pb.token:
                self.report.violations.append(
                    f"version {number} loaded with saved_model.pb but without {missing}"
                )
                s.loaded_at = time.time()  # the server would now serve it, weightless
                self.report.loads.append(number)
                return "violation"
            # saved_model.pb went first: the version was being removed under the load.
            s.removed_during_load += 1
            s.given_up = True
        return "removed"

    def missing_files(self, name: str) -> list[str]:
        """What a load of version ``name`` needs and does not find (the variables)."""
        folder = self.base.key(name) + "/"
        sizes = {
            o.key[len(folder) :]: o.size for o in self.store.list(folder, delimiter=False).objects
        }
        if VARIABLES_INDEX not in sizes:
            return [VARIABLES_INDEX]
        try:
            raw = self.store.get(self._key(name, VARIABLES_INDEX))
        except ObjectStoreError as e:
            if e.kind == "not_found":
                return [VARIABLES_INDEX]
            raise
        try:
            bundle = parse_index(raw, "variables/variables")
        except BundleFormatError as e:
            return [f"{VARIABLES_INDEX} (unreadable: {e})"]
        needed: dict[int, int] = dict.fromkeys(range(bundle.num_shards), 0)
        for entry in bundle.entries.values():
            needed[entry.shard_id] = max(needed[entry.shard_id], entry.offset + entry.size)
        missing = []
        for shard, length in sorted(needed.items()):
            rel = bundle.data_file(shard)
            if sizes.get(rel, -1) < length:
                missing.append(rel)
        return missing
