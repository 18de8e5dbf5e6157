"""The supervisor's handle on a zygote process, and on the children it forks.

The zygote itself (what it imports, how it forks) is
:mod:`daemon.children.zygote`, whose docstring states the protocol spoken
over the socket pair; this module is the supervisor's end of it and imports
nothing from the children.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from daemon.protocol import ZYGOTE

#: Longest a fork request waits for a zygote still importing TensorFlow (it
#: normally takes 3 to 4 s), then for the zygote's answer (milliseconds).
#: The main loop waits meanwhile, so together with the 30 s between two
#: pings they must stay inside systemd's WatchdogSec (60 s); past them the
#: export starts a cold child.
READY_WAIT_SECONDS = 20.0
FORK_TIMEOUT_SECONDS = 5.0


class ForkedProc:
    """A child forked by a zygote, with the part of :class:`subprocess.Popen` the daemon uses.

    The supervisor is not its parent, so it cannot ``waitpid`` it: the
    zygote reaps it and reports the exit code, which :meth:`wait` waits for.
    Like ``Popen``, the PID is the supervisor's to signal until the exit is
    known (the zygote reaps first, so a signal sent in the instant between
    could in principle reach a reused PID; Linux hands PIDs out in order, so
    that needs the whole PID space to wrap around in that instant).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = None  # set by Zygote.fork
        self.returncode: int | None = None
        self._exited = threading.Event()

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode


class Zygote:
    """The supervisor's handle on one zygote process (see the module docstring)."""

    def __init__(self, settings: str, env: dict[str, str] | None = None) -> None:
        self.started = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", ZYGOTE, "--warm", settings],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**(env or os.environ), "CKPT_EXPORTER_ZYGOTE_FD": str(theirs.fileno())},
                # Its own session: Ctrl-C in a terminal reaches only the supervisor.
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        self._sock = ours
        self._ready = threading.Event()
        self._gone = threading.Event()
        # Answers to fork requests: the new child, or the zygote's error text.
        self._replies: queue.Queue[ForkedProc | str] = queue.Queue()
        self._children: dict[int, ForkedProc] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def alive(self) -> bool:
        return not self._gone.is_set() and self.proc.poll() is None

    def fork(self, module: str, settings: str, *, done_w: int | None = None) -> ForkedProc | None:
        """A fresh ``module`` child, forked with ``settings`` (see :func:`_run_child`).

        Waits for the zygote to finish importing TensorFlow (seconds, once
        after it starts; at most :data:`READY_WAIT_SECONDS`) and for its
        answer; None if it is not ready by then, died or did not answer (the
        caller then starts a child from scratch). ``done_w`` is the
        write end of a reusable exporter's done pipe; the caller keeps its own
        copy and closes it.
        """
        if not self._ready.wait(READY_WAIT_SECONDS) or not self.alive():
            return None
        stdin_r, stdin_w = os.pipe()
        fds = [stdin_r] if done_w is None else [stdin_r, done_w]
        request = {"module": module, "settings": settings, "done": done_w is not None}
        try:
            socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
            reply = self._replies.get(timeout=FORK_TIMEOUT_SECONDS)
        except (OSError, queue.Empty):
            os.close(stdin_w)
            self.kill()
            return None
        finally:
            os.close(stdin_r)  # the child has its own copy now (or never will)
        if isinstance(reply, str):  # the zygote refused: "error ..."
            os.close(stdin_w)
            return None
        reply.stdin = os.fdopen(stdin_w, "wb")
        return reply

    def _read(self) -> None:
        """The reader thread: route the zygote's messages; at EOF, end what it left behind."""
        while True:
            try:
                msg = self._sock.recv(4096).decode()
            except OSError:
                msg = ""
            if not msg:
                break
            word, _, rest = msg.partition(" ")
            if word == "ready":
                self._ready.set()
            elif word == "forked":
                # Registered here, before the main thread hears of it, so an
                # exit reported right after cannot find nobody to tell.
                proc = ForkedProc(int(rest))
                with self._lock:
                    self._children[proc.pid] = proc
                self._replies.put(proc)
            elif word == "error":
                self._replies.put(msg)
            elif word == "exit":
                pid, code = (int(x) for x in rest.split())
                with self._lock:
                    gone = self._children.pop(pid, None)
                if gone is not None:
                    gone._set_exit(code)
        self._gone.set()
        self._ready.set()  # wake a fork() waiting for readiness: it sees the zygote gone
        # The zygote is gone: its children got SIGKILL with it (PR_SET_PDEATHSIG).
        with self._lock:
            left, self._children = list(self._children.values()), {}
        for proc in left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc._set_exit(-signal.SIGKILL)
        # Nothing more can come from it: without this close each replaced
        # zygote would leave a descriptor behind in the supervisor.
        self._sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def close(self) -> None:
        """No more forks: the zygote exits once the children it forked have exited."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def kill(self) -> None:
        """Kill the zygote now; the children it forked die with it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
