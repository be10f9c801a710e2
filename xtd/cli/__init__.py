"""The ``xtd`` command line: one thin module per verb, registered on one typer app.

The error funnel lives in :mod:`xtd.cli._app` (``command`` decorator), so the same
one-line errors reach users of ``xtd`` and of ``typer.testing.CliRunner``.
"""

from __future__ import annotations

from xtd.cli import align as _align  # noqa: F401  (each import registers its commands)
from xtd.cli import evaluate as _evaluate  # noqa: F401
from xtd.cli import hypernet as _hypernet  # noqa: F401
from xtd.cli import maths as _maths  # noqa: F401
from xtd.cli import precompute as _precompute  # noqa: F401
from xtd.cli import share as _share  # noqa: F401
from xtd.cli import store as _store  # noqa: F401
from xtd.cli import train as _train  # noqa: F401
from xtd.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``xtd`` console script."""
    app(prog_name="xtd")
