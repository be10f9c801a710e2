"""The one rich console (stderr), logging set-up and the progress-bar factory.

Nothing here runs at import time: the CLI calls :func:`setup_logging` once.
stdout carries results only; everything a person reads while a job runs goes to
stderr through :data:`console`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["console", "results", "setup_logging", "progress_bar", "set_progress_enabled", "LineProgress"]

console = Console(stderr=True)
# stdout carries results only (tables, JSON). Piped into a file or a Makefile log, rich
# would wrap tables at 80 columns and fold paths mid-word; 160 keeps rows on one line.
results = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
_progress_enabled = True


def setup_logging(verbosity: int = 0) -> None:
    """Install a RichHandler on the root ``xtd`` logger.

    Args:
        verbosity: -1 quiet (warnings only), 0 info, 1 or more debug.
    """
    from rich.logging import RichHandler

    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logger = logging.getLogger("xtd")
    logger.handlers.clear()
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    if verbosity <= 0:
        _quiet_third_party()


def _quiet_third_party() -> None:
    """Silence the libraries' own progress bars and deprecation chatter on the CLI.

    transformers draws tqdm bars for every weight load and save and warns about its own
    deprecated internals; xtd shows its own progress instead (``-v`` keeps them). The
    environment variables are read when those libraries are first imported, which the
    CLI does only after this runs, so nothing heavy is imported here.
    """
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def set_progress_enabled(enabled: bool) -> None:
    """Turn progress bars on or off (``--quiet`` turns them off)."""
    global _progress_enabled
    _progress_enabled = enabled


PROGRESS_LINE_SECONDS = 30.0
"""On a non-terminal, at most one progress line per task every this many seconds."""


@contextmanager
def progress_bar(*extra_columns: TextColumn) -> Iterator[Any]:
    """A rich Progress on the shared console, or progress lines where stderr is no terminal.

    On a terminal it is a live bar; elsewhere (CI, ``nohup``, a Makefile piped into a log)
    a :class:`LineProgress` with the same ``add_task``/``update`` interface writes one line
    per task at most every :data:`PROGRESS_LINE_SECONDS` (done, rate, ETA and the extra
    columns) and a last line when the task ends. ``--quiet`` turns both off.

    Usage::

        with progress_bar() as progress:
            task = progress.add_task("documents", total=n)
            progress.update(task, advance=1)
    """
    if _progress_enabled and not console.is_terminal:
        lines = LineProgress(*extra_columns)
        try:
            yield lines
        finally:
            lines.finish()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not _progress_enabled,
        transient=False,
    )
    with progress:
        yield progress


@dataclass
class _LineTask:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    last_line: float
    dirty: bool = False

    @property
    def percentage(self) -> float:  # what rich columns may format
        return 100.0 * self.completed / self.total if self.total else 0.0


class LineProgress:
    """Progress as plain log lines (see :func:`progress_bar`); thread-safe.

    A line reads ``documents 12/40 (30%) | 49,620 tokens | 430 tok/s | 1m05s elapsed, ETA 3m10s``:
    the task, done/total, each extra column rendered with the task's fields, then time.
    A task may carry its own estimate in the field ``eta_s`` (seconds, or None); otherwise
    the ETA is extrapolated from the done fraction.
    """

    def __init__(self, *columns: TextColumn) -> None:
        self._columns = columns
        self._tasks: dict[int, _LineTask] = {}
        self._lock = threading.Lock()

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        now = time.monotonic()
        with self._lock:
            task_id = len(self._tasks)
            self._tasks[task_id] = _LineTask(description, total, completed, dict(fields), now, now)
        return task_id

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        with self._lock:
            task = self._tasks[task_id]
            if completed is not None:
                task.completed = completed
            if advance is not None:
                task.completed += advance
            if total is not None:
                task.total = total
            if description is not None:
                task.description = description
            task.fields.update(fields)
            task.dirty = True
            now = time.monotonic()
            if now - task.last_line >= PROGRESS_LINE_SECONDS:
                self._print(task, now)

    def finish(self) -> None:
        """A last line for every task that moved since its last line."""
        with self._lock:
            now = time.monotonic()
            for task in self._tasks.values():
                if task.dirty:
                    self._print(task, now)

    def _print(self, task: _LineTask, now: float) -> None:
        task.last_line, task.dirty = now, False
        elapsed = now - task.started
        done = f"{task.completed:,.0f}" + (f"/{task.total:,.0f} ({task.percentage:.0f}%)" if task.total else "")
        parts = [f"{task.description} {done}"]
        for column in self._columns:
            try:
                parts.append(column.text_format.format(task=task))
            except (KeyError, AttributeError, IndexError, ValueError):
                continue
        eta = task.fields.get("eta_s", _no_eta)
        if eta is _no_eta and task.total and task.completed > 0:
            eta = elapsed * (task.total - task.completed) / task.completed
        timing = f"{_duration(elapsed)} elapsed"
        if isinstance(eta, int | float):
            timing += f", ETA {_duration(eta)}"
        parts.append(timing)
        console.print(" | ".join(parts), highlight=False, markup=False, soft_wrap=True)


_no_eta = object()


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
