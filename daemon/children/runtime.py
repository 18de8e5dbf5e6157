"""What every child process does first and last: limits, its request, its result.

The protocol itself (module names, argv, the request and result types) is
:mod:`daemon.protocol`; this module is its child side. It imports neither
TensorFlow nor NumPy at import time (:func:`synth_input` imports NumPy when
called), because it runs before TensorFlow is imported: a child's priority
and environment must be set first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, cast, overload

from daemon import exitcodes
from daemon.durable import write_json_atomic
from daemon.protocol import (
    DONE,
    ChildRequest,
    ExportOutcome,
    ExportRequest,
    FailureResult,
    ValidateRequest,
    ValidationOutcome,
    WarmSettings,
)

_PR_SET_PDEATHSIG = 1


class ChildFailure(Exception):
    """A failure the child reports; ``permanent`` says whether retrying can help."""

    def __init__(self, reason: str, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux).

    Without this a SIGKILLed supervisor would leave its TensorFlow children
    running and writing into the base path. The getppid check closes the race
    where the parent died before prctl ran.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(exitcodes.TRANSIENT_FAILURE)


#: ioprio_set(2) syscall numbers; the C library has no wrapper for it.
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASSES = {"idle": 3, "best-effort": 2}


def set_io_class(io_class: str) -> bool:
    """Put this process in an I/O scheduling class; False where the kernel cannot.

    ``idle`` gets disk time only when no other process wants it, so the
    trainer's checkpoint writes and input pipeline keep their bandwidth. Only
    schedulers with priorities honour it (BFQ; mq-deadline and none ignore it).
    """
    number = _SYS_IOPRIO_SET.get(os.uname().machine)
    if io_class not in _IOPRIO_CLASSES or number is None:
        return False
    # best-effort takes a level 0-7; 7 is the lowest. idle takes none.
    data = 7 if io_class == "best-effort" else 0
    value = (_IOPRIO_CLASSES[io_class] << _IOPRIO_CLASS_SHIFT) | data
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, value)) == 0
    except (OSError, AttributeError):
        return False


def set_autogroup_nice(nice: int) -> bool:
    """Give this process's autogroup the niceness ``nice``; False where there is none.

    With ``kernel.sched_autogroup_enabled`` (the default on most distributions)
    the CFS scheduler first shares the CPU fairly between *autogroups*, one per
    session, and applies a process's nice value only inside its own group. A
    child is started in a session of its own (see the supervisor), so without
    this its ``nice`` would lower it against nobody: measured here, a worker at
    nice 10 still slowed a training loop in another session by 75 %. The
    autogroup is this child's alone, so lowering it touches nothing else. In a
    non-root CPU cgroup (a systemd service with the cpu controller) autogroups
    do not apply; there the unit's ``CPUWeight=`` does the same job.
    """
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        return False
    return True


def prepare_tensorflow_env(
    allow_gpu: bool, *, nice: int = 0, io_class: str = "default", threads: int = 0
) -> None:
    """Set this child's priority and environment *before* importing TensorFlow.

    Hiding the GPUs is the default because the trainer owns them: an exporter
    that grabs GPU memory can make the training job fail with out-of-memory.
    ``nice`` and ``io_class`` lower the child's CPU and disk priority so the
    trainer keeps its step time. ``threads`` caps TensorFlow's intra- and
    inter-op pools (read from the environment at TensorFlow's first session
    or eager context), which otherwise size themselves to every core.
    """
    if nice > 0:
        os.nice(nice)
        set_autogroup_nice(nice)
    if io_class != "default":
        set_io_class(io_class)
    if threads > 0:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if not allow_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def prepare_from_request(req: ChildRequest | WarmSettings, *, allow_gpu: bool) -> None:
    """:func:`prepare_tensorflow_env` with the request's or settings' ``limits`` (absent: none)."""
    limits: Mapping[str, Any] = req.get("limits") or {}
    prepare_tensorflow_env(
        allow_gpu,
        nice=int(limits.get("nice", 0)),
        io_class=str(limits.get("io_class", "default")),
        threads=int(limits.get("threads", 0)),
    )


def load_request(argv: Sequence[str]) -> dict[str, Any]:
    """The JSON object of the request file ``argv[1]``, as read (typed by :func:`begin`)."""
    if len(argv) != 2:
        print(f"usage: python -m {argv[0]} REQUEST.json", file=sys.stderr)
        raise SystemExit(exitcodes.SOFTWARE)
    data = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@overload
def begin(argv: Sequence[str], *, validator: Literal[False]) -> ExportRequest: ...
@overload
def begin(argv: Sequence[str], *, validator: Literal[True]) -> ValidateRequest: ...
def begin(argv: Sequence[str], *, validator: bool) -> ExportRequest | ValidateRequest:
    """Set up this child and return its request; the first call of every child.

    Cold: ``python -m MODULE REQUEST.json``. Warm (see :mod:`daemon.supervisor.warm_pool`):
    ``MODULE --warm SETTINGS [--done-fd N]``, the argv a child forked by
    :mod:`daemon.children.zygote` runs with, reads the request path from stdin (EOF:
    exit 0) and sends its output to the request's ``log`` file. Either way the
    priority and environment are applied exactly once, before TensorFlow is
    imported: by the zygote for a forked child. With ``--done-fd`` and
    ``max_exports > 1`` in the settings, the child may serve more requests:
    see :func:`next_request`.

    The request is the file's JSON object as the supervisor wrote it: its
    type (:class:`~daemon.protocol.ExportRequest` for the worker,
    :class:`~daemon.protocol.ValidateRequest` for the validator) is taken on
    trust, here only.
    """
    global _reuse
    if len(argv) in (3, 5) and argv[1] == "--warm":
        settings: WarmSettings = json.loads(argv[2])
        die_with_parent(int(settings["parent_pid"]))
        # The zygote applied the limits before it imported TensorFlow, and
        # this child inherited them (niceness is relative: applying it again
        # would add it twice).
        if len(argv) == 5 and argv[3] == "--done-fd" and int(settings.get("max_exports", 1)) > 1:
            _reuse = _Reuse(done_fd=int(argv[4]), max_requests=int(settings["max_exports"]))
        req = _read_request(argv[0])
        if req is None:
            raise SystemExit(exitcodes.OK)
        return cast("ExportRequest | ValidateRequest", req)
    req = load_request(argv)
    if req.get("parent_pid"):
        die_with_parent(req["parent_pid"])
    typed = cast("ExportRequest | ValidateRequest", req)
    prepare_from_request(typed, allow_gpu=not validator and bool(req.get("allow_gpu")))
    return typed


@dataclass
class _Reuse:
    """A reusable warm child's side of the done pipe (see :mod:`daemon.supervisor.warm_pool`)."""

    done_fd: int
    max_requests: int
    served: int = 1


_reuse: _Reuse | None = None


def reusable() -> bool:
    """Whether this child may get another request after this one (:func:`next_request`)."""
    r = _reuse
    return r is not None and r.served < r.max_requests


def next_request(code: int) -> ExportRequest | None:
    """After a request ended with exit code ``code``: the next request, or None to exit.

    Only a reusable warm child goes on, and only after a success: it writes
    ``done`` on its pipe (the result file is already in place) and waits for
    the next request path on stdin. It stops after ``max_exports`` requests
    (so its memory cannot grow without end) and at EOF. A failure ends the
    process, so whatever state the failure left behind dies with it.
    """
    r = _reuse
    if r is None or code != exitcodes.OK or r.served >= r.max_requests:
        return None
    try:
        os.write(r.done_fd, DONE)
    except OSError:
        return None  # the supervisor is gone or gave up on this child
    req = _read_request(sys.argv[0])
    if req is None:
        return None
    r.served += 1
    req["reused"] = r.served - 1
    return cast(ExportRequest, req)  # only a reusable exporter gets here


def wait_for_go() -> bool:
    """Block until the supervisor says ``go`` on stdin (True) or closes it (False).

    For a validator handed its request while the export is still running
    (see :func:`daemon.children.validator.preload`).
    """
    return sys.stdin.readline().strip() == "go"


def _read_request(prog: str) -> dict[str, Any] | None:
    """The next request path from stdin, loaded, with output sent to its log; None at EOF."""
    line = sys.stdin.readline().strip()
    if not line:
        return None
    req = load_request([prog, line])
    if req.get("log"):
        _redirect_output(req["log"])
    req["warm"] = True
    return req


def _redirect_output(path: str) -> None:
    """Point fds 1 and 2 (Python's and TensorFlow's C++ logging) at ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def finish(result_path: Path, result: ExportOutcome | ValidationOutcome) -> int:
    """Write the result file and return the exit code that goes with it.

    On a full disk the result cannot be written either; the exit code
    :data:`exitcodes.NO_SPACE` then tells the supervisor why.
    """
    try:
        write_json_atomic(result_path, result)
    except OSError as e:
        if e.errno not in _NO_SPACE_ERRNOS:
            raise
        with contextlib.suppress(OSError):
            print(f"cannot write the result {result_path}: {e}", file=sys.stderr, flush=True)
        return exitcodes.NO_SPACE
    if result.get("ok"):
        return exitcodes.OK
    return exitcodes.PERMANENT_FAILURE if result.get("permanent") else exitcodes.TRANSIENT_FAILURE


def exit_now(code: int) -> NoReturn:
    """End this child with ``code`` at once, skipping the interpreter's teardown.

    The result file is already written and fsynced (:func:`finish`) and every
    file TensorFlow wrote is closed, so nothing is lost; what is skipped is
    the slow part of a normal exit: freeing a loaded model graph by graph and
    joining TensorFlow's thread pools, measured at 0.9 s for ResNet-50. The
    supervisor waits for the exit, so that second is otherwise latency, and
    CPU taken from the next export and from the trainer.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def failure(reason: str, message: str, *, permanent: bool) -> FailureResult:
    """The result of a child that failed: ``reason`` is the metrics' label."""
    return {"ok": False, "reason": reason, "error": message, "permanent": permanent}


_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def environment_failure(e: BaseException) -> FailureResult | None:
    """A transient failure when ``e`` is a full disk or exhausted resources, else None.

    TensorFlow reports a full disk as ``ResourceExhaustedError`` (not OSError),
    with the file's path in the message; without this, a full disk would
    reject a good checkpoint for good.
    """
    text = str(e).strip()
    first = (text.splitlines() or [""])[0][:1000]
    no_space = (isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS) or any(
        s in text for s in ("No space left on device", "Disk quota exceeded")
    )
    if no_space:
        return failure("no_space", f"{type(e).__name__}: {first}", permanent=False)
    if type(e).__name__ == "ResourceExhaustedError":
        return failure("resource_exhausted", f"{type(e).__name__}: {first}", permanent=False)
    return None


def synth_input(key: str, dtype: str, shape: Sequence[int | None]) -> Any:
    """A deterministic input for one signature input (unknown dimensions = 1).

    Seeded from the input's name so the exporter and the validator, in
    different processes, can regenerate the same array.
    """
    import numpy as np

    dims = tuple(1 if d is None or d < 0 else int(d) for d in shape)
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    rng = np.random.default_rng(seed)
    if dtype == "string":
        return np.full(dims, b"ckpt-exporter", dtype=object)
    if dtype == "bool":
        return rng.random(dims) > 0.5
    np_dtype = np.dtype("float32" if dtype == "bfloat16" else dtype)
    if np_dtype.kind == "f":
        return rng.standard_normal(dims).astype(np_dtype)
    if np_dtype.kind in "iu":
        return rng.integers(0, 10, size=dims).astype(np_dtype)
    raise ValueError(f"cannot synthesise an input of dtype {dtype}")
