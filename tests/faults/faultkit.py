"""Shared helpers for the fault suite: real daemons, real children, real signals, real files.

Deliberately not a ``conftest.py``: ``tests/conftest.py`` is imported as the
module ``conftest`` (the other test files do ``from conftest import ...``), and a
second ``conftest.py`` without ``__init__.py`` would replace it in
``sys.modules``. The test modules import this one as ``faultkit`` (pytest puts
this folder on ``sys.path``) and the shared trainer and config helpers from
``conftest``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import child_env

from daemon.basepath.catalog import read_metadata
from daemon.basepath.layout import METADATA_RELPATH, STATE_DIRNAME, TEMP_PREFIX
from daemon.protocol import CHILD_NAMES
from daemon.supervisor.warm_pool import warm_children_of

HERE = Path(__file__).resolve().parent
READER = HERE / "serving_reader.py"

Event = dict[str, Any]


# --- processes --------------------------------------------------------------


def drop_dac_capabilities() -> None:
    """``preexec_fn``: make a root child subject to file permissions, like any user.

    Removes CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    the program exec'd next (and its children) run as uid 0 without them: a
    ``chmod 000`` folder is then as closed to it as to the daemon's user in
    production. Simpler than switching to ``nobody``, which cannot even run
    the interpreter when it lives under ``/root``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


class LiveDaemon:
    """``ckpt-exporter run`` as a real process whose JSON log is followed incrementally."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self._offset = log_path.stat().st_size
        self._partial = b""
        self._events: list[Event] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--config", str(config)],
            env=child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
        self.pid = self.proc.pid

    def events(self) -> list[Event]:
        """Every JSON event this daemon has logged so far (reads only what is new)."""
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    self._events.append(json.loads(line))
        return self._events

    def named(self, name: str, **match: Any) -> list[Event]:
        return [
            e
            for e in self.events()
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    def count(self, name: str, **match: Any) -> int:
        return len(self.named(name, **match))

    def wait_for(
        self,
        pred: Callable[[list[Event]], Any],
        timeout: float = 120,
        what: str = "condition",
        poll: float = 0.05,
    ) -> Any:
        """Wait until ``pred(events)`` is truthy and return its value."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.events()
            got = pred(ev)
            if got:
                return got
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(poll)

    def wait_event(
        self, name: str, n: int = 1, timeout: float = 120, poll: float = 0.05, **match: Any
    ) -> Event:
        """The ``n``-th event called ``name`` (with the given fields), once it is logged."""
        found: list[Event] = self.wait_for(
            lambda _ev: len(self.named(name, **match)) >= n and self.named(name, **match),
            timeout=timeout,
            what=f"{n} x {name} {match or ''}",
            poll=poll,
        )
        return found[n - 1]

    def tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def metrics(self) -> str:
        address = self.wait_event("metrics_listening")["address"]
        port = int(address.rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body: str = r.read().decode()
        return body

    def metric(self, name: str, **labels: str) -> float | None:
        return metric_value(self.metrics(), name, **labels)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        assert m, status
        return int(m.group(1))

    def cpu_seconds(self) -> float:
        """User plus system CPU time the daemon process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """One sample of the Prometheus exposition ``text``, or None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def proc_cmdlines() -> dict[int, str]:
    """Every process's command line, NUL bytes turned into spaces."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            raw = (entry / "cmdline").read_bytes()
            if raw:
                out[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out


def children_of_base(base: Path, module: str | None = None) -> list[int]:
    """PIDs of worker/validator children working for ``base``.

    A cold child names its module and its request (under the base path's
    staging) on its command line; a child forked by a zygote shows the
    zygote's command line but names its role in /proc/PID/comm, learns its
    request on stdin and points its stdout at the job's log in the same
    staging folder. Both show in /proc.
    """
    staging = str(base / STATE_DIRNAME / "staging")
    mods = [module] if module else ["daemon.children.worker", "daemon.children.validator"]
    pids = []
    for pid, cmd in proc_cmdlines().items():
        comm = ""
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        if not any(f"-m {m} " in cmd or comm == CHILD_NAMES[m] for m in mods):
            continue
        with contextlib.suppress(OSError):
            if staging in cmd or os.readlink(f"/proc/{pid}/fd/1").startswith(staging):
                pids.append(pid)
    return sorted(pids)


def wait_children_gone(base: Path, daemon_pid: int, timeout: float = 15) -> None:
    """Children of a killed daemon die with it (PR_SET_PDEATHSIG); wait for that."""
    deadline = time.monotonic() + timeout

    def left() -> list[int]:
        return children_of_base(base) + warm_children_of(daemon_pid)

    while left():
        assert time.monotonic() < deadline, f"orphaned children: {left()}"
        time.sleep(0.05)


def wait_children(base: Path, module: str, timeout: float = 60) -> list[int]:
    """The ``module`` children working for ``base``, once there is at least one."""
    deadline = time.monotonic() + timeout
    while True:
        pids = children_of_base(base, module)
        if pids:
            return pids
        assert time.monotonic() < deadline, f"no {module} child for {base}"
        time.sleep(0.02)


# --- the base path ------------------------------------------------------------


def temp_dirs(base: Path) -> list[str]:
    if not base.exists():
        return []
    return sorted(p.name for p in base.iterdir() if p.name.startswith(TEMP_PREFIX))


def state_children(base: Path, sub: str) -> list[str]:
    d = base / STATE_DIRNAME / sub
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def fingerprint_of(meta: dict[str, Any] | None) -> str:
    assert meta is not None
    return str(meta["checkpoint"]["fingerprint"])


def metadata(version_dir: Path) -> dict[str, Any]:
    meta = read_metadata(version_dir)
    assert meta is not None, f"{version_dir / METADATA_RELPATH} missing or unreadable"
    return meta


def tree_digest(path: Path) -> dict[str, Any]:
    """Everything about a tree that 'modified or deleted' could touch (no following links)."""
    out: dict[str, Any] = {}
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in sorted(dirs + files):
            p = Path(root) / name
            st = p.lstat()
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_file():
                out[str(p)] = ("file", p.read_bytes(), st.st_mtime_ns, st.st_mode)
            else:
                out[str(p)] = ("dir", st.st_mode)
    return out


# --- the stand-in for TF Serving ----------------------------------------------


class ServingReader:
    """``serving_reader.py`` in a subprocess: lists the base path and loads each new version."""

    def __init__(self, base: Path, out: Path) -> None:
        self.out = out
        self.stop_file = out.with_suffix(".stop")
        self.proc = subprocess.Popen(
            [sys.executable, str(READER), str(base), str(out), str(self.stop_file)],
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=out.with_suffix(".stderr").open("wb"),
        )
        deadline = time.monotonic() + 120
        while not self.records(ready=True):
            assert self.proc.poll() is None, out.with_suffix(".stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "the serving reader did not start"
            time.sleep(0.1)

    def records(self, ready: bool = False) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        rows = [json.loads(ln) for ln in self.out.read_text().splitlines() if ln.endswith("}")]
        return [r for r in rows if r.get("ready")] if ready else [r for r in rows if "version" in r]

    def wait_seen(self, version: int, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for r in self.records():
                if r["version"] == version:
                    return r
            assert self.proc.poll() is None, "the serving reader died"
            assert time.monotonic() < deadline, f"the serving reader never saw version {version}"
            time.sleep(0.1)

    def stop(self) -> list[dict[str, Any]]:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.returncode == 0, self.out.with_suffix(".stderr").read_text()[-3000:]
        return self.records()


# --- clean-up ------------------------------------------------------------------


class Kit:
    """What one fault test started or changed, undone at the end whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemons: list[LiveDaemon] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.readers: list[ServingReader] = []
        self.mounts: list[Path] = []
        self.opened: list[Path] = []  # chmod'ed folders to open again

    def daemon(
        self, config: Path, name: str = "daemon", *, preexec_fn: Callable[[], None] | None = None
    ) -> LiveDaemon:
        d = LiveDaemon(config, self.tmp / f"{name}.log", preexec_fn=preexec_fn)
        self.daemons.append(d)
        return d

    def reader(self, base: Path, name: str = "reader") -> ServingReader:
        r = ServingReader(base, self.tmp / f"{name}.jsonl")
        self.readers.append(r)
        return r

    def chmod(self, path: Path, mode: int) -> None:
        path.chmod(mode)
        self.opened.append(path)

    def close(self) -> None:
        for d in self.daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for r in self.readers:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
        for path in self.opened:
            with contextlib.suppress(OSError):
                path.chmod(0o755)
        for m in self.mounts:
            subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)


@contextlib.contextmanager
def kit_for(tmp: Path) -> Iterator[Kit]:
    k = Kit(tmp)
    try:
        yield k
    finally:
        k.close()


def copy_checkpoint(src_dir: Path, prefix: str, dst_dir: Path) -> None:
    """Copy one checkpoint's files (keeping their mtimes, so write order is kept)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(src_dir.glob(prefix + ".*")):
        shutil.copy2(p, dst_dir / p.name)
