"""The worker and validator children run below the trainer: nice, idle I/O, few threads.

Checked on real child processes through /proc and util-linux's ``ionice``,
the way an operator would look at them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env, niceness

from daemon.config.loading import DaemonConfig

_CHILD = """
import os, sys, time
from daemon.children import runtime
runtime.prepare_from_request(
    {"limits": {"nice": 7, "io_class": sys.argv[1], "threads": 3}}, allow_gpu=False
)
print(os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["TF_NUM_INTEROP_THREADS"],
      os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize(("io_class", "shown"), [("idle", "idle"), ("best-effort", "best-effort")])
def test_children_lower_their_cpu_and_io_priority_and_cap_threads(
    io_class: str, shown: str
) -> None:
    base_nice = os.nice(0)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, io_class],
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
        # A session of its own, as the supervisor starts its children: the
        # child then lowers its own autogroup, not the test runner's.
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["3", "3", "-1"]
        assert niceness(proc.pid) == min(19, base_nice + 7)
        autogroup = Path(f"/proc/{proc.pid}/autogroup")
        if autogroup.exists():  # kernels built with CONFIG_SCHED_AUTOGROUP
            assert autogroup.read_text().split()[-2:] == ["nice", "7"], autogroup.read_text()
        if shutil.which("ionice") is None:
            pytest.skip("util-linux's ionice is not installed to read the I/O class back")
        out = subprocess.run(
            ["ionice", "-p", str(proc.pid)], capture_output=True, text=True, check=True
        ).stdout
        assert out.startswith(shown), out
    finally:
        proc.kill()
        proc.wait()


def test_zero_worker_threads_means_a_quarter_of_the_cpus() -> None:
    assert DaemonConfig(worker_threads=0).worker_threads_effective == max(
        1, (os.cpu_count() or 1) // 4
    )
    assert DaemonConfig(worker_threads=5).worker_threads_effective == 5


def test_without_limits_the_child_keeps_its_priority_and_sees_gpus() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; from daemon.children import runtime; "
            "runtime.prepare_from_request({}, allow_gpu=True); "
            "print(os.nice(0), os.environ.get('CUDA_VISIBLE_DEVICES'), "
            "os.environ.get('TF_NUM_INTRAOP_THREADS'))",
        ],
        env={k: v for k, v in child_env().items() if k != "CUDA_VISIBLE_DEVICES"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [str(os.nice(0)), "None", "None"]
