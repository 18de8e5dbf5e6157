"""The systemd notify protocol (``sd_notify``), in the few lines it takes.

A datagram of ``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``; a
name starting with ``@`` is an abstract socket (leading NUL byte). Without the
variable (not run by systemd) every call is a no-op, so the daemon runs the same
from a terminal.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=..."``); True if a message was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(payload)
    except OSError:
        return False
    return True


class Watchdog:
    """systemd's watchdog (``WatchdogSec=``), pinged from the main loop only while it is healthy.

    Pinging from a timer thread would keep a hung main loop alive forever;
    pinging from the loop, after checking the threads, lets systemd restart
    the daemon when the loop, the watcher or the HTTP listener is gone.
    """

    def __init__(self) -> None:
        self.interval = _watchdog_interval()
        self.next_ping = 0.0
        self._withheld_said = False

    def due(self, now: float) -> bool:
        return bool(self.interval) and now >= self.next_ping

    def ping(self, now: float, dead_threads: list[str], log: Any) -> None:
        """Ping, unless a thread the daemon relies on is dead (then say so, once)."""
        if dead_threads:
            if not self._withheld_said:
                self._withheld_said = True
                log.error("watchdog_withheld", threads=dead_threads)
            return
        self.next_ping = now + self.interval
        notify("WATCHDOG=1")


def _watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings: half of systemd's ``WATCHDOG_USEC``, or 0 (off).

    ``WATCHDOG_PID``, when set, names the process the watchdog is meant for;
    a child that inherited the variables must not ping.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 2 / 1e6
