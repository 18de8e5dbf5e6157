"""Object-store benchmarks (``python bench/run.py --only objectstores``).

Real servers on 127.0.0.1, started and stopped here: moto's S3 server
(``python -m moto.server``, a process of its own so that it does not share
the GIL with the client it serves) and fake-gcs-server (in-memory). Every
measure is a ratio against a baseline measured in the same run, each
repetition to a fresh prefix, reported as medians:

1. ``publish``: :meth:`ObjectStorage.publish` of a ResNet-50 SavedModel
   (``tf.saved_model.save``; 98 MiB of variables and a 1.4 MiB graph) with
   the publish lease held, against a plain parallel upload of the same files
   with the client library (boto3 ``upload_file``, default ``TransferConfig``;
   google-cloud-storage ``upload_from_filename``) on a thread pool as wide as
   the publisher's (:data:`~daemon.basepath.objects.UPLOAD_THREADS`).
   Target: publish <= 1.2x plain. Each publish is timed per phase through a
   delegating store that records every call (claim, body, ``saved_model.pb``,
   verify, commit).
2. ``fetch``: :func:`~daemon.supervisor.staging.fetch_checkpoint` of a
   remote ResNet-50 checkpoint written by ``tf.train.CheckpointManager``
   after one Adam step (so the slots exist), by ranges of the model's
   checkpoint keys (as the restore's own matching names them: the worker's
   weights map) plus ``_CHECKPOINTABLE_OBJECT_GRAPH``, against fetching it
   whole. Target: ranged <= 0.5x whole in time; bytes reported too.
3. ``listing`` (S3): the requests of one poll of a checkpoint dir holding
   1,000 old checkpoints (a tiny real TF checkpoint's objects under
   ``ckpt-1`` .. ``ckpt-1000`` and a ``checkpoint`` state object), polled
   the way the supervisor polls (``TFCheckpointSource.scan`` of the URL,
   the client :func:`~daemon.objectstore.clients.client_for` caches), after
   the first poll: counted with :data:`~daemon.objectstore.traffic.TRAFFIC`
   (operations) and botocore's ``before-send`` event (HTTP requests, so the
   listing's pages). Target: one listing and no GET per poll; the poll time
   is compared with a dir of 10 old checkpoints.

The TensorFlow material (SavedModel, Adam checkpoint, tiny checkpoint, the
model's checkpoint keys) is written once per run by a subprocess
(``python bench/objectstores.py materials DIR``), so this process never
imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUCKET = "bench"
#: Credentials moto accepts (any), set only while this group runs.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: Environment variables that would point a client elsewhere; unset while the group runs.
FOREIGN_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "STORAGE_EMULATOR_HOST")
MiB = 1024 * 1024


def log(msg: str) -> None:
    print(f"bench: objectstores: {msg}", file=sys.stderr, flush=True)


# --- TensorFlow material (subprocess) ----------------------------------------------


def _write_materials(out: Path) -> None:
    """``materials`` mode: run in a subprocess with TensorFlow (see the module docstring)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from daemon.children import incremental

    def resnet() -> Any:
        return keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))

    tf.random.set_seed(0)
    model = resnet()
    optimizer = keras.optimizers.Adam(1e-3)
    step = tf.Variable(0, dtype=tf.int64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 224, 224, 3)).astype("float32")
    y = np.eye(1000, dtype="float32")[[1, 2]]
    with tf.GradientTape() as tape:
        loss = keras.losses.categorical_crossentropy(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    step.assign_add(1)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    manager = tf.train.CheckpointManager(ckpt, str(out / "adam"), max_to_keep=None)
    prefix = manager.save(checkpoint_number=1)
    # The model's checkpoint keys as the worker's weights map records them: the
    # restore's own matching (Keras 3 stores the trainable variables under the
    # optimizer's keys when both are saved, so a name filter would miss them).
    status = tf.train.Checkpoint(model=resnet()).read(prefix)
    restored = incremental.restored_from(status, prefix)
    if len(restored) != len(model.variables):
        raise RuntimeError(f"weights map of {len(restored)} of {len(model.variables)} variables")
    needed = [*sorted(set(restored.values())), "_CHECKPOINTABLE_OBJECT_GRAPH"]
    (out / "needed.json").write_text(json.dumps(needed))
    tf.saved_model.save(model, str(out / "saved_model"))
    tiny = tf.train.Checkpoint(v=tf.Variable([1.0, 2.0, 3.0]), step=tf.Variable(3, dtype=tf.int64))
    tiny.write(str(out / "tiny" / "ckpt"))
    (out / "done").write_text("ok\n")


def materials(root: Path) -> Path:
    out = root / "objectstores-materials"
    if (out / "done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "materials", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"writing the TensorFlow material failed:\n{r.stderr[-3000:]}")
    log(f"TensorFlow material written in {time.monotonic() - t0:.0f} s")
    return out


# --- servers ------------------------------------------------------------------------


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1 (any credentials accepted)."""

    def __init__(self, log_dir: Path) -> None:
        self.log = log_dir / "moto.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        from tests.objectstores import _wait_http, free_port

        self.port = free_port()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **AWS_ENV),
            )
        _wait_http(self.url + "/moto-api/", self.proc, self.log)
        return self

    def stop(self) -> None:
        from tests.objectstores import _stop_process

        if self.proc is not None:
            _stop_process(self.proc)
            self.proc = None


@contextlib.contextmanager
def environment(scratch: Path) -> Iterator[None]:
    """Dummy AWS keys and the scratch dir for this group only; restored afterwards."""
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, *FOREIGN_ENV, "CKPT_EXPORTER_SCRATCH_DIR"]}
    os.environ.update(AWS_ENV, CKPT_EXPORTER_SCRATCH_DIR=str(scratch))
    for k in FOREIGN_ENV:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_client(endpoint: str, **config: Any) -> Any:
    """A plain boto3 client (default configuration unless ``config``)."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        config=Config(**config) if config else None,
    )


def gcs_bucket(endpoint: str) -> Any:
    """A plain google-cloud-storage bucket handle on fake-gcs-server."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        project="bench",
        client_options={"api_endpoint": endpoint},
    )
    return client.bucket(BUCKET)


def url_of(scheme: str, endpoint: str, prefix: str) -> Any:
    from daemon.objectstore.url import parse_url

    return parse_url(f"{scheme}://{BUCKET}/{prefix}", endpoint)


# --- a store that records every call -------------------------------------------------


class TimedStore:
    """Delegates to an :class:`~daemon.objectstore.client.ObjectStore`, recording each call.

    ``calls`` holds ``(operation, key, start, end)`` (monotonic seconds).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()

    @property
    def scheme(self) -> str:
        return str(self.inner.scheme)

    @property
    def bucket(self) -> str:
        return str(self.inner.bucket)

    def _timed(self, op: str, key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            with self._lock:
                self.calls.append((op, key, t0, time.monotonic()))

    def list(self, prefix: str, *, delimiter: bool = True, start_after: str = "") -> Any:
        return self._timed(
            "list",
            prefix,
            lambda: self.inner.list(prefix, delimiter=delimiter, start_after=start_after),
        )

    def head(self, key: str) -> Any:
        return self._timed("head", key, lambda: self.inner.head(key))

    def get(self, key: str) -> Any:
        return self._timed("get", key, lambda: self.inner.get(key))

    def get_range(self, key: str, start: int, length: int) -> Any:
        return self._timed("get_range", key, lambda: self.inner.get_range(key, start, length))

    def download(self, key: str, dest: Path) -> Any:
        return self._timed("download", key, lambda: self.inner.download(key, dest))

    def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_token: str | None = None
    ) -> Any:
        return self._timed(
            "put", key, lambda: self.inner.put(key, data, if_absent=if_absent, if_token=if_token)
        )

    def upload(self, key: str, source: Path, *, if_absent: bool = False) -> Any:
        return self._timed(
            "upload", key, lambda: self.inner.upload(key, source, if_absent=if_absent)
        )

    def verify(self, key: str, source: Path) -> Any:
        return self._timed("verify", key, lambda: self.inner.verify(key, source))

    def delete(self, key: str) -> Any:
        return self._timed("delete", key, lambda: self.inner.delete(key))

    def copy(self, source_key: str, dest_key: str) -> Any:
        return self._timed("copy", dest_key, lambda: self.inner.copy(source_key, dest_key))


def count_http(store: Any) -> Counter[str]:
    """HTTP requests an ``S3Store`` sends, by S3 operation (retries included), from now on.

    botocore's ``before-send`` event of the store's own client (a private
    attribute: only a benchmark may reach for it).
    """
    counts: Counter[str] = Counter()

    def on_send(event_name: str = "", **_: Any) -> None:
        counts[event_name.rsplit(".", 1)[-1]] += 1

    store._s3.meta.events.register("before-send.s3", on_send)
    return counts


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# --- 1. publish -----------------------------------------------------------------------


def _saved_model_files(sm: Path) -> list[tuple[Path, str]]:
    return sorted((p, p.relative_to(sm).as_posix()) for p in sm.rglob("*") if p.is_file())


def _plain_upload(
    scheme: str, endpoint: str, prefix: str, files: list[tuple[Path, str]], width: int
) -> tuple[float, dict[str, float]]:
    """Upload ``files`` under ``prefix`` with the library's own upload call; wall and per file."""
    if scheme == "s3":
        client = s3_client(endpoint)

        def send(f: Path, key: str) -> None:
            client.upload_file(str(f), BUCKET, key)
    else:
        bucket = gcs_bucket(endpoint)

        def send(f: Path, key: str) -> None:
            bucket.blob(key).upload_from_filename(str(f))

    per: dict[str, float] = {}

    def one(item: tuple[Path, str]) -> None:
        f, rel = item
        t = time.monotonic()
        send(f, f"{prefix}/{rel}")
        per[rel] = time.monotonic() - t

    t0 = time.monotonic()
    with ThreadPoolExecutor(width) as pool:
        list(pool.map(one, files))
    return time.monotonic() - t0, per


def _publish_once(scheme: str, endpoint: str, prefix: str, sm: Path) -> dict[str, Any]:
    """One :meth:`ObjectStorage.publish` of ``sm`` to a fresh base path; wall and phases."""
    from daemon.basepath.layout import METADATA_RELPATH
    from daemon.basepath.objects import SAVED_MODEL_PB, ObjectStorage
    from daemon.objectstore.clients import client_for

    base = url_of(scheme, endpoint, prefix)
    store = TimedStore(client_for(base))
    storage = ObjectStorage(base, store)
    export = storage.new_export_dir()
    for f, rel in _saved_model_files(sm):
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(f, export / rel)  # publish moves the export folder away: links, not the cache
    lock = storage.publish_lock()
    if not lock.try_acquire():
        raise RuntimeError(f"could not take the lease of {base}")
    try:
        t0 = time.monotonic()
        version, _ = storage.publish(
            export, lambda taken: max(taken, default=0) + 1, {"model": "resnet50"}
        )
        wall = time.monotonic() - t0
    finally:
        lock.release()
    if version != 1:
        raise RuntimeError(f"published as version {version}, not 1")
    calls = [c for c in store.calls if c[2] >= t0]
    commit = base.key(f"1/{METADATA_RELPATH.as_posix()}")
    uploads = [c for c in calls if c[0] == "upload"]
    body = [c for c in uploads if not c[1].endswith("/" + SAVED_MODEL_PB) and c[1] != commit]
    pb = [c for c in uploads if c[1].endswith("/" + SAVED_MODEL_PB)]
    verify = [c for c in calls if c[0] == "verify"]
    done = [c for c in uploads if c[1] == commit]
    big = max(body, key=lambda c: c[3] - c[2])

    def span(cs: list[tuple[str, str, float, float]]) -> float:
        return max(c[3] for c in cs) - min(c[2] for c in cs) if cs else 0.0

    phases = {
        "claim": body[0][2] - t0 if body else 0.0,  # remove_partial_versions + claim + metadata
        "body": span(body),
        "saved_model_pb": span(pb),
        "verify": span(verify),
        # From the last verify to the commit record's end: the lease check and the record.
        "commit": max(c[3] for c in done) - max(c[3] for c in verify) if done and verify else 0.0,
    }
    phases["rest"] = wall - sum(phases.values())
    ops = Counter(c[0] for c in calls)
    return {
        "seconds": wall,
        "phases": phases,
        "largest_upload": {"key": big[1].rsplit("/", 2)[-1], "seconds": big[3] - big[2]},
        "operations": dict(ops),
    }


def bench_publish(scheme: str, endpoint: str, sm: Path, reps: int) -> dict[str, Any]:
    from daemon.basepath.objects import UPLOAD_THREADS

    files = _saved_model_files(sm)
    largest = max(files, key=lambda x: x[0].stat().st_size)[1]
    # One untimed round each: the server's and the clients' first-use costs.
    _plain_upload(scheme, endpoint, "warm/plain", files, UPLOAD_THREADS)
    _publish_once(scheme, endpoint, "warm/publish", sm)
    plain: list[float] = []
    plain_largest: list[float] = []
    published: list[dict[str, Any]] = []
    for i in range(reps):
        # Alternate which goes first, so neither always runs on a fresher server.
        order = ("plain", "publish") if i % 2 == 0 else ("publish", "plain")
        for what in order:
            if what == "plain":
                wall, per = _plain_upload(scheme, endpoint, f"plain/{i}", files, UPLOAD_THREADS)
                plain.append(wall)
                plain_largest.append(per[largest])
            else:
                published.append(_publish_once(scheme, endpoint, f"publish/{i}", sm))
        took = published[-1]["seconds"]
        log(f"{scheme} publish #{i}: plain {plain[-1]:.2f} s, publish {took:.2f} s")
    pub = [p["seconds"] for p in published]
    phases = {k: median([p["phases"][k] for p in published]) for k in published[0]["phases"]}
    return {
        "files": len(files),
        "bytes": sum(f.stat().st_size for f, _ in files),
        "width": UPLOAD_THREADS,
        "plain_seconds": plain,
        "publish_seconds": pub,
        "plain_median": median(plain),
        "publish_median": median(pub),
        "ratio": median(pub) / median(plain),
        "publish_phases_median": phases,
        "largest_file": largest,
        "largest_file_seconds_plain_median": median(plain_largest),
        "largest_file_seconds_publish_median": median(
            [p["largest_upload"]["seconds"] for p in published]
        ),
        "publish_operations": published[-1]["operations"],
        "target": 1.2,
        "meets_target": median(pub) / median(plain) <= 1.2,
    }


def crc_seconds(path: Path) -> dict[str, float]:
    """Local checksum time of ``path`` as the backends compute it (S3 CRC32, GCS CRC32C)."""
    from daemon.objectstore.s3 import file_crc32_b64

    with path.open("rb") as f:
        while f.read(1 << 24):  # in the page cache, as a fresh export is
            pass
    t0 = time.monotonic()
    file_crc32_b64(path)
    out = {"s3_crc32": time.monotonic() - t0}
    with contextlib.suppress(ImportError):
        from daemon.objectstore.gcs import file_crc32c_b64

        t0 = time.monotonic()
        file_crc32c_b64(path)
        out["gs_crc32c"] = time.monotonic() - t0
    return out


# --- 2. fetch -------------------------------------------------------------------------


def _upload_dir(scheme: str, endpoint: str, prefix: str, folder: Path) -> None:
    from daemon.basepath.objects import UPLOAD_THREADS

    files = sorted((p, p.name) for p in folder.iterdir() if p.is_file())
    _plain_upload(scheme, endpoint, prefix, files, UPLOAD_THREADS)


def bench_fetch(
    scheme: str, endpoint: str, adam: Path, needed: list[str], work: Path, reps: int
) -> dict[str, Any]:
    from daemon.objectstore.clients import client_for
    from daemon.objectstore.traffic import TRAFFIC
    from daemon.sources.tf_checkpoint import TFCheckpointSource
    from daemon.supervisor.staging import fetch_checkpoint

    _upload_dir(scheme, endpoint, "fetch", adam)
    scan = TFCheckpointSource().scan(url_of(scheme, endpoint, "fetch"))
    if len(scan.checkpoints) != 1:
        raise RuntimeError(f"expected one remote checkpoint, found {scan}")
    ckpt = scan.checkpoints[0]
    runs: dict[str, list[tuple[float, int]]] = {"whole": [], "ranged": []}
    requests: dict[str, int] = {}
    for i in range(reps + 1):  # the first round untimed
        order = ("whole", "ranged") if i % 2 == 0 else ("ranged", "whole")
        for what in order:
            staging = work / f"fetch-{scheme}-{what}-{i}"
            before = TRAFFIC.snapshot()
            t0 = time.monotonic()
            _, method, nbytes = fetch_checkpoint(ckpt, staging, None if what == "whole" else needed)
            wall = time.monotonic() - t0
            shutil.rmtree(staging, ignore_errors=True)
            expected = "fetch" if what == "whole" else "fetch-ranges"
            if method != expected:
                raise RuntimeError(f"{what} fetch used {method!r}, not {expected!r}")
            after = TRAFFIC.snapshot()
            requests[what] = after.requests_total(scheme) - before.requests_total(scheme)
            if i:
                runs[what].append((wall, nbytes))
        if i:
            log(
                f"{scheme} fetch #{i}: whole {runs['whole'][-1][0]:.2f} s, "
                f"ranged {runs['ranged'][-1][0]:.2f} s"
            )
    whole = median([w for w, _ in runs["whole"]])
    ranged = median([w for w, _ in runs["ranged"]])
    # What one ranged GET costs this server: 1 byte of the large shard against
    # 1 byte of a small object (moto reads the whole object for every GET).
    store = client_for(url_of(scheme, endpoint, "fetch"))
    shard = max(zip(ckpt.files, ckpt.sizes, strict=True), key=lambda x: x[1])[0]
    store.put("probe/small", b"\0" * (1 << 20))
    cost = {}
    for name, key in (("large_object", shard.prefix), ("small_object", "probe/small")):
        t0 = time.monotonic()
        for _ in range(5):
            store.get_range(key, 1000, 1)
        cost[name] = (time.monotonic() - t0) / 5
    return {
        "checkpoint_bytes": sum(ckpt.sizes),
        "tensors_named": len(needed),
        "whole_seconds": [w for w, _ in runs["whole"]],
        "ranged_seconds": [w for w, _ in runs["ranged"]],
        "whole_median": whole,
        "ranged_median": ranged,
        "requests": requests,
        "one_byte_range_get_seconds": cost,
        "whole_bytes": runs["whole"][0][1],
        "ranged_bytes": runs["ranged"][0][1],
        "ratio": ranged / whole,
        "bytes_ratio": runs["ranged"][0][1] / runs["whole"][0][1],
        "target": 0.5,
        "meets_target": ranged / whole <= 0.5,
    }


# --- 3. listing -----------------------------------------------------------------------


def _fill_remote_dir(endpoint: str, prefix: str, tiny: Path, n: int) -> None:
    """``ckpt-1`` .. ``ckpt-n`` with the tiny checkpoint's bytes, and a ``checkpoint`` state."""
    client = s3_client(endpoint, max_pool_connections=16)
    blobs = {p.name.replace("ckpt", "", 1): p.read_bytes() for p in tiny.iterdir()}
    names = [f"ckpt-{i}" for i in range(1, n + 1)]
    puts = [(f"{prefix}/{name}{suffix}", data) for name in names for suffix, data in blobs.items()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), puts))
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{x}"' for x in names]
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint", Body="\n".join(lines) + "\n")


def _polls(endpoint: str, prefix: str, n: int, polls: int) -> dict[str, Any]:
    from daemon.objectstore.clients import client_for
    from daemon.objectstore.traffic import TRAFFIC
    from daemon.sources.directory import RemoteDirectory
    from daemon.sources.tf_checkpoint import TFCheckpointSource

    url = url_of("s3", endpoint, prefix)
    http = count_http(client_for(url))
    source = TFCheckpointSource()  # one per model, kept across polls as the supervisor does
    t0 = time.monotonic()
    first = source.scan(url)
    first_seconds = time.monotonic() - t0
    if len(first.checkpoints) != n:
        raise RuntimeError(f"{url}: {len(first.checkpoints)} checkpoints, not {n}")
    seconds: list[float] = []
    listing: list[float] = []
    ops: list[Counter[str]] = []
    pages: list[Counter[str]] = []
    for _ in range(polls):
        before, http_before = TRAFFIC.snapshot(), Counter(http)
        # A fresh view of the URL per poll, as open_directory makes one; its
        # client is the cached one, behind a recorder that times the listing.
        timed = TimedStore(client_for(url))
        t0 = time.monotonic()
        result = source.scan(RemoteDirectory(url, timed))
        seconds.append(time.monotonic() - t0)
        listing.append(sum(c[3] - c[2] for c in timed.calls if c[0] == "list"))
        after = TRAFFIC.snapshot()
        ops.append(
            Counter(
                {
                    op: after.requests_total("s3", op) - before.requests_total("s3", op)
                    for (s, op, _out) in after.requests
                    if s == "s3"
                }
            )
            - Counter()  # drop zeros
        )
        pages.append(Counter(http) - http_before)
        if len(result.checkpoints) != n:
            raise RuntimeError(f"{url}: poll saw {len(result.checkpoints)} checkpoints")
    worst = max(ops, key=lambda c: sum(c.values()))
    return {
        "checkpoints": n,
        "objects": 2 * n + 1,
        "first_poll_seconds": first_seconds,
        "poll_seconds": seconds,
        "poll_median": median(seconds),
        "listing_median": median(listing),
        "operations_per_poll": [dict(c) for c in ops],
        "http_per_poll": [dict(c) for c in pages],
        "worst_operations": dict(worst),
    }


def bench_listing(endpoint: str, tiny: Path, polls: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in (10, 1000):
        t0 = time.monotonic()
        _fill_remote_dir(endpoint, f"poll{n}", tiny, n)
        log(f"{n} checkpoints uploaded in {time.monotonic() - t0:.1f} s")
        out[str(n)] = _polls(endpoint, f"poll{n}", n, polls)
        log(f"{n} checkpoints: poll {out[str(n)]['poll_median'] * 1e3:.0f} ms")
    big = out["1000"]
    per_poll = big["worst_operations"]
    lists, gets = (
        per_poll.get("list", 0),
        sum(v for k, v in per_poll.items() if k in ("get", "get_range", "download", "head")),
    )
    out["ratio_1000_to_10"] = big["poll_median"] / out["10"]["poll_median"]
    out["meets_target"] = lists == 1 and gets == 0 and set(per_poll) <= {"list"}
    return out


# --- the group ------------------------------------------------------------------------


def scenario_objectstores(root: Path, quick: bool = False) -> dict[str, Any]:
    """Every measure of the module docstring; ``quick``: S3 only, two repetitions."""
    from daemon.objectstore.clients import reset_clients

    reps = 2 if quick else 3
    mat = materials(root)
    needed = json.loads((mat / "needed.json").read_text())
    work = root / "objectstores"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[str, Any] = {"repetitions": reps}
    schemes = ["s3"] if quick else ["s3", "gs"]
    with environment(work / "scratch"):
        reset_clients()
        try:
            for scheme in schemes:
                server: Any
                if scheme == "s3":
                    server = MotoServer(work).start()
                else:
                    from tests.objectstores import GCSServer

                    server = GCSServer(work).start()
                try:
                    from tests.objectstores import create_bucket

                    create_bucket(scheme, server.url, BUCKET)
                    t0 = time.monotonic()
                    r: dict[str, Any] = {
                        "publish": bench_publish(scheme, server.url, mat / "saved_model", reps)
                    }
                    log(f"{scheme} publish took {time.monotonic() - t0:.0f} s")
                    t0 = time.monotonic()
                    r["fetch"] = bench_fetch(scheme, server.url, mat / "adam", needed, work, reps)
                    log(f"{scheme} fetch took {time.monotonic() - t0:.0f} s")
                    if scheme == "s3":
                        t0 = time.monotonic()
                        r["listing"] = bench_listing(server.url, mat / "tiny", 5)
                        log(f"s3 listing took {time.monotonic() - t0:.0f} s")
                    results[scheme] = r
                finally:
                    reset_clients()
                    server.stop()
        finally:
            reset_clients()
    big = max((mat / "saved_model").rglob("*.data-*"), key=lambda p: p.stat().st_size)
    results["local_checksum_seconds"] = crc_seconds(big)
    shutil.rmtree(work, ignore_errors=True)
    return results


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows of bench/run.py's table for this group's results."""
    rows: list[tuple[str, str, str]] = []
    n = r.get("repetitions", 0)
    for scheme in ("s3", "gs"):
        s = r.get(scheme)
        if not s:
            continue
        server = "moto" if scheme == "s3" else "fake-gcs-server"
        p = s["publish"]
        lib = "boto3 upload_file" if scheme == "s3" else "upload_from_filename"
        rows.append(
            (
                f"{scheme} ({server}): plain {lib} of a ResNet-50 SavedModel, {p['width']} threads",
                f"{p['plain_median']:.2f} s (median of {n}, {p['bytes'] / MiB:.0f} MiB)",
                "1.00",
            )
        )
        ph = p["publish_phases_median"]
        rows.append(
            (
                f"{scheme} ({server}): ObjectStorage.publish of the same files",
                f"{p['publish_median']:.2f} s (claim {ph['claim']:.2f}, body {ph['body']:.2f}, "
                f"saved_model.pb {ph['saved_model_pb']:.2f}, verify {ph['verify']:.2f}, "
                f"commit {ph['commit']:.2f})",
                f"{p['ratio']:.2f} (target <= 1.2: {_met(p['meets_target'])})",
            )
        )
        f = s["fetch"]
        rows.append(
            (
                f"{scheme} ({server}): fetch a ResNet-50 Adam checkpoint whole",
                f"{f['whole_median']:.2f} s, {f['whole_bytes'] / MiB:.0f} MiB",
                "1.00",
            )
        )
        rows.append(
            (
                f"{scheme} ({server}): fetch it by ranges (model's {f['tensors_named'] - 1} "
                "keys + object graph)",
                f"{f['ranged_median']:.2f} s, {f['ranged_bytes'] / MiB:.0f} MiB "
                f"({f['bytes_ratio']:.2f} of the bytes), {f['requests']['ranged']} requests; "
                "server time of a 1-byte ranged GET: "
                f"{f['one_byte_range_get_seconds']['large_object'] * 1e3:.0f} ms on the shard, "
                f"{f['one_byte_range_get_seconds']['small_object'] * 1e3:.0f} ms on 1 MiB",
                f"{f['ratio']:.2f} (target <= 0.5: {_met(f['meets_target'])})",
            )
        )
        lst = s.get("listing")
        if lst:
            big, small = lst["1000"], lst["10"]
            ops = ", ".join(f"{v} {k}" for k, v in sorted(big["worst_operations"].items()))
            http = max(big["http_per_poll"], key=lambda c: sum(c.values()))
            pages = ", ".join(f"{v} {k}" for k, v in sorted(http.items()))
            rows.append(
                (
                    f"{scheme} ({server}): one poll of a dir of 1,000 old checkpoints "
                    "(after the first)",
                    f"{ops or 'nothing'} (HTTP: {pages or 'none'})",
                    f"target 1 list, 0 GET: {_met(lst['meets_target'])}",
                )
            )
            rows.append(
                (
                    f"{scheme} ({server}): poll time, 1,000 vs 10 old checkpoints",
                    f"{big['poll_median'] * 1e3:.0f} ms vs {small['poll_median'] * 1e3:.0f} ms "
                    f"(of which listing {big['listing_median'] * 1e3:.0f} ms vs "
                    f"{small['listing_median'] * 1e3:.0f} ms)",
                    f"{lst['ratio_1000_to_10']:.2f}",
                )
            )
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "materials":
        _write_materials(Path(sys.argv[2]))
    else:
        sys.exit("usage: python bench/objectstores.py materials DIR (the group: bench/run.py)")
