"""Command-line options generated from a config class, so each default and help line lives once.

``@config_command("train", TrainConfig, epilog=EXAMPLES)`` registers a verb whose options
are every leaf of the config (:meth:`xtd.config.ConfigBase.leaves`: its flag word, type,
default, help and metavar), plus ``--config FILE`` and the verb's own parameters (such as
``--json``). The verb receives the built config:

* values come from the defaults, then ``--config FILE`` (JSON or YAML, nested sections or
  flag keys: a run's own ``train_config.json`` works), then the flags given on the command
  line — only those actually typed override the file;
* ``resume_from``, when given, is called with the flags typed so far and returns the saved
  settings to start from instead of the defaults (``xtd train --resume --out DIR``);
* booleans read ``--x/--no-x``; tuple fields repeat the flag (``--store a --store b``) or
  take one comma-separated value (``--boundary-classes space,newline``).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from xtd.cli._app import command
from xtd.config import ConfigBase, Leaf
from xtd.errors import ConfigError

try:  # typer ≥ 0.26 ships its own copy of click
    from typer._click.core import ParameterSource
except ImportError:  # pragma: no cover - older typer on top of click
    from click.core import ParameterSource  # type: ignore[no-redef]

__all__ = ["config_command", "typed_values"]

C = TypeVar("C", bound=ConfigBase)
F = TypeVar("F", bound=Callable[..., Any])
ResumeFrom = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]

_CONFIG_PARAM = "config_file"
_DEFAULT_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _base(annotation: Any) -> tuple[Any, bool]:
    """``(inner type, optional)`` of ``X | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parameter(leaf: Leaf) -> inspect.Parameter:
    """The typer parameter of one config leaf (default None: "not typed" is then visible)."""
    kind, _ = _base(leaf.type)
    names = [f"--{leaf.key.replace('_', '-')}"] + ([leaf.short] if leaf.short else [])
    help_text = escape(leaf.help + (" [required]" if leaf.required else ""))
    if kind is bool:
        word = leaf.key.replace("_", "-")
        option = typer.Option(f"--{word}/--no-{word}", *names[1:], help=help_text, metavar="", show_default=False)
        help_default = "" if leaf.required else escape(f" [default: {'on' if leaf.default else 'off'}]")
        option.help = help_text + help_default
        annotation: Any = bool | None
    elif typing.get_origin(kind) is tuple:
        metavar = leaf.metavar or "TEXT"
        shown = "" if leaf.required or not leaf.default else (leaf.sep or " ").join(leaf.default)
        extra = escape(f" [default: {shown}]") if shown else ""
        option = typer.Option(*names, help=help_text + extra, metavar=metavar, show_default=False)
        annotation = str | None if leaf.sep else list[str] | None
    else:
        metavar = leaf.metavar or _DEFAULT_METAVARS.get(kind, "TEXT")
        extra = "" if leaf.required or leaf.default in (None, "") else escape(f" [default: {leaf.default}]")
        option = typer.Option(*names, help=help_text + extra, metavar=metavar, show_default=False)
        annotation = kind | None
    return inspect.Parameter(
        leaf.key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[annotation, option]
    )


def config_args(config: ConfigBase) -> list[str]:
    """Command-line flags that rebuild ``config``: every required leaf and every leaf that
    differs from its default (what a recipe prints for ``xtd <verb>``; the inverse of the
    options generated here)."""
    args: list[str] = []
    values = config.flat_dict()
    for leaf in type(config).leaves():
        value = values[leaf.key]
        value = tuple(value) if isinstance(value, list) else value
        if not leaf.required and value == leaf.default:
            continue
        word = leaf.key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{word}" if value else f"--no-{word}")
        elif isinstance(value, tuple) and leaf.sep:
            args += [f"--{word}", leaf.sep.join(value)]
        elif isinstance(value, tuple):
            for item in value:
                args += [f"--{word}", str(item)]
        else:
            args += [f"--{word}", str(value)]
    return args


def typed_values(config_cls: type[ConfigBase], values: Mapping[str, Any]) -> dict[str, Any]:
    """CLI values of the leaves, as the config takes them (comma-separated fields split)."""
    out: dict[str, Any] = {}
    for leaf in config_cls.leaves():
        if leaf.key not in values:
            continue
        value = values[leaf.key]
        if leaf.sep and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(leaf.sep) if v.strip())
        elif isinstance(value, list):
            value = tuple(value)
        out[leaf.key] = value
    return out


def config_command(
    name: str,
    config_cls: type[C],
    *,
    epilog: str,
    group: typer.Typer | None = None,
    resume_from: ResumeFrom | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``func(config, **own)`` as verb ``name`` with options generated from ``config_cls``.

    Args:
        name: the verb.
        config_cls: the config whose leaves become options.
        epilog: the examples shown at the end of ``--help``.
        group: a sub-command group (``xtd hypernet``) instead of the root app.
        resume_from: called with the typed flags; returns saved settings to start from
            (or None for the defaults).
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(func, eval_str=True).parameters.values()
            if p.name != "config"
        ]
        leaves = config_cls.leaves()
        config_option = inspect.Parameter(
            _CONFIG_PARAM,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Option(
                    "--config", metavar="FILE",
                    help="Read settings from a JSON or YAML file (a run's saved settings, or written by hand); flags given here override it.",
                ),
            ],
        )  # fmt: skip
        context = inspect.Parameter("xtd_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)

        @functools.wraps(func)
        def wrapper(*, xtd_context: typer.Context, **kwargs: Any) -> Any:
            own_values = {p.name: kwargs.pop(p.name) for p in own if p.name in kwargs}
            config_file = kwargs.pop(_CONFIG_PARAM, None)
            typed = {
                key: value
                for key, value in kwargs.items()
                if xtd_context.get_parameter_source(key) not in (ParameterSource.DEFAULT, None)
            }
            typed = typed_values(config_cls, typed)
            settings: dict[str, Any] = {}
            if resume_from is not None:
                settings.update(config_cls.flat_values(resume_from(typed) or {}))
            if config_file is not None:
                file_settings = config_cls.read_file(config_file)
                flat, problems = config_cls._flatten(file_settings)
                if problems:
                    raise ConfigError(f"config file {config_file!r}: {'; '.join(problems)}")
                settings.update(flat)
            settings.update(typed)
            config = config_cls.from_dict(settings)
            return func(config=config, **own_values)

        wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*(_parameter(leaf) for leaf in leaves), config_option, *own, context]
        )
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}  # type: ignore[attr-defined]
        command(name, epilog=epilog, group=group)(wrapper)
        return func

    return decorate
