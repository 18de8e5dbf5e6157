"""What the supervisor tells people: once-only problem lines, the status line, log excerpts.

Functions of the state they are given; the only side effect is a log line.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.objectstore.client import CONFIGURATION_KINDS, ObjectStoreError
from daemon.protocol import ValidationResult
from daemon.supervisor.state import ModelState


def report_once(
    log: Any, st: ModelState, key: str, event: str, level: str = "warning", **fields: Any
) -> None:
    """Log ``event`` for the model unless a problem with this ``key`` was already said.

    The key stays in ``st.reported`` until the caller discards it (the
    problem went away), so a problem that lasts is logged once, not once a scan.
    """
    if key in st.reported:
        return
    st.reported.add(key)
    getattr(log, level)(event, model=st.cfg.name, **fields)


#: What to do when a bucket is missing or the credentials do not allow an operation.
BUCKET_HINT = (
    "check the bucket name and the credentials the daemon runs with (the client's standard "
    "chain: AWS_* variables or ~/.aws, GOOGLE_APPLICATION_CREDENTIALS), then reload "
    "(systemctl reload, or SIGHUP); its checkpoints stay pending"
)


def pause_if_bucket_unusable(log: Any, st: ModelState, error: OSError, location: str) -> bool:
    """Pause the model when ``error`` says its bucket is unusable until a person acts.

    True when it did (the model's checkpoints are not rejected: they are
    exported after the reload); False for any other error, left to the caller.
    """
    if not (isinstance(error, ObjectStoreError) and error.kind in CONFIGURATION_KINDS):
        return False
    if st.paused is None:
        st.paused = {
            "reason": "object_store_unusable",
            "error": str(error)[:2000],
            "at": time.time(),
        }
        log.error(
            "model_paused",
            model=st.cfg.name,
            reason="object_store_unusable",
            path=location,
            error=str(error),
            hint=BUCKET_HINT,
        )
    return True


def status_line(models: Iterable[tuple[str, ModelState]]) -> str:
    """One line per daemon for ``systemctl status``: each model's version, backlog and state."""
    parts = []
    for name, st in sorted(models, key=lambda item: item[0]):
        newest = st.newest
        pending = st.last_plan.pending if st.last_plan else 0
        state = (
            f"exporting step {st.job.ckpt.step}"
            if st.job
            else f"paused ({st.paused['reason']})"
            if st.paused
            else "idle"
        )
        version = newest.version if newest is not None else "-"
        parts.append(f"{name}: v{version}, {pending} pending, {state}")
    return "; ".join(parts)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` meaningful lines of a child's log ("" if unreadable)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    # TensorFlow's start-up chatter is not what anyone needs at 3 a.m.
    keep = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("I0000", "W0000"))]
    return "\n".join(keep[-lines:])


def signature_summary(result: ValidationResult) -> dict[str, str]:
    """``signature -> "ok (max diff ...)"`` of a validation result, for the ``validated`` line."""
    out = {}
    for name, sig in result["signatures"].items():
        diff = sig.get("max_abs_diff")
        out[name] = "ok" + (f" (max diff {diff:.2g})" if diff is not None else "")
    return out
