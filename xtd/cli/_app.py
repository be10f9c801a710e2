"""The typer application, the error funnel, and the ``command`` decorator every verb uses.

Every command body runs inside :func:`_funnel`: an :class:`~xtd.errors.XtdError`
becomes one ``error: ...`` line on stderr and exit code 1; ``XTD_DEBUG=1``
re-raises instead, so the traceback shows. Anything else is a bug and keeps its
traceback (without local variables, so a crash never dumps tensors).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from xtd.console import console, set_progress_enabled, setup_logging
from xtd.errors import XtdError

__all__ = ["app", "command", "fail"]

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="xtd",
    help="Cross-tokenizer distillation of language models with Approximate Likelihood Matching.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def fail(message: str) -> typer.Exit:
    """Print one error line and return the exit to raise: ``raise fail("...")``."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=1)


def _funnel(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except XtdError as exc:
            if os.environ.get("XTD_DEBUG") == "1":
                raise
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            console.print("interrupted: committed work is kept; rerun the same command to resume")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def command(*args: Any, group: typer.Typer | None = None, **kwargs: Any) -> Callable[[F], F]:
    """``@command("name", epilog=EXAMPLES)``: register a verb on :data:`app` (or on the
    sub-command ``group``, e.g. ``xtd hypernet``) behind the error funnel."""

    def decorate(func: F) -> F:
        (group or app).command(*args, **kwargs)(_funnel(func))
        return func

    return decorate


@app.callback()
def _root(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Warnings and results only; no progress bars.")
    ] = False,
) -> None:
    """xtd: distil a teacher into students of any tokenizer.

    Stage 1 runs the teacher once (xtd precompute); stage 2 trains students from the
    stored shards (xtd train).
    """
    setup_logging(-1 if quiet else verbose)
    set_progress_enabled(not quiet)
