"""Warm children: export workers and validators with TensorFlow already imported.

Importing TensorFlow takes seconds of CPU; warm children do not pay it per
export.

Contract:

- Fresh children are forked from a *zygote* (:mod:`daemon.children.zygote`), a
  process that imported TensorFlow and Keras under the children's limits
  and does nothing else: no user code, no model. The pool keeps one zygote
  per set of limits (one with the default config; two when the export
  worker may see the GPU and the validator may not), started ahead of
  time, and forks a child from it when an export or a validation starts.
- A validator never loads the user's builder. It may be handed its request
  while the export is still running (``hand(..., then_go=True)``), and
  proceeds past the preparation it can do early on :meth:`WarmChild.go`.
  Started with ``max_exports > 1`` it may validate more exports *of the same
  graph*: the supervisor keeps it under the model's graph key after a
  success, as it keeps exporters (below), and it keeps the session of the
  graph it passed only where reloading that graph would do nothing but
  restore the variables (:mod:`daemon.children.validator`). Otherwise it is
  single-use: it runs one request and exits.
- An exporter started with ``max_exports > 1`` may serve more exports *of
  the same model*: after a successful export it says ``done`` on a pipe of
  its own and waits for the next request instead of exiting; the pool then
  *keeps* it under its exporter key (a digest of the model's export
  settings, see the supervisor). Only a request with the same key is handed
  to it, so it restores the next checkpoint into the model it already built
  (:mod:`daemon.children.worker`). It is retired after ``max_exports`` exports (it
  exits by itself), after ``idle_seconds`` without work, when a source file
  of the code it imported changed on disk (:func:`code_changed`), when its
  limits no longer match the config, and beyond ``limit`` kept exporters
  (the longest idle goes first). A failed export always ends the process.
- Memory of idle children is therefore bounded: the zygotes plus at most
  ``limit`` kept exporters and as many kept validators (the supervisor
  passes its ``concurrency``, the number that can be busy at once anyway);
  :meth:`WarmPool.rss_bytes` reports it. A forked child shares the
  zygote's pages until it writes them.
- The child learns each request by one line on stdin (the request path);
  EOF means "exit without work". Limits (nice, I/O class, threads, GPU
  visibility) are fixed when the zygote starts, before TensorFlow is
  imported, so a zygote whose limits no longer match the config is
  replaced (the one replaced lives on until the children it forked exit).
- A zygote that died or does not answer is replaced at the next refill and
  the caller starts a cold child meanwhile: the pool only ever saves time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeAlias

from daemon.protocol import DONE, VALIDATOR, WORKER, Limits
from daemon.supervisor.zygote_handle import ForkedProc, Zygote

#: A child process, started by the daemon or forked by a zygote.
Proc: TypeAlias = "subprocess.Popen[bytes] | ForkedProc"

#: The modules whose children can be started warm.
WARM_MODULES = (WORKER, VALIDATOR)
#: A zygote that exits sooner than this after it started (TensorFlow cannot
#: be imported, say) is started again only after a wait: the first, doubled
#: for each such exit in a row, up to the longest. Each start costs seconds of
#: CPU, taken from the trainer.
ZYGOTE_QUICK_EXIT_SECONDS = 60.0
ZYGOTE_BACKOFF_SECONDS = (5.0, 300.0)


@dataclass
class WarmChild:
    """A started child waiting for its request on stdin."""

    module: str
    proc: Proc
    settings: str  # the JSON it was started with: limits, GPU, parent, max_exports
    #: Read end of the pipe on which a reusable exporter says ``done``; None: single-use.
    done: IO[bytes] | None = None
    #: Set once kept: the code files it imported (path -> [mtime_ns, size]).
    code_files: dict[str, list[int]] = field(default_factory=dict)
    exports: int = 0  # requests handed so far
    idle_since: float = 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand(self, request_path: str, *, then_go: bool = False) -> Proc:
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
        if self.done is None:
            self.proc.stdin.close()
        else:
            self.proc.stdin.flush()

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
    """PIDs of the zygotes of ``parent_pid`` and the children they forked, from /proc.

    For observers outside the pool (the fault tests, the benchmarks): a
    forked child shows its zygote's command line, ``--warm`` settings included.
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
    """Zygotes that fork fresh children, and kept exporters; see the module docstring."""

    def __init__(self, *, enabled: bool, env: dict[str, str] | None = None) -> None:
        self.enabled = enabled
        self.env = env
        self.zygotes: dict[str, Zygote] = {}  # zygote settings -> zygote
        self.retiring: list[Zygote] = []  # replaced; exit once their children have
        #: Zygote settings -> (quick exits in a row, no new zygote before this monotonic time).
        self._backoff: dict[str, tuple[int, float]] = {}
        self._exits: list[dict[str, Any]] = []  # zygotes found dead, for take_exits()
        self.kept: dict[str, WarmChild] = {}  # exporter key -> exporter waiting for its model

    @staticmethod
    def settings(module: str, limits: Limits, allow_gpu: bool, max_exports: int = 1) -> str:
        # The validator never sees a GPU (see daemon.children.validator).
        worker = module == WORKER
        return json.dumps(
            {
                "parent_pid": os.getpid(),
                "limits": limits,
                "allow_gpu": allow_gpu and worker,
                "max_exports": max_exports,
            },
            sort_keys=True,
        )

    @staticmethod
    def zygote_settings(settings: str) -> str:
        """The part of a child's ``settings`` fixed in its zygote: all but ``max_exports``."""
        data = json.loads(settings)
        data.pop("max_exports", None)
        return json.dumps(data, sort_keys=True)

    def take(self, module: str, settings: str) -> WarmChild | None:
        """A fresh ``module`` child with ``settings``, forked now; None without a live zygote.

        Waits while the zygote is still importing TensorFlow (once, seconds
        after it started; at most ``READY_WAIT_SECONDS``): the import it
        finishes is the one a cold child would start from the beginning.
        """
        zygote = self.zygotes.get(self.zygote_settings(settings))
        if zygote is None or not zygote.alive():
            return None
        done_r = done_w = None
        if json.loads(settings).get("max_exports", 1) > 1:
            # A pipe of its own: the child's stdout and stderr go to each
            # job's log, so "done" cannot travel on them.
            done_r, done_w = os.pipe()
        try:
            proc = zygote.fork(module, settings, done_w=done_w)
        finally:
            # The child holds the write end now; closing ours means the read
            # ends with EOF as soon as the child is gone.
            if done_w is not None:
                os.close(done_w)
        if proc is None:
            if done_r is not None:
                os.close(done_r)
            return None
        done = None if done_r is None else os.fdopen(done_r, "rb", buffering=0)
        return WarmChild(module, proc, settings, done=done)

    def refill(self, settings_for: dict[str, str]) -> list[Zygote]:
        """Have a live zygote for each module's settings; returns the zygotes started.

        ``settings_for`` maps each module to the settings its children must
        have now. A dead zygote is replaced, after a backoff if it exited
        soon after it started (see ``ZYGOTE_BACKOFF_SECONDS``; children start
        cold meanwhile) and reported by :meth:`take_exits`; one whose settings
        no longer serve any module (the config was reloaded) is told to exit
        once the children it forked have.
        """
        if not self.enabled:
            return []
        wanted = {self.zygote_settings(s) for s in settings_for.values()}
        for key in [k for k in self.zygotes if k not in wanted]:
            old = self.zygotes.pop(key)
            old.close()
            self.retiring.append(old)
        self.retiring = [z for z in self.retiring if z.alive()]
        started = []
        for key in sorted(wanted):
            zygote = self.zygotes.get(key)
            if zygote is not None and zygote.alive():
                continue
            now = time.monotonic()
            if zygote is not None:
                del self.zygotes[key]
                zygote.kill()  # reaps it
                quick = now - zygote.started < ZYGOTE_QUICK_EXIT_SECONDS
                n = self._backoff.get(key, (0, 0.0))[0] + 1 if quick else 0
                first, longest = ZYGOTE_BACKOFF_SECONDS
                wait = min(first * 2 ** (n - 1), longest) if n else 0.0
                self._backoff[key] = (n, now + wait)
                self._exits.append(
                    {"pid": zygote.proc.pid, "code": zygote.proc.returncode, "retry_in": wait}
                )
            if now < self._backoff.get(key, (0, 0.0))[1]:
                continue
            self.zygotes[key] = Zygote(key, self.env)
            started.append(self.zygotes[key])
        return started

    def take_exits(self) -> list[dict[str, Any]]:
        """The zygotes found dead since the last call: ``pid``, exit ``code``, ``retry_in`` s."""
        exits, self._exits = self._exits, []
        return exits

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
        while len(same := [k for k, c in self.kept.items() if c.module == child.module]) > max(
            0, limit
        ):
            oldest = min(same, key=lambda k: self.kept[k].idle_since)
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
        """Resident memory of the zygotes and kept exporters (0 where unreadable).

        A sum of RSS counts the pages a kept exporter still shares with its
        zygote twice: an upper bound.
        """
        pids = [z.proc.pid for z in self.zygotes.values() if z.alive()]
        pids += [c.proc.pid for c in self.kept.values()]
        return sum(_rss(pid) for pid in pids)

    def close(self) -> None:
        """Stop the kept exporters and the zygotes (a child they forked dies with them)."""
        for child in self.kept.values():
            stop(child)
        self.kept.clear()
        for zygote in (*self.zygotes.values(), *self.retiring):
            zygote.kill()
        self.zygotes.clear()
        self.retiring.clear()


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
