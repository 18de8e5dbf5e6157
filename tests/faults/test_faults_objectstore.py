"""Faults on an object-store base path (``s3://`` on moto): kills, errors, bad buckets, races.

Real ``ckpt-exporter run`` processes, real checkpoints of the demo trainer,
moto's S3 on 127.0.0.1 (the session's server, or one started here), and a
stand-in for TF Serving on an object store (:mod:`object_reader`) that lists
the base prefix every 50 ms and loads the highest version. Proven:

1. SIGKILL at random moments of publication (aimed from the daemon's log and
   from the store: the instant a number is claimed, the instant
   ``saved_model.pb`` lands): the reader never loads a version without its
   variables, no number is ever reused, partial versions are removed by the
   next publish, and the newest checkpoint is published after the last
   restart (``FAULTS_SEED=<n>`` replays a run; the seed is printed);
2. 500, 503 and 429 answers, a connection reset mid-upload and a lost
   response on PUTs of version objects (tests/faultproxy.py): every
   checkpoint is published complete, what the daemons log as published is
   what is committed, and the retries show in
   ``ckpt_exporter_object_store_retries_total``;
3. unknown credentials and a missing bucket: one ``model_paused`` line
   (reason ``object_store_unusable``) naming the model, the bucket and the
   operation, no checkpoint rejected; once the bucket exists a reload (SIGHUP)
   resumes the model and it publishes;
4. two daemons on one S3 prefix and one checkpoint folder: each checkpoint
   committed once under a number of its own, publications never overlap, and
   the lease of a SIGKILLed holder on another machine is taken over only
   after its expiry (on the same machine a dead holder's lease is taken at
   once: tests/test_objects_basepath.py).

The daemons run with a short lease (``daemon.basepath.lease.LEASE_SECONDS``
and ``TAKEOVER_GRACE_SECONDS`` set by a wrapper before ``daemon.cli.main``:
the config has no key for them): with the real 60 s + 10 s every SIGKILL of a
holder would stall the next start for 70 s.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OBJECT_STORE_BUCKET, child_env, train, write_config
from faultkit import Event, Kit, LiveDaemon, kit_for, metric_value, proc_cmdlines
from object_reader import ObjectReader
from objectstores import DUMMY_AWS_ENV

from daemon.basepath.layout import METADATA_RELPATH
from daemon.objectstore.client import ObjectStore, ObjectStoreError
from daemon.objectstore.clients import reset_clients
from daemon.objectstore.url import ObjectURL
from daemon.protocol import CHILD_NAMES
from daemon.sources.tf_checkpoint import TFCheckpointSource
from daemon.supervisor.warm_pool import warm_children_of

pytestmark = [pytest.mark.objectstore, pytest.mark.faults]

COMMIT = METADATA_RELPATH.as_posix()

#: Runs ``ckpt-exporter`` with the lease length and takeover grace from the environment.
_SHORT_LEASE_MAIN = """
import os, sys
import daemon.basepath.lease as lease
lease.LEASE_SECONDS = float(os.environ["FAULTS_LEASE_SECONDS"])
lease.TAKEOVER_GRACE_SECONDS = float(os.environ["FAULTS_LEASE_GRACE_SECONDS"])
# Stand in for another machine: a dead holder's lease is then judged by its
# expiry only, never by its PID.
lease.MACHINE = os.environ.get("FAULTS_MACHINE", lease.MACHINE)
from daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


class ShortLeaseDaemon(LiveDaemon):
    """:class:`faultkit.LiveDaemon` whose publish lease lasts ``lease`` s (+ ``grace`` s)."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *,
        lease: float,
        grace: float,
        env: dict[str, str] | None = None,
        machine: str | None = None,
    ) -> None:
        # LiveDaemon.__init__ with another command line (and optionally environment).
        self.log_path = log_path
        self._log = log_path.open("ab")
        self._offset = log_path.stat().st_size
        self._partial = b""
        self._events: list[Event] = []
        full_env = dict(child_env() if env is None else env)
        full_env["FAULTS_LEASE_SECONDS"] = str(lease)
        full_env["FAULTS_LEASE_GRACE_SECONDS"] = str(grace)
        if machine is not None:
            full_env["FAULTS_MACHINE"] = machine
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SHORT_LEASE_MAIN, "run", "--config", str(config)],
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)


def start_daemon(
    kit: Kit,
    config: Path,
    name: str,
    *,
    lease: float = 4.0,
    grace: float = 0.5,
    env: dict[str, str] | None = None,
    machine: str | None = None,
) -> ShortLeaseDaemon:
    d = ShortLeaseDaemon(
        config, kit.tmp / f"{name}.log", lease=lease, grace=grace, env=env, machine=machine
    )
    kit.daemons.append(d)
    return d


# --- the store ----------------------------------------------------------------


@pytest.fixture
def s3(s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """The session's moto through the standard variables, here and in the daemons."""
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.url)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("CKPT_EXPORTER_SCRATCH_DIR", str(tmp_path / "scratch"))
    reset_clients()
    yield s3_server
    reset_clients()


def observer(server: Any, bucket: str = OBJECT_STORE_BUCKET) -> ObjectStore:
    """A client of the test's own, straight to ``server`` (never through a fault proxy)."""
    from daemon.objectstore.s3 import S3Store

    return S3Store(bucket, endpoint_url=server.url)


def fresh_base(bucket: str = OBJECT_STORE_BUCKET) -> ObjectURL:
    return ObjectURL("s3", bucket, f"faults-{uuid.uuid4().hex[:10]}/models/m")


def claims(store: ObjectStore, base: ObjectURL) -> dict[int, dict[str, Any]]:
    """Every claim under ``base`` (number -> its content: pid, claimed_at)."""
    folder = base.key(".ckpt-exporter/claims") + "/"
    out = {}
    for o in store.list(folder).objects:
        name = o.key[len(folder) :]
        if name.isdigit():
            with contextlib.suppress(ObjectStoreError, ValueError):
                out[int(name)] = json.loads(store.get(o.key))
    return out


def claim_numbers(store: ObjectStore, base: ObjectURL) -> set[int]:
    folder = base.key(".ckpt-exporter/claims") + "/"
    return {
        int(o.key[len(folder) :])
        for o in store.list(folder).objects
        if o.key[len(folder) :].isdigit()
    }


def version_folders(store: ObjectStore, base: ObjectURL) -> set[int]:
    names = (base.name_of(f).rstrip("/") for f in store.list(base.folder_key()).folders)
    return {int(n) for n in names if n.isdigit()}


def committed(store: ObjectStore, base: ObjectURL) -> dict[int, dict[str, Any]]:
    """Versions whose commit record exists, with that record."""
    out = {}
    for v in version_folders(store, base):
        with contextlib.suppress(ObjectStoreError):
            out[v] = json.loads(store.get(base.key(f"{v}/{COMMIT}")))
    return out


def has_object(store: ObjectStore, base: ObjectURL, rel: str) -> bool:
    with contextlib.suppress(ObjectStoreError):
        return store.head(base.key(rel)) is not None
    return False


def scratch_of(tmp: Path, base: ObjectURL) -> Path:
    return tmp / "scratch" / "s3" / base.bucket / base.prefix


def wait_children_gone(staging: Path, daemon_pid: int, timeout: float = 15) -> None:
    """The killed daemon's worker and validator die with it (PR_SET_PDEATHSIG)."""
    names = set(CHILD_NAMES.values())

    def left() -> list[int]:
        pids = list(warm_children_of(daemon_pid))
        for pid, cmd in proc_cmdlines().items():
            comm = ""
            with contextlib.suppress(OSError):
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if "daemon.children." not in cmd and comm not in names:
                continue
            with contextlib.suppress(OSError):
                if str(staging) in cmd or os.readlink(f"/proc/{pid}/fd/1").startswith(str(staging)):
                    pids.append(pid)
        return pids

    deadline = time.monotonic() + timeout
    while left():
        assert time.monotonic() < deadline, f"orphaned children: {left()}"
        time.sleep(0.05)


def spin_until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.002)


# --- 1. SIGKILL during uploads --------------------------------------------------

#: At least this many SIGKILLs, more (up to MAX_KILLS) until every window was hit.
KILLS = 20
MAX_KILLS = 28
#: How a kill is aimed: an event of the daemon's log (or none: from the spawn),
#: then a random delay; "claimed"/"pb" then also wait for the store to show a
#: new claim / the new version's saved_model.pb, and add the delay after that.
AIMS: dict[str, tuple[str | None, float, float]] = {
    "start": (None, 0.0, 1.0),
    "export": ("export_started", 0.0, 1.5),
    # From "validated" the publish first takes the lease and reads the base path
    # (a few hundred ms on moto): most of these land there, a few in the uploads.
    "publish": ("validated", 0.0, 0.6),
    "claimed": ("validated", 0.0, 0.0),
    "upload": ("validated", 0.0, 0.08),
    "pb": ("validated", 0.0, 0.0),
    "after_publish": ("published", 0.0, 0.2),
}
PLAN = (
    ["start"] * 2
    + ["export"] * 1
    + ["publish"] * 5
    + ["claimed"] * 3
    + ["upload"] * 5
    + ["pb"] * 3
    + ["after_publish"] * 1
)
#: What the kills must have left at least this often (classified from the store).
MIN_LEFT = {"claim_only": 1, "uploading": 2, "pb_no_commit": 1}


def _partial_state(store: ObjectStore, base: ObjectURL, v: int) -> str:
    """What a claimed number whose publisher died holds: how far its publish got."""
    if has_object(store, base, f"{v}/{COMMIT}"):
        return "committed"
    if has_object(store, base, f"{v}/saved_model.pb"):
        return "pb_no_commit"
    if v in version_folders(store, base):
        return "uploading"
    return "claim_only"


@pytest.mark.timeout(600)
def test_sigkill_during_uploads_never_exposes_a_version_without_its_variables(
    tmp_path: Path, s3: Any
) -> None:
    seed = int(os.environ.get("FAULTS_SEED", str(time.time_ns() % 1_000_000)))
    print(f"FAULTS_SEED={seed}")
    rng = random.Random(seed)
    plan = PLAN[:]
    assert len(plan) == KILLS
    rng.shuffle(plan)

    base = fresh_base()
    store = observer(s3)
    ckpts = tmp_path / "ckpts"
    config = write_config(
        tmp_path,
        base_path=str(base),
        export_policy="latest",
        keep_versions=3,
        daemon={"rescan_interval_seconds": 0.5, "retry_backoff_seconds": 1},
    )
    staging = scratch_of(tmp_path, base) / "staging"
    reader = ObjectReader(store, base)
    reader.start()
    try:
        with kit_for(tmp_path) as kit:
            trainer = train(ckpts, 1000, interval=2.0, wait=False)
            kit.procs.append(trainer)
            kills: list[tuple[str, str]] = []
            left: collections.Counter[str] = collections.Counter()
            published: list[int] = []
            fingerprints: dict[int, str] = {}  # every committed version ever seen
            i = 0
            while True:
                short = [k for k, n in MIN_LEFT.items() if left[k] < n]
                if i >= KILLS and not short:
                    break
                assert i < MAX_KILLS, f"kills never left {short}: {kills}"
                aim = plan[i] if i < KILLS else rng.choice(["claimed", "upload", "pb"])
                claimed_before = claim_numbers(store, base)
                d = start_daemon(kit, config, f"daemon-{i:02d}")
                event, low, high = AIMS[aim]
                if event is not None:
                    d.wait_event(event, poll=0.002, timeout=180)
                with contextlib.suppress(TimeoutError):
                    if aim in ("claimed", "upload", "pb"):
                        # The lease of the life killed before may hold it up to 4.5 s.
                        new = spin_until(
                            lambda b=claimed_before: claim_numbers(store, base) - b,
                            10,
                            "a new claim",
                        )
                        if aim == "pb":
                            v = max(new)
                            spin_until(
                                lambda v=v: has_object(store, base, f"{v}/saved_model.pb"),
                                10,
                                "saved_model.pb",
                            )
                time.sleep(rng.uniform(low, high))
                d.kill9()
                events = d.events()
                published += [e["version"] for e in events if e["event"] == "published"]
                outcome = "no_claim"
                for v in sorted(claim_numbers(store, base) - claimed_before):
                    outcome = _partial_state(store, base, v)
                    left[outcome] += 1
                kills.append((aim, outcome))
                for v, meta in committed(store, base).items():
                    fingerprints.setdefault(v, meta["checkpoint"]["fingerprint"])
                wait_children_gone(staging, d.pid)
                i += 1

            # The last life: it runs until it published (so that it removed every
            # partial version under the lease), then the trainer stops.
            d = start_daemon(kit, config, "daemon-final")
            d.wait_event("published", timeout=120)
            trainer.terminate()
            trainer.wait(timeout=60)
            newest = TFCheckpointSource().scan(ckpts).checkpoints[-1]

            def newest_committed(_ev: Any) -> bool:
                versions = committed(store, base)
                return bool(versions) and (
                    versions[max(versions)]["checkpoint"]["fingerprint"] == newest.fingerprint
                )

            d.wait_for(newest_committed, timeout=120, what=f"{newest.name} committed")
            top = max(committed(store, base))
            reader.wait_loaded(top)
            published += [e["version"] for e in d.named("published")]
            assert d.stop() == 0
    finally:
        report = reader.stop()

    print(f"kills (aim, what the store held): {kills}")
    print(f"published in order: {published}; loaded in order: {report.loads}")
    print(f"given up: {sorted(report.given_up)}; polls: {report.polls}")
    assert len(kills) >= KILLS
    for k, n in MIN_LEFT.items():
        assert left[k] >= n, (k, kills)

    # The reader never loaded a version without its variables, and no number came twice.
    assert report.violations == [], report.violations
    assert report.reused == [], report.reused
    assert report.polls > 100 and report.store_errors == 0
    # Numbers only go up; a checkpoint is committed under one number only.
    assert published == sorted(set(published)), published
    for v, meta in committed(store, base).items():
        fingerprints.setdefault(v, meta["checkpoint"]["fingerprint"])
    by_fp = collections.Counter(fingerprints.values())
    assert max(by_fp.values()) == 1, fingerprints
    # Every claim is a number of its own: a partial number was never committed later.
    all_claims = claim_numbers(store, base)
    assert set(fingerprints) <= all_claims
    # After the last life's publish nothing partial is left: every folder is committed.
    final = committed(store, base)
    assert version_folders(store, base) == set(final), (version_folders(store, base), final)
    assert top == max(all_claims), (top, sorted(all_claims))
    assert len(final) <= 3
    for v, meta in final.items():
        assert meta["version"] == v


# --- 2. server errors during uploads ------------------------------------------------


def _wait_committed(d: LiveDaemon, store: ObjectStore, base: ObjectURL, n: int) -> None:
    d.wait_for(
        lambda _ev: len(committed(store, base)) >= n,
        timeout=240,
        what=f"{n} versions committed",
        poll=0.2,
    )


@pytest.mark.timeout(300)
def test_error_answers_resets_and_a_lost_response_are_retried_and_every_version_is_whole(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faultproxy import FaultProxy

    base = fresh_base()
    store = observer(s3)
    ckpts = tmp_path / "ckpts"
    train(ckpts, 3)
    fingerprints = {c.fingerprint for c in TFCheckpointSource().scan(ckpts).checkpoints}
    assert len(fingerprints) == 3
    config = write_config(tmp_path, base_path=str(base), export_policy="all")
    reader = ObjectReader(store, base)
    reader.start()
    try:
        with FaultProxy(s3.url, flavor="s3") as proxy, kit_for(tmp_path) as kit:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
            version = rf"^/{base.bucket}/{base.prefix}/\d+/"
            rules = {
                "500 on variables.index": proxy.fail(
                    "PUT", version + r"variables/variables\.index", status=500, times=2
                ),
                "503 on a data shard": proxy.fail(
                    "PUT", version + r"variables/variables\.data-", status=503, times=2
                ),
                "429 SlowDown on fingerprint.pb": proxy.fail(
                    "PUT", version + r"fingerprint\.pb", status=429, times=2
                ),
                "reset mid-body of saved_model.pb": proxy.reset(
                    "PUT", version + r"saved_model\.pb", times=2, after_bytes=2048
                ),
                "lost answer to the commit record": proxy.lose_response(
                    "PUT", version + r"assets\.extra/ckpt_exporter\.json", times=1
                ),
            }
            d = start_daemon(kit, config, "daemon")
            _wait_committed(d, store, base, 3)
            d.wait_event("published", n=3, timeout=60)
            retries = metric_value(d.metrics(), "ckpt_exporter_object_store_retries_total")
            failed_reasons = {
                e.get("reason") for e in d.events() if e["event"] in ("export_failed",)
            }
            events = d.events()
            assert d.stop() == 0
            injected = proxy.injected
    finally:
        report = reader.stop()

    hits = {name: (rule.hits, rule.times) for name, rule in rules.items()}
    print(f"faults injected: {hits}; retries counted: {retries}")
    for name, (hit, times) in hits.items():
        assert hit == times, (name, hits)
    # Every checkpoint published once, as a complete version; nothing partial anywhere.
    versions = committed(store, base)
    assert sorted(versions) == [1, 2, 3], versions
    assert {m["checkpoint"]["fingerprint"] for m in versions.values()} == fingerprints
    assert version_folders(store, base) == set(versions)
    for v in versions:
        assert reader.missing_files(str(v)) == [], v
    # What the daemon logged as published is exactly what is committed.
    published = [e for e in events if e["event"] == "published"]
    assert sorted(e["version"] for e in published) == [1, 2, 3]
    # The store's errors were ridden out by retries, not by failing and redoing exports.
    assert failed_reasons == set(), failed_reasons
    assert not [e for e in events if e["event"] in ("export_rejected", "model_paused")]
    assert retries is not None and retries >= injected, (retries, injected)
    assert report.violations == [] and report.reused == []


# --- 3. wrong credentials, a missing bucket ---------------------------------------------


@pytest.fixture
def auth_s3(tmp_path: Path) -> Iterator[Any]:
    """moto in a subprocess that checks access keys (unknown keys: 403 InvalidAccessKeyId)."""
    from objectstores import S3Server

    server = S3Server(tmp_path, auth=True).start()
    try:
        yield server
    finally:
        server.stop()


def _paused_line(d: LiveDaemon) -> Event:
    return d.wait_event("model_paused", timeout=60)


@pytest.mark.timeout(300)
def test_wrong_credentials_and_a_missing_bucket_pause_the_model_until_fixed_and_reloaded(
    tmp_path: Path, s3: Any, auth_s3: Any
) -> None:
    ckpts = tmp_path / "ckpts"
    train(ckpts, 2)
    missing_bucket = f"ckpt-missing-{uuid.uuid4().hex[:8]}"
    bucket_base = fresh_base(missing_bucket)
    creds_base = fresh_base()
    (tmp_path / "creds").mkdir()
    (tmp_path / "bucket").mkdir()
    creds_config = write_config(
        tmp_path / "creds", base_path=str(creds_base), checkpoint_dir=str(ckpts)
    )
    bucket_config = write_config(
        tmp_path / "bucket", base_path=str(bucket_base), checkpoint_dir=str(ckpts)
    )
    secret = f"wrong-secret-{uuid.uuid4().hex}"
    creds_env = child_env()
    creds_env.update(
        AWS_ACCESS_KEY_ID="AKIAIOSFODNN7NOTREAL",
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_ENDPOINT_URL_S3=auth_s3.url,
        CKPT_EXPORTER_SCRATCH_DIR=str(tmp_path / "creds" / "scratch"),
    )
    creds_env.pop("AWS_SESSION_TOKEN", None)
    with kit_for(tmp_path) as kit:
        creds = start_daemon(kit, creds_config, "creds", env=creds_env)
        bucket = start_daemon(kit, bucket_config, "bucket")
        lines = {"creds": _paused_line(creds), "bucket": _paused_line(bucket)}
        # Several scans later: still one line each, nothing exported, nothing rejected.
        time.sleep(3)
        for name, d in (("creds", creds), ("bucket", bucket)):
            line = lines[name]
            assert line["reason"] == "object_store_unusable", line
            assert line["model"] == "m", line
            assert d.count("model_paused") == 1, d.tail()
            for bad in ("export_started", "export_rejected", "export_failed", "published"):
                assert d.count(bad) == 0, (name, bad, d.tail())
        # The line names the bucket and the operation, and never the secret.
        assert f"list {OBJECT_STORE_BUCKET}/" in lines["creds"]["error"], lines["creds"]
        assert "InvalidAccessKeyId" in lines["creds"]["error"], lines["creds"]
        assert f"list {missing_bucket}/" in lines["bucket"]["error"], lines["bucket"]
        assert "does not exist" in lines["bucket"]["error"], lines["bucket"]
        assert secret not in creds.log_path.read_text()
        assert creds.stop() == 0

        # Fixed: the bucket exists now. A reload resumes the model, which publishes.
        from objectstores import create_bucket

        create_bucket("s3", s3.url, missing_bucket)
        bucket.hup()
        reloaded = bucket.wait_event("reloaded", timeout=30)
        assert "m" in reloaded.get("resumed", []), reloaded
        store = observer(s3, missing_bucket)
        _wait_committed(bucket, store, bucket_base, 2)
        bucket.wait_event("published", n=2, timeout=60)
        assert bucket.count("model_paused") == 1
        assert bucket.count("export_rejected") == 0
        assert bucket.stop() == 0
    # No checkpoint was blamed: rejected.json exists nowhere.
    assert not has_object(store, bucket_base, ".ckpt-exporter/rejected.json")
    assert not list(tmp_path.rglob("rejected.json"))


# --- 4. two daemons on one prefix ---------------------------------------------------------


class LeaseWatcher:
    """Reads the lease object every 10 ms; keeps every distinct lease it saw (a thread)."""

    def __init__(self, store: ObjectStore, base: ObjectURL) -> None:
        import threading

        self.store = store
        self.key = base.key(".ckpt-exporter/lock")
        self.leases: dict[tuple[str, float], dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-watcher", daemon=True)

    def __enter__(self) -> LeaseWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(ObjectStoreError, ValueError):
                body = json.loads(self.store.get(self.key))
                self.leases.setdefault((body["owner"], body["expires_at"]), body)

    def writes(self) -> list[tuple[float, int, str]]:
        """``(write time, pid, owner)`` of every lease write seen, oldest first."""
        return sorted(
            (b["expires_at"] - b["ttl_seconds"], int(b["pid"]), str(b["owner"]))
            for b in list(self.leases.values())
        )


def _holder_at(writes: list[tuple[float, int, str]], t: float) -> int | None:
    before = [w for w in writes if w[0] <= t]
    return before[-1][1] if before else None


@pytest.mark.timeout(360)
def test_two_daemons_on_one_prefix_publish_each_checkpoint_once_and_take_over_a_dead_lease(
    tmp_path: Path, s3: Any
) -> None:
    from faultkit import copy_checkpoint

    lease, grace = 4.0, 1.0
    made = tmp_path / "made"
    train(made, 6)
    names = [c.name for c in TFCheckpointSource().scan(made).checkpoints]
    assert len(names) == 6
    ckpts = tmp_path / "ckpts"
    for name in names[:3]:
        copy_checkpoint(made, name, ckpts)
    base = fresh_base()
    store = observer(s3)
    config = write_config(
        tmp_path,
        base_path=str(base),
        export_policy="all",
        daemon={"rescan_interval_seconds": 0.5},
    )
    with kit_for(tmp_path) as kit, LeaseWatcher(store, base) as watcher:
        # As if on two machines: the survivor cannot see that the holder died.
        ds = {
            n: start_daemon(kit, config, n, lease=lease, grace=grace, machine=f"host-{n}")
            for n in ("a", "b")
        }
        _wait_committed(ds["a"], store, base, 3)
        # Then a holder is SIGKILLed in the middle of a publish: the instant its claim appears.
        killed: ShortLeaseDaemon | None = None
        last_lease: dict[str, Any] = {}
        for name in names[3:]:
            before = claim_numbers(store, base)
            copy_checkpoint(made, name, ckpts)
            new = spin_until(lambda b=before: claim_numbers(store, base) - b, 120, "a claim")
            holder = int(claims(store, base)[max(new)]["pid"])
            victim = next(d for d in ds.values() if d.pid == holder)
            victim.kill9()
            with contextlib.suppress(ObjectStoreError, ValueError):
                last_lease = json.loads(store.get(base.key(".ckpt-exporter/lock")))
            if last_lease.get("pid") == holder:
                killed = victim
                break
            # It committed and let go before the kill landed: start it again, try the next.
            ds[next(n for n, d in ds.items() if d is victim)] = start_daemon(
                kit, config, f"again-{name}", lease=lease, grace=grace, machine=f"host-{name}"
            )
        assert killed is not None, "no kill landed while the holder held the lease"
        partial = max(new)
        survivor = next(d for d in ds.values() if d is not killed)
        ckpt_fp = {c.name: c.fingerprint for c in TFCheckpointSource().scan(ckpts).checkpoints}
        wanted = set(ckpt_fp.values())
        survivor.wait_for(
            lambda _ev: (
                {m["checkpoint"]["fingerprint"] for m in committed(store, base).values()} >= wanted
            ),
            timeout=120,
            what="every checkpoint committed",
        )
        time.sleep(0.5)
        assert survivor.stop() == 0
        events = {n: d.events() for n, d in ds.items()}

    versions = committed(store, base)
    all_claims = claims(store, base)
    print(f"claims: { {v: c['pid'] for v, c in sorted(all_claims.items())} }")
    print(f"versions: { {v: m['checkpoint']['prefix'] for v, m in sorted(versions.items())} }")
    # Each checkpoint committed exactly once; every number claimed once (claims are
    # create-only), and the killed publisher's number stays partial, never completed.
    fps = [m["checkpoint"]["fingerprint"] for m in versions.values()]
    assert sorted(fps) == sorted(wanted), versions
    assert partial not in versions
    assert set(versions) <= set(all_claims)
    assert version_folders(store, base) == set(versions)  # the partial one was removed
    # One holder at a time: every claim was made while its claimer held the lease.
    writes = watcher.writes()
    for v, c in all_claims.items():
        assert _holder_at(writes, c["claimed_at"]) == c["pid"], (v, c, writes)
    # The dead holder's lease was taken over only after its expiry (plus the grace).
    expiry = float(last_lease["expires_at"])
    after = [w for w in writes if w[0] > expiry - lease]
    takeover = next(w for w in after if w[1] == survivor.pid)
    assert takeover[0] >= expiry + grace - 0.05, (takeover, expiry)
    waits = [e for ev in events.values() for e in ev if e["event"] == "waiting_for_lock"]
    assert any(str(killed.pid) in str(e.get("held_by_pid")) for e in waits), waits
    # Checkpoints the loser had exported too were recognised, not published again.
    skipped = [e for ev in events.values() for e in ev if e["event"] == "already_published"]
    published = [e for ev in events.values() for e in ev if e["event"] == "published"]
    assert len(published) == len({e["version"] for e in published})
    print(f"published: {len(published)}, already_published: {len(skipped)}, waits: {len(waits)}")
