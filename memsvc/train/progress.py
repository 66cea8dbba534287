"""The training progress bar (rich), for a terminal. Elsewhere the periodic `train_step`
log lines are the plain-text progress and no bar is made."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _BarLogger:
    """A structlog logger that prints above the live bar instead of through it."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def msg(self, message: str) -> None:
        self._console.print(Text.from_ansi(message), soft_wrap=True)

    info = warning = error = debug = critical = exception = msg


class ProgressBar:
    """Steps done of `total`, with the stage, the loss and tokens/s; a context manager.

    While it is drawn, structlog's output goes through the bar's console (a log line
    written straight to stderr would tear the bar); the previous logger factory comes
    back on exit.
    """

    def __init__(self, total: int, start: int = 0) -> None:
        self._console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.fields[stage]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tokens_per_s]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self._console,
        )
        self._task = self._progress.add_task(
            "train", total=total, completed=start, stage="", loss=float("nan"), tokens_per_s=0.0
        )
        self._previous_factory: Any = None

    def __enter__(self) -> ProgressBar:
        self._previous_factory = structlog.get_config()["logger_factory"]
        structlog.configure(logger_factory=lambda *args: _BarLogger(self._console))
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()
        structlog.configure(logger_factory=self._previous_factory)

    def update(self, step: int, stage: str, loss: float, tokens_per_s: float) -> None:
        self._progress.update(
            self._task, completed=step, stage=stage, loss=loss, tokens_per_s=tokens_per_s
        )
