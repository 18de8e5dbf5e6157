"""The supervisor side: one process, no TensorFlow, no NumPy, nothing from :mod:`daemon.children`.

A test imports this package in a fresh interpreter and checks ``sys.modules``.
"""

from __future__ import annotations

from daemon.supervisor.loop import Supervisor

__all__ = ["Supervisor"]
