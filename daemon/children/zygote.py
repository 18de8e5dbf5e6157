"""The zygote: one process with TensorFlow imported that forks fresh children.

Importing TensorFlow costs 2-3 s of CPU. A single-use validator would pay
it for every checkpoint, and on a machine where the trainer leaves a core
idle between steps that CPU is taken from the trainer even at nice 19 (the
benchmark measures it). The zygote pays once: it applies the children's
limits, imports TensorFlow and Keras, then forks a child per request, in
milliseconds. A forked child has loaded no model and no user code (the
zygote never does either), so a validator forked from it is as fresh as
one started from scratch.

Contract:

- Started by :class:`daemon.supervisor.zygote_handle.Zygote` as
  ``python -m daemon.children.zygote --warm SETTINGS`` with its end of the
  socket pair named by ``CKPT_EXPORTER_ZYGOTE_FD``;
  ``SETTINGS`` are a warm child's (``parent_pid``, ``limits``,
  ``allow_gpu``), applied before TensorFlow is imported, so every child it
  forks inherits them (niceness, I/O class, thread caps, GPU visibility).
- It talks to the supervisor over a ``SOCK_SEQPACKET`` socket pair, one
  message per datagram. To the zygote: a JSON fork request ``{"module",
  "settings", "done"}`` carrying file descriptors (the child's stdin and,
  for a reusable exporter, its done pipe). From it: ``ready`` once
  TensorFlow is in; ``forked PID`` or ``error TEXT`` per request; ``exit PID
  CODE`` when a child ends, ``CODE`` as :attr:`subprocess.Popen.returncode`
  (negative: killed by that signal).
- A forked child starts a session of its own (like a cold child: a timeout
  kills its whole group), names itself ``ckpt-worker`` or ``ckpt-validate``
  (``ps``, ``top``), and then runs the module's ``run`` with the argv
  ``MODULE --warm SETTINGS [--done-fd N]`` (see :func:`daemon.children.runtime.begin`):
  it dies with the zygote, which dies with the supervisor
  (``PR_SET_PDEATHSIG``).
- EOF from the supervisor means "no more forks": the zygote exits once its
  last child has exited and been reported. So a zygote replaced after a
  config reload lets the exports it forked finish.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from typing import NoReturn

from daemon import exitcodes
from daemon.children import runtime
from daemon.protocol import CHILD_NAMES, ForkRequest, WarmSettings

ZYGOTE_NAME = "ckpt-zygote"
_PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Set this process's name as ``ps`` and ``top`` show it (Linux; ignored elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "--warm":
        print(
            "usage: python -m daemon.children.zygote --warm SETTINGS (started by the daemon)",
            file=sys.stderr,
        )
        return exitcodes.SOFTWARE
    settings: WarmSettings = json.loads(argv[2])
    sock = socket.socket(fileno=int(os.environ.pop("CKPT_EXPORTER_ZYGOTE_FD")))
    runtime.die_with_parent(int(settings["parent_pid"]))
    set_process_name(ZYGOTE_NAME)
    runtime.prepare_from_request(settings, allow_gpu=bool(settings.get("allow_gpu")))
    # What every child needs, imported once. No model is built, no user
    # module imported: that is what makes a forked validator fresh.
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    from daemon.children import (
        validator,  # noqa: F401
        worker,  # noqa: F401
    )

    # Move everything imported so far out of the collector's reach: a child's
    # collections would otherwise walk (and write to: the GC header is in
    # each object) hundreds of thousands of objects shared with this
    # process, copying their pages on write. Measured on a forked ResNet-50
    # validation: 0.2 s less CPU and 60 MiB fewer copied pages per child.
    gc.collect()
    gc.freeze()
    # SIGCHLD wakes the loop through a pipe, so an exit is reported at once
    # (the supervisor waits for it to read the result).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    sock.send(b"ready")
    children: set[int] = set()
    accepting = True
    while accepting or children:
        watch = [sock.fileno(), wake_r] if accepting else [wake_r]
        readable, _, _ = select.select(watch, [], [], 5.0)
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                _send(sock, f"exit {pid} {code}")
        if sock.fileno() in readable:
            try:
                data, fds, _, _ = socket.recv_fds(sock, 65536, 4)
            except OSError:
                data, fds = b"", []
            if not data:
                accepting = False  # the supervisor said "no more" or is gone
                continue
            try:
                pid = _fork(json.loads(data), fds, sock, (wake_r, wake_w))
            except (OSError, ValueError) as e:
                _send(sock, f"error {e}")
            else:
                children.add(pid)
                _send(sock, f"forked {pid}")
            finally:
                for fd in fds:
                    os.close(fd)
    return exitcodes.OK


def _send(sock: socket.socket, msg: str) -> None:
    # The supervisor may be gone (then we are about to be killed too).
    with contextlib.suppress(OSError):
        sock.send(msg.encode())


def _fork(request: ForkRequest, fds: list[int], sock: socket.socket, wake: tuple[int, int]) -> int:
    module = str(request.get("module"))
    settings: WarmSettings = json.loads(str(request.get("settings")))
    if module not in CHILD_NAMES or len(fds) != (2 if request.get("done") else 1):
        raise ValueError(f"bad fork request {request!r} with {len(fds)} descriptors")
    # The zygote is the child's parent: the child must die with the zygote
    # (runtime.die_with_parent checks that its parent is still this one).
    settings["parent_pid"] = os.getpid()
    # The answer "forked PID" must not go out before the child has its own
    # session: the supervisor may killpg(PID) at once, and until setsid()
    # there is no such group. The child closes its end of this pipe once
    # set up (or dies): either way the read below returns.
    sync_r, sync_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(sync_r)
        _run_child(module, settings, fds, sock, (*wake, sync_w))
    os.close(sync_w)
    os.read(sync_r, 1)
    os.close(sync_r)
    return pid


def _run_child(
    module: str,
    settings: WarmSettings,
    fds: list[int],
    sock: socket.socket,
    close: tuple[int, ...],
) -> NoReturn:
    """In the forked child: become a warm ``module`` child; never returns.

    ``close`` holds the zygote's own descriptors, the last one the pipe
    whose closing tells the zygote that this child is set up: in its own
    session, named, and at its niceness.
    """
    code = exitcodes.SOFTWARE
    try:
        os.setsid()  # its own group, so that a timeout's killpg takes what it started
        set_process_name(CHILD_NAMES[module])
        # A new session is a new autogroup, at niceness 0 again; the rest of
        # the limits (niceness, I/O class, environment) came with the fork.
        runtime.set_autogroup_nice(int((settings.get("limits") or {}).get("nice", 0)))
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in close:
            os.close(fd)
        os.dup2(fds[0], 0)
        os.close(fds[0])
        argv = [module, "--warm", json.dumps(settings, sort_keys=True)]
        if len(fds) == 2:
            argv += ["--done-fd", str(fds[1])]
        sys.argv = argv
        importlib.import_module(module).run(argv)  # ends the process itself
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else exitcodes.SOFTWARE
    except BaseException:
        traceback.print_exc()
    runtime.exit_now(code)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
