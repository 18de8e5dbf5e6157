"""Warm children: worker and validator processes started ahead of time.

Importing TensorFlow takes seconds; a warm child pays for it while the
daemon is idle, so an export starts with TensorFlow already loaded.

Contract:

- The pool keeps at most one ready child per module (``daemon.worker``,
  ``daemon.validate``), so the memory of idle warm children is bounded by two
  TensorFlow processes; :meth:`WarmPool.rss_bytes` reports it.
- A warm child is **single-use**: it imports TensorFlow (and Keras) but no
  user code and no model before it is handed a request, runs that one
  request and exits. So a validator has never loaded another model or the
  user's builder, and an exporter never carries one export's state into the
  next.
- The child learns its request by one line on stdin (the request path);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The modules whose children can be started warm.
WARM_MODULES = ("daemon.worker", "daemon.validate")


@dataclass
class WarmChild:
    """A started child waiting for its request on stdin."""

    module: str
    proc: subprocess.Popen[bytes]
    settings: str  # the JSON it was started with: limits, GPU, parent

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand(self, request_path: str) -> subprocess.Popen[bytes]:
        """Give the child its request; it now belongs to the caller."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(request_path.encode() + b"\n")
        self.proc.stdin.close()
        return self.proc


def warm_command(module: str, settings: str) -> list[str]:
    return [sys.executable, "-m", module, "--warm", settings]


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
    """One ready child per module; see the module docstring."""

    def __init__(self, *, enabled: bool, env: dict[str, str] | None = None) -> None:
        self.enabled = enabled
        self.env = env
        self.children: dict[str, WarmChild] = {}

    @staticmethod
    def settings(module: str, limits: dict[str, Any], allow_gpu: bool) -> str:
        # The validator never sees a GPU (see daemon.validate).
        gpu = allow_gpu and module == "daemon.worker"
        return json.dumps(
            {"parent_pid": os.getpid(), "limits": limits, "allow_gpu": gpu}, sort_keys=True
        )

    def take(self, module: str, settings: str) -> WarmChild | None:
        """The ready child for ``module`` started with ``settings``, or None."""
        child = self.children.pop(module, None)
        if child is None:
            return None
        if child.alive() and child.settings == settings:
            return child
        _stop(child)
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
                _stop(child)
            proc = subprocess.Popen(
                warm_command(module, settings),
                stdin=subprocess.PIPE,
                # Until it has a request there is nowhere useful to write;
                # with a request the child points its output at the job's log.
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self.env,
                # Its own process group, like a cold child: a timeout kills
                # everything it started, and Ctrl-C reaches only the supervisor.
                start_new_session=True,
            )
            self.children[module] = WarmChild(module, proc, settings)
            started.append(module)
        return started

    def rss_bytes(self) -> int:
        """Resident memory of the waiting children, from ``/proc`` (0 where unreadable)."""
        total = 0
        for child in self.children.values():
            total += _rss(child.proc.pid)
        return total

    def close(self) -> None:
        """Stop every waiting child (EOF on stdin, then a kill if it lingers)."""
        for child in self.children.values():
            _stop(child)
        self.children.clear()


def _stop(child: WarmChild) -> None:
    # EOF tells a child that finished importing to exit; one still importing
    # TensorFlow would take seconds to notice, so kill it outright.
    with contextlib.suppress(OSError, ValueError):
        if child.proc.stdin is not None:
            child.proc.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.proc.wait(timeout=10)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
