"""What every unit of the supervisor shares: the config in force, the log, the metrics, the models.

One object, owned by :class:`daemon.supervisor.loop.Supervisor`; a reload
replaces :attr:`Context.config` in place, so every unit sees the new one.
The event queue is how other threads (watchers, child waiters, signal
handlers) reach the main loop: they only ever put a message on it.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from daemon.config.loading import Config
from daemon.supervisor.metrics import Metrics
from daemon.supervisor.state import ModelState

#: A message for the main loop: ``("signal", signum)``, ``("hint", model)``, ``("child", job_id)``.
Event = tuple[str, Any]


@dataclass
class Context:
    config: Config
    log: Any
    metrics: Metrics
    models: dict[str, ModelState] = field(default_factory=dict)
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue)
    #: Set once a stop was requested: no new job starts.
    stopping: bool = False
    #: Where storage work that takes seconds runs (fetching a checkpoint from
    #: an object store, uploading a version), so the loop keeps turning: the
    #: job polls its future (``Job.io``) like it polls a child.
    io: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="storage-io")
    )

    def running_jobs(self) -> int:
        return sum(1 for st in self.models.values() if st.job is not None)
