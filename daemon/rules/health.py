"""Health: the verdict behind ``/healthz``. A pure function of a snapshot.

The main loop writes a :class:`HealthSnapshot` at every turn; the HTTP thread
only reads the latest one (replacing a reference is atomic in CPython), so
answering a probe never waits for, or disturbs, the loop. A loop that stops
turning stops refreshing its snapshot, which is exactly what makes it visible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """What the main loop last knew.

    ``loop_monotonic``: ``time.monotonic()`` at the loop's last turn.
    ``failing_since``: per model, the wall time of the first failed export
    since its last publication (None: not failing).
    """

    loop_monotonic: float
    failing_since: Mapping[str, float | None] = field(default_factory=dict)


def evaluate(
    snap: HealthSnapshot,
    *,
    now_monotonic: float,
    now_wall: float,
    stall_seconds: float,
    failing_seconds: float,
) -> tuple[bool, dict[str, Any]]:
    """Return (healthy, JSON body).

    Unhealthy when the loop has not turned for more than ``stall_seconds``, or
    when some model has failed every export for more than ``failing_seconds``.
    The body names each problem so the person paged knows where to look.
    """
    problems: list[dict[str, Any]] = []
    idle = max(0.0, now_monotonic - snap.loop_monotonic)
    if idle > stall_seconds:
        problems.append(
            {
                "problem": "main_loop_stalled",
                "seconds_since_last_turn": round(idle, 1),
                "limit_seconds": stall_seconds,
            }
        )
    for model, since in sorted(snap.failing_since.items()):
        if since is not None and now_wall - since > failing_seconds:
            problems.append(
                {
                    "problem": "exports_failing",
                    "model": model,
                    "failing_for_seconds": round(now_wall - since, 1),
                    "limit_seconds": failing_seconds,
                }
            )
    body: dict[str, Any] = {
        "status": "ok" if not problems else "unhealthy",
        "seconds_since_last_turn": round(idle, 3),
        "problems": problems,
    }
    return not problems, body
