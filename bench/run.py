"""The benchmark suite: ``make bench`` (``python bench/run.py``).

Every number comes from real processes on this machine: the daemon as
``ckpt-exporter run``, real TensorFlow checkpoints written by
``tf.train.CheckpointManager``, and a plain export script as the baseline,
measured in the same run so that ratios compare like with like.

Scenarios (``--only`` picks some, ``--quick`` leaves out ResNet-50):

- ``latency``: checkpoint-to-published for the small model and ResNet-50,
  with cold children (``warm_workers = false``) and warm ones, next to the
  baseline script; also detection latency with one watched directory.
- ``detection``: checkpoint-to-export-started with 200 watched directories.
- ``idle``: CPU and RSS of the idle supervisor with 1 and 200 models.
- ``training``: a CPU training loop's step time while the daemon exports
  ResNet-50 checkpoints (one every 15 s) against its step time while the
  daemon is idle in between, and beside a process that only burns CPU at
  nice 19, for scale; all within one run of the loop.
- ``startup``: from exec to "started" and to the first export with 10,000
  versions in the base path and 1,000 checkpoints, against an empty start.
- ``keras_latency``: ``source = "keras"``, from a real ``model.save`` of a
  ``.keras`` file returning to the version published (warm children).
- ``objectstores``: publishing to, fetching from and polling S3 (moto) and
  GCS (fake-gcs-server) on 127.0.0.1 against plain client-library transfers
  (``bench/objectstores.py``; ``--quick``: S3 only, two repetitions).

A checkpoint "lands" the way a trainer lands one: data shards first, then the
``.index`` (renamed into place: the moment the checkpoint is complete), then
the ``checkpoint`` state file (written aside and renamed). Latencies are from
that index rename to the daemon's log event, both wall-clock on this machine.

Writes the results as JSON (``--out``, default ``bench/results.json``) and
prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
ENV = dict(
    os.environ,
    TF_CPP_MIN_LOG_LEVEL="2",
    PYTHONUNBUFFERED="1",
    PYTHONPATH=os.pathsep.join([str(REPO), str(BENCH)]),
)
import objectstores  # noqa: E402  (after sys.path)

from daemon.supervisor.warm_pool import warm_children_of  # noqa: E402  (after sys.path)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- checkpoints --------------------------------------------------------------


def make_checkpoints(model: str, out: Path, n: int) -> list[str]:
    """Write ``n`` checkpoints of ``model`` into ``out``; returns their prefixes, oldest first."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, str(BENCH / "make_checkpoints.py"), model, str(out), str(n)],
        env=ENV,
        check=True,
    )
    return sorted({p.name.split(".")[0] for p in out.glob("ckpt-*.index")}, key=_step)


def cache(path: Path) -> None:
    """Read ``path`` once, so that its pages are in the page cache."""
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


def _step(prefix: str) -> int:
    return int(prefix.rsplit("-", 1)[1])


def land(src: Path, prefix: str, dst: Path, name: str | None = None) -> float:
    """Put checkpoint ``prefix`` from ``src`` into ``dst`` as a trainer would.

    Returns the wall-clock time at which it became complete (the index rename).
    """
    name = name or prefix
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob(f"{prefix}.data-*"):
        # A trainer's checkpoint is in the page cache right after it is
        # written; these files were written minutes ago and may have been
        # evicted (this VM reclaims cold pages), so read them first, before
        # the clock starts. Then a link, not a copy: the bench's own writes
        # would disturb what it measures.
        cache(f)
        os.link(f, dst / f.name.replace(prefix, name, 1))
    tmp = dst / f".{name}.index.tmp"
    shutil.copyfile(src / f"{prefix}.index", tmp)
    t0 = time.time()
    os.rename(tmp, dst / f"{name}.index")
    state = dst / ".checkpoint.tmp"
    state.write_text(f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')
    os.rename(state, dst / "checkpoint")
    return t0


# --- the daemon ---------------------------------------------------------------


def write_config(ws: Path, models: list[dict[str, Any]], **daemon_keys: Any) -> Path:
    """``ws/config.toml``: JSON logs, metrics on a free port, these models and daemon keys."""
    keys = {
        "metrics_address": "127.0.0.1:0",
        "log_format": "json",
        "rescan_interval_seconds": 30,
        **daemon_keys,
    }
    lines = ["[daemon]"] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    for m in models:
        lines += ["", "[[models]]"] + [f"{k} = {json.dumps(v)}" for k, v in m.items()]
    config = ws / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


class Daemon:
    """``ckpt-exporter run`` as a subprocess with its JSON log in a file."""

    def __init__(self, ws: Path, models: list[dict[str, Any]], **daemon_keys: Any) -> None:
        self.config = write_config(ws, models, **daemon_keys)
        self.log_path = ws / "daemon.log"
        self._offset = 0
        self._events: list[dict[str, Any]] = []
        self.t_exec = time.time()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "run", "--config", str(self.config)],
                env=ENV,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=BENCH,
            )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        # Only the bytes added since the last call are parsed: the bench polls
        # often and must not take the CPU from the nice-19 children it times.
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    self._events.append(json.loads(line))
        return [e for e in self._events if name is None or e.get("event") == name]

    def wait(self, name: str, n: int = 1, timeout: float = 900, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if all(e.get(k) == v for k, v in match.items())]
            if len(found) >= n:
                return found[n - 1]
            bad = self.events("export_failed") + self.events("export_rejected")
            if bad:
                raise RuntimeError(f"export failed: {bad[-1]}")
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"no {name} event (n={n}):\n{tail}")
            time.sleep(0.05)

    def warm_children(self) -> list[int]:
        return warm_children_of(self.proc.pid)

    def settle(self, timeout: float = 120) -> None:
        """Wait until the supervisor and its warm children have stopped using CPU.

        Between two checkpoints a real daemon sits idle for minutes; a warm
        child has imported TensorFlow long before the next one lands.
        """
        deadline = time.monotonic() + timeout
        last: dict[int, int] = {}
        while time.monotonic() < deadline:
            pids = [self.proc.pid, *self.warm_children()]
            now = {p: cpu_ticks(p) for p in pids}
            if last and now == last and (len(pids) > 1 or not self.warm):
                return
            last = now
            time.sleep(1.0)

    @property
    def warm(self) -> bool:
        return "warm_workers = false" not in self.config.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared library pages split between their users."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def model_table(ws: Path, name: str, builder: str, **keys: Any) -> dict[str, Any]:
    """A ``[[models]]`` table; its checkpoint dir is created, as a running trainer's is."""
    (ws / "ckpts" / name).mkdir(parents=True, exist_ok=True)
    return {
        "name": name,
        "checkpoint_dir": str(ws / "ckpts" / name),
        "base_path": str(ws / "serving" / name),
        "builder": builder,
        "python_path": [str(BENCH)],
        "export_policy": "all",
        "keep_versions": 3,
        **keys,
    }


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def q(p: float) -> float:
        # Nearest rank: with fewer than 100 samples the p99 is the worst one.
        return xs[max(0, math.ceil(p * len(xs)) - 1)]

    return {
        "n": len(xs),
        "mean": statistics.fmean(xs),
        "p50": statistics.median(xs),
        "p99": q(0.99),
        "min": xs[0],
        "max": xs[-1],
    }


@contextlib.contextmanager
def workspace(root: Path, name: str) -> Iterator[Path]:
    ws = root / name
    shutil.rmtree(ws, ignore_errors=True)
    ws.mkdir(parents=True)
    try:
        yield ws
    finally:
        shutil.rmtree(ws, ignore_errors=True)


# --- scenarios ----------------------------------------------------------------


def baseline(model: str, src: Path, prefixes: list[str], root: Path) -> dict[str, Any]:
    walls, phases = [], []
    for prefix in prefixes:
        out = root / f"baseline-{model}-{prefix}"
        for f in src.glob(f"{prefix}.*"):
            cache(f)  # as land() does for the daemon
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, str(BENCH / "baseline.py"), model, str(src / prefix), str(out)],
            env=ENV,
            capture_output=True,
            text=True,
            check=True,
        )
        walls.append(time.monotonic() - t0)
        phases.append(json.loads(r.stdout.strip().splitlines()[-1]))
        shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": summary(walls),
        "phases": {k: statistics.fmean(p[k] for p in phases) for k in phases[0]},
    }


#: Latency measures: (name, warm_workers, incremental_export).
KINDS = (("cold", False, False), ("warm", True, False), ("warm_incremental", True, True))


def daemon_latency(
    model: str, src: Path, prefixes: list[str], root: Path, *, warm: bool, incremental: bool
) -> dict[str, Any]:
    """Checkpoint-to-published times of ``prefixes`` (with ``incremental``, all but the first).

    An incremental export needs a published version of the same model: the
    first checkpoint makes it (a full export, not timed), as in a training
    run where every export after the first is incremental.
    """
    kind = next(k for k, w, i in KINDS if (w, i) == (warm, incremental))
    # Warm full stands for a model's first export (or a changed graph's): a
    # worker forked from the zygote builds and traces the model. A kept
    # worker would reuse the model and the trace of the previous sample, so
    # there each sample gets a fresh worker (and a fresh validator).
    first = {"exporter_max_exports": 1} if warm and not incremental else {}
    with workspace(root, f"latency-{model}-{kind}") as ws:
        d = Daemon(
            ws,
            [model_table(ws, "m", f"models:{model}", incremental_export=incremental)],
            warm_workers=warm,
            export_timeout_seconds=3600,
            **first,
        )
        try:
            d.wait("started")
            d.settle()
            if incremental:
                land(src, prefixes[0], ws / "ckpts" / "m")
                d.wait("published", n=1)
                d.settle()
            skip = 1 if incremental else 0
            latencies, detection, phases = [], [], []
            for i, prefix in enumerate(prefixes[skip:], start=1 + skip):
                t0 = land(src, prefix, ws / "ckpts" / "m")
                pub = d.wait("published", n=i)
                started = d.wait("export_started", n=i)
                latencies.append(ts(pub) - t0)
                detection.append(ts(started) - t0)
                phases.append(pub["durations"])
                log(f"{model} {kind} #{i}: {latencies[-1]:.2f} s")
                d.settle()
            exported = d.events("exported")[skip:]
            warm_used = all(e["warm"] for e in exported + d.events("validated")[skip:])
            incremental_used = all(e.get("incremental_from") for e in exported)
            # Exports by a kept worker (one that had exported for this model before).
            reused = sum(1 for e in exported if e.get("reused", 0) > 0)
            # What waits between checkpoints: fresh worker, validator, kept exporter.
            idle = d.warm_children()
            idle_rss = sum(rss_bytes(p) for p in idle)
            idle_pss = sum(pss_bytes(p) for p in idle)
        finally:
            d.stop()
    return {
        "seconds": summary(latencies),
        "detection_seconds": summary(detection),
        "phases": {k: statistics.fmean(p[k] for p in phases) for k in phases[0]},
        "warm_children_used": warm_used,
        "incremental_used": incremental_used,
        "exports_by_kept_workers": f"{reused}/{len(exported)}",
        "idle_children": {"count": len(idle), "rss_bytes": idle_rss, "pss_bytes": idle_pss},
    }


def cli_latency(model: str, src: Path, prefixes: list[str], root: Path) -> dict[str, Any]:
    """``ckpt-exporter export`` run by hand on each of ``prefixes``: nothing warm beforehand.

    From the command's start to its exit, its checkpoint already complete: a
    process, its zygote and its children started from scratch each time, at
    the caller's priority with every CPU (the command's default).
    """
    walls, phases = [], []
    for i, prefix in enumerate(prefixes):
        with workspace(root, f"cli-{model}-{i}") as ws:
            config = write_config(ws, [model_table(ws, "m", f"models:{model}")], metrics_address="")
            land(src, prefix, ws / "ckpts" / "m")
            t0 = time.monotonic()
            r = subprocess.run(
                [sys.executable, "-m", "daemon", "export", "--config", str(config)],
                env=ENV,
                capture_output=True,
                text=True,
                cwd=BENCH,
                check=False,
            )
            walls.append(time.monotonic() - t0)
            if r.returncode != 0:
                raise RuntimeError(f"ckpt-exporter export failed: {r.stdout}{r.stderr[-3000:]}")
            published = [
                json.loads(line)
                for line in r.stderr.splitlines()
                if line.startswith("{") and '"published"' in line
            ]
            phases.append(published[-1]["durations"])
            log(f"{model} cli #{i + 1}: {walls[-1]:.2f} s")
    return {
        "seconds": summary(walls),
        "phases": {k: statistics.fmean(p[k] for p in phases) for k in phases[0]},
    }


def scenario_latency(root: Path, models: list[str], samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        n = samples if model == "small" else max(2, samples // 2)
        src = root / f"src-{model}"
        log(f"writing {3 * n + 1} {model} checkpoints")
        prefixes = make_checkpoints(model, src, 3 * n + 1)
        res = {"baseline": baseline(model, src, prefixes[:n], root)}
        log(f"{model} baseline: {res['baseline']['seconds']['mean']:.2f} s")
        # Each measure gets checkpoints of its own: a daemon never sees one twice.
        groups = [prefixes[:n], prefixes[n : 2 * n], prefixes[2 * n :]]
        for (kind, warm, incremental), group in zip(KINDS, groups, strict=True):
            res[kind] = daemon_latency(model, src, group, root, warm=warm, incremental=incremental)
        res["cli"] = cli_latency(model, src, prefixes[:n], root)
        base = res["baseline"]["seconds"]["mean"]
        for kind in (*(k for k, _, _ in KINDS), "cli"):
            res[kind]["ratio_to_baseline"] = res[kind]["seconds"]["mean"] / base
        out[model] = res
        shutil.rmtree(src, ignore_errors=True)
    return out


def _many_models(ws: Path, n: int) -> list[dict[str, Any]]:
    tables = []
    for i in range(n):
        tables.append(model_table(ws, f"m{i:03d}", "models:small"))
    return tables


def idle_usage(d: Daemon, seconds: float) -> dict[str, float]:
    d.settle()
    c0, t0 = cpu_ticks(d.proc.pid), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu_ticks(d.proc.pid), time.monotonic()
    return {
        "cpu_percent": 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0),
        "rss_bytes": rss_bytes(d.proc.pid),
        "warm_children_rss_bytes": sum(rss_bytes(p) for p in d.warm_children()),
        "warm_children_pss_bytes": sum(pss_bytes(p) for p in d.warm_children()),
        "seconds": t1 - t0,
    }


def scenario_idle_and_detection(root: Path, samples: int, idle_seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    src = root / "src-detect"
    prefixes = make_checkpoints("small", src, samples)
    for n in (1, 200):
        with workspace(root, f"idle-{n}") as ws:
            d = Daemon(ws, _many_models(ws, n))
            try:
                d.wait("started")
                out[f"idle_{n}_models"] = idle_usage(d, idle_seconds)
                log(f"idle with {n} models: {out[f'idle_{n}_models']}")
                if n == 200:
                    detection = []
                    for i, prefix in enumerate(prefixes, start=1):
                        name = f"m{(i * 37) % n:03d}"
                        t0 = land(src, prefix, ws / "ckpts" / name)
                        started = d.wait("export_started", model=name)
                        detection.append(ts(started) - t0)
                        d.wait("published", n=i)
                        d.settle()
                    out["detection_200_dirs"] = {"seconds": summary(detection)}
                    log(f"detection, 200 dirs: {out['detection_200_dirs']}")
            finally:
                d.stop()
    shutil.rmtree(src, ignore_errors=True)
    return out


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU time used so far by ``root_pid`` and every descendant, living or reaped.

    Each live process counts its own time and that of the children it has
    reaped (the kernel adds a reaped child's total to its parent's), so the
    sum over the live tree counts every process once: a validator forked
    and reaped by the zygote shows in the zygote's ``cutime``.
    """
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    tree, grew = {root_pid}, True
    while grew:
        more = {pid for pid, f in stats.items() if int(f[1]) in tree} - tree
        tree |= more
        grew = bool(more)
    ticks = sum(sum(int(x) for x in stats[pid][11:15]) for pid in tree if pid in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def _busy_nice19(seconds: float) -> subprocess.Popen[bytes]:
    """A process that only burns CPU, with the limits the daemon gives its children."""
    code = (
        "import sys, time\n"
        "from daemon.children.runtime import prepare_tensorflow_env\n"
        "prepare_tensorflow_env(False, nice=19, io_class='idle', threads=1)\n"
        "end = time.monotonic() + float(sys.argv[1])\n"
        "while time.monotonic() < end: pass\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(seconds)], env=ENV, cwd=REPO, start_new_session=True
    )


def _steps_in(
    steps: list[list[float]], windows: list[tuple[float, float]], *, inside: bool, margin: float
) -> list[float]:
    """Durations of the steps that start inside any window (``inside``) or clear of all.

    ``margin`` seconds are left out at both ends of each window, so that a
    step is not counted on the wrong side of a boundary.
    """
    out = []
    for start, seconds in steps:
        if inside:
            if any(a + margin <= start <= b - margin for a, b in windows):
                out.append(seconds)
        elif all(start < a - margin or start > b + margin for a, b in windows):
            out.append(seconds)
    return out


def _timeline(
    steps: list[list[float]], windows: dict[str, list[tuple[float, float]]], width: float
) -> list[tuple[float, float, str]]:
    """``(seconds from the first step, median step ms, what ran)`` per ``width`` s of the run."""
    t0, rows = steps[0][0], []
    by_bin: dict[int, list[list[float]]] = {}
    for step in steps:
        by_bin.setdefault(int((step[0] - t0) // width), []).append(step)
    for k, group in sorted(by_bin.items()):
        mid = group[len(group) // 2][0]
        what = next((n for n, ws in windows.items() if any(a <= mid <= b for a, b in ws)), "")
        rows.append((k * width, round(statistics.median(s[1] for s in group) * 1e3, 2), what))
    return rows


def scenario_training(
    root: Path, *, burner_cycles: int = 3, cycle: float = 10.0, interval: float = 15.0, n: int = 8
) -> dict[str, Any]:
    """A CPU training loop's step time while the daemon exports ResNet-50, and while not.

    One training process runs throughout, beside a daemon that has published
    the model's first version (a full export, once per model and start) and
    sits idle. Conditions alternate within that one run, so that drift of
    the machine between runs (measured here at up to 16 % between two
    separate runs alone) cancels out:

    1. For scale: ``burner_cycles`` times ``cycle`` s beside a process that
       only burns CPU at the children's priority, then ``cycle`` s without.
    2. ``n`` ResNet-50 checkpoints land, one every ``interval`` s. Steps
       taken while an export runs (``export_started`` to ``published``) are
       compared with the steps taken while the daemon is idle in between.
    """
    src = root / "src-train"
    prefixes = make_checkpoints("resnet50", src, n + 1)
    with workspace(root, "training") as ws:
        d = Daemon(ws, [model_table(ws, "m", "models:resnet50")], export_timeout_seconds=3600)
        try:
            d.wait("started")
            land(src, prefixes[0], ws / "ckpts" / "m")
            d.wait("published")
            d.settle()
            seconds = 10 + 2 * cycle * burner_cycles + n * interval + 2 * interval
            steps_file = ws / "steps.json"
            trainer = subprocess.Popen(
                [sys.executable, str(BENCH / "train_loop.py"), str(seconds), str(steps_file)],
                env=ENV,
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(10)  # the trainer's import and warm-up
            burning: list[tuple[float, float]] = []
            quiet: list[tuple[float, float]] = []
            for _ in range(burner_cycles):
                t0 = time.time()
                burner = _busy_nice19(3 * cycle)
                time.sleep(cycle)
                burner.kill()
                burner.wait()
                t1 = time.time()
                time.sleep(cycle)
                burning.append((t0, t1))
                quiet.append((t1, time.time()))
            cpu0, t_daemon = tree_cpu_seconds(d.proc.pid), time.time()
            for prefix in prefixes[1:]:
                land(src, prefix, ws / "ckpts" / "m")
                time.sleep(interval)
            d.wait("published", n=n + 1)
            daemon_cpu = tree_cpu_seconds(d.proc.pid) - cpu0
            out_text, _ = trainer.communicate()
            t_end = time.time()
            steps = json.loads(steps_file.read_text())
            started = [ts(e) for e in d.events("export_started")][1:]
            published = [ts(e) for e in d.events("published")][1:]
        finally:
            d.stop()
    shutil.rmtree(src, ignore_errors=True)
    exporting = list(zip(started, published, strict=True))
    on = _steps_in(steps, burning, inside=True, margin=0.5)
    off = _steps_in(steps, quiet, inside=True, margin=0.5)
    phase2 = [s for s in steps if t_daemon <= s[0] <= t_end]
    busy = _steps_in(phase2, exporting, inside=True, margin=0.0)
    # Idle: clear of every export by a second (the validator's exit, the
    # publication's fsync and the next fork are not in the window).
    idle = _steps_in(phase2, exporting, inside=False, margin=1.0)
    med = statistics.median
    result = {
        "steps": len(steps),
        "beside_busy_nice19": {
            "steps": len(on),
            "median_step_seconds": med(on),
            "median_step_seconds_without": med(off),
            "slowdown": med(on) / med(off) - 1,
        },
        "while_exporting": {
            "exports": len(exporting),
            "steps": len(busy),
            "median_step_seconds": med(busy),
            "median_step_seconds_idle": med(idle),
            "slowdown": med(busy) / med(idle) - 1,
            "export_seconds": [b - a for a, b in exporting],
            "daemon_cpu_seconds_per_export": daemon_cpu / max(1, len(exporting)),
        },
        "at_cadence": {
            "interval_seconds": interval,
            "steps": len(phase2),
            # Throughput over the whole phase against the idle steps' pace.
            "slowdown": statistics.fmean(s[1] for s in phase2) / statistics.fmean(idle) - 1,
        },
        "summary": json.loads(out_text.strip().splitlines()[-1]),
        "timeline": _timeline(steps, {"nice19": burning, "exporting": exporting}, 2.5),
    }
    log(f"training: {json.dumps({k: v for k, v in result.items() if k != 'summary'})}")
    return result


def _fill_base_path(base: Path, n: int) -> None:
    base.mkdir(parents=True)
    for v in range(1, n + 1):
        extra = base / str(v) / "assets.extra"
        extra.mkdir(parents=True)
        (extra / "ckpt_exporter.json").write_text(
            json.dumps(
                {
                    "tool": "ckpt-exporter",
                    "model": "m",
                    "version": v,
                    "published_at": 1.0,
                    "checkpoint": {"fingerprint": f"old-{v}", "written_ns": 1, "step": v},
                }
            )
        )


def _fill_checkpoints(src: Path, prefix: str, dst: Path, n: int) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    names = [f"ckpt-{i}" for i in range(1, n + 1)]
    for name in names:
        for f in src.glob(f"{prefix}.*"):
            os.link(f, dst / f.name.replace(prefix, name, 1))
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{x}"' for x in names]
    (dst / "checkpoint").write_text("\n".join(lines) + "\n")


def _startup(ws: Path) -> dict[str, float]:
    d = Daemon(ws, [model_table(ws, "m", "models:small", export_policy="latest")])
    try:
        started = d.wait("started")
        first = d.wait("export_started")
        return {"to_started": ts(started) - d.t_exec, "to_first_export": ts(first) - d.t_exec}
    finally:
        d.stop()


def scenario_startup(root: Path, versions: int, checkpoints: int) -> dict[str, Any]:
    src = root / "src-startup"
    prefix = make_checkpoints("small", src, 1)[0]
    with workspace(root, "startup-empty") as ws:
        _fill_checkpoints(src, prefix, ws / "ckpts" / "m", 1)
        empty = _startup(ws)
    with workspace(root, "startup-full") as ws:
        log(f"writing {versions} versions and {checkpoints} checkpoints")
        _fill_base_path(ws / "serving" / "m", versions)
        _fill_checkpoints(src, prefix, ws / "ckpts" / "m", checkpoints)
        full = _startup(ws)
    shutil.rmtree(src, ignore_errors=True)
    return {
        "empty": empty,
        f"{versions}_versions_{checkpoints}_checkpoints": full,
        "ratio_to_empty": full["to_first_export"] / empty["to_first_export"],
    }


#: The trainer of ``keras_latency``: saves the demo model as ``<dir>/model-<i>.keras``
#: (``model.save``, written in place as ``ModelCheckpoint`` writes it) on each
#: line read, and prints the wall-clock time at which the save returned.
_KERAS_TRAINER = """
import sys, time, keras, numpy as np
from daemon.demo.model import build_model
out = sys.argv[1]
model = build_model()
model.compile(optimizer="adam", loss="mse")
x, y = np.random.rand(64, 4).astype("float32"), np.random.rand(64, 1).astype("float32")
print("ready", flush=True)
for i, _ in enumerate(sys.stdin, start=1):
    model.fit(x, y, epochs=1, verbose=0)
    model.save(f"{out}/model-{i}.keras")
    print(time.time(), flush=True)
"""


def scenario_keras_latency(root: Path, samples: int) -> dict[str, Any]:
    """``source = "keras"``: from ``model.save`` returning to the version published.

    A real Keras process writes each ``.keras`` file into the watched folder
    (in place, as Keras does) while the daemon runs with warm children and
    the default options, so this includes detecting the file as complete.
    """
    with workspace(root, "keras-latency") as ws:
        ckpts = ws / "ckpts" / "m"
        ckpts.mkdir(parents=True)
        table = {
            "name": "m",
            "checkpoint_dir": str(ckpts),
            "base_path": str(ws / "serving" / "m"),
            "source": "keras",
            "export_policy": "all",
            "keep_versions": 3,
        }
        d = Daemon(ws, [table], export_timeout_seconds=3600)
        trainer = subprocess.Popen(
            [sys.executable, "-c", _KERAS_TRAINER, str(ckpts)],
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert trainer.stdin is not None and trainer.stdout is not None
        try:
            assert trainer.stdout.readline().strip() == "ready"
            d.wait("started")
            d.settle()
            latencies, detection, phases = [], [], []
            for i in range(1, samples + 1):
                trainer.stdin.write("save\n")
                trainer.stdin.flush()
                t0 = float(trainer.stdout.readline())
                pub = d.wait("published", n=i)
                started = d.wait("export_started", n=i)
                latencies.append(ts(pub) - t0)
                detection.append(ts(started) - t0)
                phases.append(pub["durations"])
                log(f"keras #{i}: {latencies[-1]:.2f} s (started after {detection[-1]:.2f} s)")
                d.settle()
            warm_used = all(e["warm"] for e in d.events("exported") + d.events("validated"))
        finally:
            trainer.stdin.close()
            trainer.wait(timeout=60)
            d.stop()
    return {
        "seconds": summary(latencies),
        "detection_seconds": summary(detection),
        "phases": phases,
        "warm_children_used": warm_used,
        "settle_seconds": 5.0,
        "target_seconds": 1.0,
    }


# --- report -------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import importlib.metadata as md

    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "tensorflow": next(
            (md.version(d) for d in ("tensorflow-cpu", "tensorflow") if _installed(d)), "?"
        ),
        "kernel": platform.release(),
    }


def _installed(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
    except md.PackageNotFoundError:
        return False
    return True


#: The latency ratios the project aims at: (model, kind) -> most ratio to the baseline.
RATIO_TARGETS = {
    ("resnet50", "warm_incremental"): 0.10,
    ("resnet50", "warm"): 0.60,
    ("resnet50", "cli"): 1.00,
}


#: The training rows' target: a slowdown under this fraction.
TRAINING_TARGET = 0.05


def _below(target: float, value: float) -> str:
    return f" (target < {100 * target:g} %: {'met' if value < target else 'not met'})"


def _target(target: float | None, value: float) -> str:
    if target is None:
        return ""
    return f" (target <= {target:.2f}: {'met' if value <= target else 'not met'})"


def table(results: dict[str, Any]) -> str:
    rows = [("measure", "value", "vs baseline")]
    for model, r in results.get("latency", {}).items():
        b = r["baseline"]["seconds"]["mean"]
        rows.append(
            (f"{model}: plain script (import, restore, save, reload)", f"{b:.2f} s", "1.00")
        )
        for kind in (*(k for k, _, _ in KINDS), "cli"):
            if kind not in r:
                continue
            s = r[kind]["seconds"]
            label = kind.replace("_", " ") + ("" if kind.endswith("incremental") else ", full")
            what = {
                "cli": "ckpt-exporter export, cold, full (validated)",
                "warm": "daemon warm, full, a model's first export (validated)",
            }.get(kind, f"daemon {label}, checkpoint to published (validated)")
            ratio = r[kind]["ratio_to_baseline"]
            rows.append(
                (
                    f"{model}: {what}",
                    f"{s['mean']:.2f} s (p50 {s['p50']:.2f})",
                    f"{ratio:.2f}{_target(RATIO_TARGETS.get((model, kind)), ratio)}",
                )
            )
        idle = r.get("warm_incremental", {}).get("idle_children")
        if idle:
            rows.append(
                (
                    f"{model}: idle children after exports (kept exporter included): RSS / PSS",
                    f"{idle['rss_bytes'] / 2**20:.0f} / {idle['pss_bytes'] / 2**20:.0f} MiB "
                    f"({idle['count']})",
                    "",
                )
            )
        if model == "small":
            s = r["warm"]["detection_seconds"]
            rows.append(
                (
                    "detection, 1 dir: p50 / p99",
                    f"{s['p50'] * 1e3:.0f} / {s['p99'] * 1e3:.0f} ms",
                    "",
                )
            )
    idle = results.get("idle_detection", {})
    if "detection_200_dirs" in idle:
        s = idle["detection_200_dirs"]["seconds"]
        rows.append(
            (
                "detection, 200 dirs: p50 / p99",
                f"{s['p50'] * 1e3:.0f} / {s['p99'] * 1e3:.0f} ms",
                "",
            )
        )
    for n in (1, 200):
        u = idle.get(f"idle_{n}_models")
        if u:
            rows.append(
                (
                    f"idle supervisor, {n} models: CPU / RSS",
                    f"{u['cpu_percent']:.2f} % / {u['rss_bytes'] / 2**20:.0f} MiB",
                    "",
                )
            )
            rows.append(
                (
                    f"idle warm children, {n} models: RSS / PSS",
                    f"{u['warm_children_rss_bytes'] / 2**20:.0f} / "
                    f"{u['warm_children_pss_bytes'] / 2**20:.0f} MiB",
                    "",
                )
            )
    t = results.get("training")
    if t:
        w, c, b = t["while_exporting"], t["at_cadence"], t["beside_busy_nice19"]
        rows.append(
            (
                "training step while the daemon exports ResNet-50: slowdown",
                f"{100 * w['slowdown']:.1f} %{_below(TRAINING_TARGET, w['slowdown'])}",
                f"{w['median_step_seconds'] * 1e3:.1f} ms vs "
                f"{w['median_step_seconds_idle'] * 1e3:.1f} ms idle; {w['exports']} exports, "
                f"{statistics.fmean(w['export_seconds']):.1f} s and "
                f"{w['daemon_cpu_seconds_per_export']:.1f} s of daemon CPU each",
            )
        )
        rows.append(
            (
                f"training throughput, one ResNet-50 checkpoint every {c['interval_seconds']:g} s:"
                " slowdown",
                f"{100 * c['slowdown']:.1f} %{_below(TRAINING_TARGET, c['slowdown'])}",
                "mean step, against the steps while the daemon is idle",
            )
        )
        rows.append(
            (
                "training step beside a CPU-bound nice-19 process: slowdown",
                f"{100 * b['slowdown']:.1f} %",
                "scale: what any busy low-priority process costs here",
            )
        )
    s = results.get("startup")
    if s:
        full = next(v for k, v in s.items() if k.endswith("_checkpoints"))
        rows.append(
            (
                "startup to first export, empty",
                f"{s['empty']['to_first_export']:.2f} s",
                "1.00",
            )
        )
        rows.append(
            (
                "startup to first export, 10,000 versions + 1,000 checkpoints",
                f"{full['to_first_export']:.2f} s",
                f"{s['ratio_to_empty']:.2f}",
            )
        )
    k = results.get("keras_latency")
    if k:
        s = k["seconds"]
        rows.append(
            (
                "keras: model.save (.keras) to published, warm (validated)",
                f"{s['p50']:.2f} s median (mean {s['mean']:.2f}, max {s['max']:.2f})",
                f"target <= {k['target_seconds']:.1f} s: "
                + ("met" if s["p50"] <= k["target_seconds"] else "not met"),
            )
        )
    if results.get("objectstores"):
        rows += objectstores.table_rows(results["objectstores"])
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


SCENARIOS = ("latency", "idle_detection", "training", "startup", "keras_latency", "objectstores")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="leave out ResNet-50 (and training)")
    p.add_argument("--samples", type=int, default=6, help="checkpoints per latency measure")
    p.add_argument("--out", type=Path, default=BENCH / "results.json")
    args = p.parse_args()

    results: dict[str, Any] = {"machine": machine(), "started": datetime.now().isoformat()}
    runners: dict[str, Callable[[Path], Any]] = {
        "latency": lambda r: scenario_latency(
            r, ["small"] if args.quick else ["small", "resnet50"], args.samples
        ),
        "idle_detection": lambda r: scenario_idle_and_detection(r, 2 * args.samples, 60.0),
        "training": lambda r: scenario_training(r),
        "startup": lambda r: scenario_startup(r, 10_000, 1_000),
        "keras_latency": lambda r: scenario_keras_latency(r, args.samples),
        "objectstores": lambda r: objectstores.scenario_objectstores(r, quick=args.quick),
    }
    with tempfile.TemporaryDirectory(prefix="ckpt-exporter-bench-") as tmp:
        for name in args.only:
            if name == "training" and args.quick:
                continue
            log(f"--- {name}")
            t0 = time.monotonic()
            results[name] = runners[name](Path(tmp))
            log(f"--- {name} took {time.monotonic() - t0:.0f} s")
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nmachine: {json.dumps(results['machine'])}\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
