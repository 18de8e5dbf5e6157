"""The systemd notify protocol (``sd_notify``), in the few lines it takes.

A datagram of ``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``; a
name starting with ``@`` is an abstract socket (leading NUL byte). Without the
variable (not run by systemd) every call is a no-op, so the daemon runs the same
from a terminal.
"""

from __future__ import annotations

import os
import socket


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
