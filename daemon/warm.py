"""Warm children: worker and validator processes started ahead of time.

Importing TensorFlow takes seconds; a warm child pays for it while the
daemon is idle, so an export starts with TensorFlow already loaded.

Contract:

- The pool keeps at most one *fresh* child per module (``daemon.worker``,
  ``daemon.validate``): TensorFlow (and Keras) imported, no user code, no
  model.
- A validator is **single-use**: it runs one request and exits, so it has
  never loaded another model or the user's builder. It may be handed its
  request while the export is still running (``hand(..., then_go=True)``),
  and proceeds past the preparation it can do early on :meth:`WarmChild.go`.
- An exporter started with ``max_exports > 1`` may serve more exports *of
  the same model*: after a successful export it says ``done`` on a pipe of
  its own and waits for the next request instead of exiting; the pool then
  *keeps* it under its exporter key (a digest of the model's export
  settings, see the supervisor). Only a request with the same key is handed
  to it, so it restores the next checkpoint into the model it already built
  (:mod:`daemon.worker`). It is retired after ``max_exports`` exports (it
  exits by itself), after ``idle_seconds`` without work, when a source file
  of the code it imported changed on disk (:func:`code_changed`), when its
  limits no longer match the config, and beyond ``limit`` kept exporters
  (the longest idle goes first). A failed export always ends the process.
- Memory of idle children is therefore bounded: two fresh TensorFlow
  processes plus at most ``limit`` kept exporters (the supervisor passes its
  ``concurrency``, the number that can be busy at once anyway);
  :meth:`WarmPool.rss_bytes` reports it.
- The child learns each request by one line on stdin (the request path);
  EOF means "exit without work". Its priority and limits (nice, I/O class,
  threads, GPU visibility) are fixed at start, before TensorFlow is
  imported, so a child whose limits no longer match the config is replaced.
- A warm child that died while waiting (out of memory, killed) is dropped
  and the caller starts a cold one: the pool only ever saves time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from daemon.child import DONE

#: The modules whose children can be started warm.
WARM_MODULES = ("daemon.worker", "daemon.validate")


@dataclass
class WarmChild:
    """A started child waiting for its request on stdin."""

    module: str
    proc: subprocess.Popen[bytes]
    settings: str  # the JSON it was started with: limits, GPU, parent, max_exports
    #: Read end of the pipe on which a reusable exporter says ``done``; None: single-use.
    done: IO[bytes] | None = None
    #: Set once kept: the code files it imported (path -> [mtime_ns, size]).
    code_files: dict[str, list[int]] = field(default_factory=dict)
    exports: int = 0  # requests handed so far
    idle_since: float = 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand(self, request_path: str, *, then_go: bool = False) -> subprocess.Popen[bytes]:
        """Give the child a request; until it is done it belongs to the caller.

        A single-use child gets EOF right after the line, so it exits even if
        the supervisor dies before closing the pipe; with ``then_go`` stdin
        stays open until :meth:`go` (a validator started with the export).
        """
        assert self.proc.stdin is not None
        self.proc.stdin.write(request_path.encode() + b"\n")
        if self.done is None and not then_go:
            self.proc.stdin.close()
        else:
            self.proc.stdin.flush()
        self.exports += 1
        return self.proc

    def go(self) -> None:
        """Tell a child handed its request with ``then_go`` to proceed (OSError if it died)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def wait_done(self) -> bool:
        """Block until the handed request is finished; True if the child stays for another.

        Runs in a waiting thread. A reusable exporter that exits (its last
        export, a failure, a crash) closes the pipe, which ends the read.
        """
        if self.done is not None:
            try:
                if self.done.readline() == DONE:
                    return True
            except (OSError, ValueError):
                pass  # closed by the pool meanwhile: the process is being stopped
        self.proc.wait()
        return False


def warm_command(module: str, settings: str, done_fd: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", module, "--warm", settings]
    if done_fd is not None:
        argv += ["--done-fd", str(done_fd)]
    return argv


def code_changed(files: Mapping[str, list[int]]) -> str | None:
    """The first of ``files`` whose modification time or size differs now (or that is gone).

    ``files`` maps each source file a kept exporter imported to the
    ``[st_mtime_ns, st_size]`` it had then; an exporter running code that is
    no longer on disk must not export (the next export would not be what a
    fresh process makes). Python's own ``.pyc`` check uses the same pair.
    """
    for path, (mtime_ns, size) in files.items():
        try:
            st = os.stat(path)
        except OSError:
            return path
        if st.st_mtime_ns != mtime_ns or st.st_size != size:
            return path
    return None


def warm_children_of(parent_pid: int) -> list[int]:
    """PIDs of the processes started by :func:`warm_command` for ``parent_pid``, from /proc.

    For observers outside the pool (the fault tests, the benchmarks): a warm
    child that was handed work still carries its ``--warm`` settings.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError, AttributeError):
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
            settings = json.loads(argv[argv.index("--warm") + 1])
            if settings.get("parent_pid") == parent_pid:
                pids.append(int(entry.name))
    return sorted(pids)


class WarmPool:
    """One fresh child per module, and kept exporters; see the module docstring."""

    def __init__(self, *, enabled: bool, env: dict[str, str] | None = None) -> None:
        self.enabled = enabled
        self.env = env
        self.children: dict[str, WarmChild] = {}
        self.kept: dict[str, WarmChild] = {}  # exporter key -> exporter waiting for its model

    @staticmethod
    def settings(module: str, limits: dict[str, Any], allow_gpu: bool, max_exports: int = 1) -> str:
        # The validator never sees a GPU (see daemon.validate) and is single-use.
        worker = module == "daemon.worker"
        return json.dumps(
            {
                "parent_pid": os.getpid(),
                "limits": limits,
                "allow_gpu": allow_gpu and worker,
                "max_exports": max_exports if worker else 1,
            },
            sort_keys=True,
        )

    def take(self, module: str, settings: str) -> WarmChild | None:
        """The ready child for ``module`` started with ``settings``, or None."""
        child = self.children.pop(module, None)
        if child is None:
            return None
        if child.alive() and child.settings == settings:
            return child
        stop(child)
        return None

    def refill(self, settings_for: dict[str, str]) -> list[str]:
        """Start a child for every module that has none; returns the modules started.

        ``settings_for`` maps each module to the settings it must have now; a
        waiting child with other settings (the config was reloaded) or a dead
        one is replaced.
        """
        if not self.enabled:
            return []
        started = []
        for module, settings in settings_for.items():
            child = self.children.get(module)
            if child is not None and child.alive() and child.settings == settings:
                continue
            if child is not None:
                stop(child)
            self.children[module] = self._start(module, settings)
            started.append(module)
        return started

    def _start(self, module: str, settings: str) -> WarmChild:
        done_r = done_w = None
        if json.loads(settings).get("max_exports", 1) > 1:
            # A pipe of its own: the child's stdout and stderr go to each
            # job's log, so "done" cannot travel on them.
            done_r, done_w = os.pipe()
        try:
            proc = subprocess.Popen(
                warm_command(module, settings, done_w),
                stdin=subprocess.PIPE,
                # Until it has a request there is nowhere useful to write;
                # with a request the child points its output at the job's log.
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self.env,
                # Its own process group, like a cold child: a timeout kills
                # everything it started, and Ctrl-C reaches only the supervisor.
                start_new_session=True,
                pass_fds=() if done_w is None else (done_w,),
            )
        finally:
            # The child holds the write end now; closing ours means the read
            # ends with EOF as soon as the child is gone.
            if done_w is not None:
                os.close(done_w)
        done = None if done_r is None else os.fdopen(done_r, "rb", buffering=0)
        return WarmChild(module, proc, settings, done=done)

    # --- kept exporters -----------------------------------------------------

    def keep(
        self, child: WarmChild, key: str, code_files: Mapping[str, list[int]], limit: int
    ) -> list[WarmChild]:
        """File an exporter that finished an export under ``key``; returns those evicted.

        Beyond ``limit`` kept exporters the one idle longest is stopped.
        """
        child.code_files = dict(code_files)
        child.idle_since = time.monotonic()
        previous = self.kept.pop(key, None)
        evicted = [] if previous is None or previous is child else [previous]
        self.kept[key] = child
        while len(self.kept) > max(0, limit):
            oldest = min(self.kept, key=lambda k: self.kept[k].idle_since)
            evicted.append(self.kept.pop(oldest))
        for c in evicted:
            stop(c)
        return evicted

    def take_kept(
        self, key: str, settings: str
    ) -> tuple[WarmChild | None, tuple[WarmChild, str] | None]:
        """``(exporter kept for key, None)``, or ``(None, (the one retired, why))``.

        Retired (stopped) instead of handed out: one that died, one started
        with other limits, one whose imported code changed on disk. ``(None,
        None)`` when none is kept for ``key``.
        """
        child = self.kept.pop(key, None)
        if child is None:
            return None, None
        why = None
        if not child.alive():
            why = "exited"
        elif child.settings != settings:
            why = "config_changed"
        elif (path := code_changed(child.code_files)) is not None:
            why = f"code_changed: {path}"
        if why is None:
            return child, None
        stop(child)
        return None, (child, why)

    def retire(self, key: str | None = None) -> list[WarmChild]:
        """Stop the exporter kept for ``key`` (None: every kept exporter); returns them."""
        keys = list(self.kept) if key is None else [key]
        gone = [self.kept.pop(k) for k in keys if k in self.kept]
        for c in gone:
            stop(c)
        return gone

    def expire(self, idle_seconds: float) -> list[WarmChild]:
        """Stop the kept exporters idle for more than ``idle_seconds``; returns them."""
        now = time.monotonic()
        old = [k for k, c in self.kept.items() if now - c.idle_since > idle_seconds]
        return [c for k in old for c in self.retire(k)]

    # --- accounting -----------------------------------------------------------

    def rss_bytes(self) -> int:
        """Resident memory of the waiting children, kept exporters included (0 where unreadable)."""
        total = 0
        for child in (*self.children.values(), *self.kept.values()):
            total += _rss(child.proc.pid)
        return total

    def close(self) -> None:
        """Stop every waiting child (EOF on stdin, then a kill if it lingers)."""
        for child in (*self.children.values(), *self.kept.values()):
            stop(child)
        self.children.clear()
        self.kept.clear()


def stop(child: WarmChild) -> None:
    """Stop ``child`` now, waiting or busy."""
    # EOF tells a child that finished importing to exit; one still importing
    # TensorFlow would take seconds to notice, so kill it outright.
    with contextlib.suppress(OSError, ValueError):
        if child.proc.stdin is not None:
            child.proc.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.proc.wait(timeout=10)
    # Closing the read end here would race a waiting thread's readline; the
    # file is closed when the child object goes (EOF already came with the kill).


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
