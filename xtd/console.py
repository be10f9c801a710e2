"""The one rich console (stderr), logging set-up and the progress-bar factory.

Nothing here runs at import time: the CLI calls :func:`setup_logging` once.
stdout carries results only; everything a person reads while a job runs goes to
stderr through :data:`console`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["console", "results", "setup_logging", "progress_bar", "set_progress_enabled"]

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


@contextmanager
def progress_bar(*extra_columns: TextColumn) -> Iterator[Progress]:
    """A rich Progress on the shared console; disabled when stderr is no terminal.

    Usage::

        with progress_bar() as progress:
            task = progress.add_task("documents", total=n)
            progress.update(task, advance=1)
    """
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (_progress_enabled and console.is_terminal),
        transient=False,
    )
    with progress:
        yield progress
