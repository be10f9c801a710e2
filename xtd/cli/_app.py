"""The typer application, the error funnel, and the ``command`` decorator every verb uses.

Every command body runs inside :func:`_funnel`: an :class:`~xtd.errors.XtdError`
becomes one ``error: ...`` line on stderr and exit code 1; ``XTD_DEBUG=1``
re-raises instead, so the traceback shows. Anything else is a bug and keeps its
traceback (without local variables, so a crash never dumps tensors). Mistyped flags and
values (click's usage errors) are bad input too: one ``error:`` line and exit 1, not
click's box and exit 2 (:class:`_Group`).

``-v/--verbose`` and ``-q/--quiet`` work before the verb (``xtd -q train``) and after it
(``xtd train ... -q``); ``-h`` is ``--help``; ``xtd --version`` prints the version.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

try:  # typer ≥ 0.26 ships its own copy of click
    import typer._click as click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer on top of click
    import click  # type: ignore[no-redef]
    from click import exceptions as _click_errors  # type: ignore[no-redef]

from xtd.console import console, set_progress_enabled, setup_logging
from xtd.errors import XtdError

__all__ = ["app", "command", "fail"]

F = TypeVar("F", bound=Callable[..., Any])

_Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, metavar="", help="More log output (-vv for debug).")]
_Quiet = Annotated[bool, typer.Option("--quiet", "-q", metavar="", help="Warnings and results only; no progress output.")]


class _Group(TyperGroup):
    """The ``xtd`` group: usage errors become one ``error:`` line and exit code 1."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, *a: Any, **kw: Any) -> Any:
        if not kw.get("standalone_mode", True) or a:
            return super().main(args, prog_name, *a, **kw)
        kw["standalone_mode"] = False
        try:
            code = super().main(args, prog_name, **kw)
        except _click_errors.NoArgsIsHelpError as exc:  # bare `xtd`: show the help
            typer.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            code = 0
        except _click_errors.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "xtd"
            fail(escape(f"{where}: {exc.format_message()} (see {where} --help)"))
            code = 1
        except typer.Abort:
            fail("aborted")
            code = 1
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="xtd",
    help="Cross-tokenizer distillation of language models with Approximate Likelihood Matching.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(message: str) -> typer.Exit:
    """Print one error line and return the exit to raise: ``raise fail("...")``."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=1)


def _apply_verbosity(ctx: typer.Context | None, verbose: int, quiet: bool) -> None:
    """Combine ``-v/-q`` given before the verb (stored by the root callback) with those after it."""
    root = (ctx.find_root().obj if ctx is not None else None) or {}
    quiet = quiet or bool(root.get("quiet"))
    setup_logging(-1 if quiet else verbose + int(root.get("verbose", 0)))
    set_progress_enabled(not quiet)


def _funnel(func: F) -> F:
    signature = inspect.signature(func, eval_str=True)
    wants_context = "xtd_context" in signature.parameters  # a generated verb reads its flags' sources

    @functools.wraps(func)
    def wrapper(
        *args: Any, xtd_context: typer.Context | None = None, verbose: int = 0, quiet: bool = False, **kwargs: Any
    ) -> Any:
        _apply_verbosity(xtd_context, verbose, quiet)
        if wants_context:
            kwargs["xtd_context"] = xtd_context
        try:
            return func(*args, **kwargs)
        except XtdError as exc:
            if os.environ.get("XTD_DEBUG") == "1":
                raise
            raise fail(escape(_one_line(exc))) from None
        except KeyboardInterrupt:
            console.print("interrupted: committed work is kept; rerun the same command to resume")
            raise typer.Exit(code=130) from None

    # typer builds the options from the signature: the verb's own, then -v and -q.
    own = [p for p in signature.parameters.values() if p.name != "xtd_context"]
    extra = [
        inspect.Parameter("xtd_context", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=0, annotation=_Verbose),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=_Quiet),
    ]
    wrapper.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {
        **{p.name: p.annotation for p in own},
        "xtd_context": typer.Context,
        "verbose": _Verbose,
        "quiet": _Quiet,
    }
    return wrapper  # type: ignore[return-value]


def _one_line(exc: XtdError) -> str:
    """The message of ``exc``; for an error re-raised from a DataLoader worker (whose message
    embeds the worker's traceback), the original message from its last line."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


class _Command(TyperCommand):
    """A verb whose help shows metavars only (``STORE``, ``N``), never typer's ``<str>``/``<bool>``."""

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = _no_type  # type: ignore[method-assign]
        return params


def _no_type(ctx: click.Context) -> None:
    return None


def command(*args: Any, group: typer.Typer | None = None, **kwargs: Any) -> Callable[[F], F]:
    """``@command("name", epilog=EXAMPLES)``: register a verb on :data:`app` (or on the
    sub-command ``group``, e.g. ``xtd hypernet``) behind the error funnel."""

    def decorate(func: F) -> F:
        (group or app).command(*args, cls=_Command, **kwargs)(_funnel(func))
        return func

    return decorate


def _version(value: bool) -> None:
    if value:
        from xtd import __version__

        typer.echo(f"xtd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: _Verbose = 0,
    quiet: _Quiet = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """xtd: distil a teacher into students of any tokenizer.

    Stage 1 runs the teacher once (xtd precompute); stage 2 trains students from the
    stored shards (xtd train).
    """
    ctx.obj = {"verbose": verbose, "quiet": quiet}
    setup_logging(-1 if quiet else verbose)
    set_progress_enabled(not quiet)
