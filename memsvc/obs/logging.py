"""structlog set-up, done once at the edge (the CLI); library code only binds and emits
(`structlog.contextvars.bound_contextvars` for context that follows a task and its threads)."""

from __future__ import annotations

import logging
import sys

import structlog

from memsvc.obs.capping import cap_log_values


def _current_stderr(*_args: object) -> structlog.PrintLogger:
    """A logger on whatever sys.stderr is now: progress bars and test runners swap it."""
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Key-value events to stderr: JSON lines in production (or when stderr is not a
    terminal), readable columns in a terminal. stdout stays free for command output."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            cap_log_values,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_current_stderr,
        cache_logger_on_first_use=False,
    )
