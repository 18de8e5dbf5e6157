"""Structured logging: JSON lines in production, a readable console on a terminal.

One event per step of a checkpoint's journey, with ``model``, ``step``,
``version`` and durations as keys, so a log pipeline can filter and aggregate
without parsing prose.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the process.

    ``auto`` picks the console renderer when ``stream`` is a terminal and JSON
    otherwise (journald, files, pipes). Safe to call again, e.g. on reload.
    """
    out = stream if stream is not None else sys.stderr
    use_console = log_format == "console" or (log_format == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
