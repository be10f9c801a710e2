"""Typed configuration: one frozen dataclass per command, holding every default.

The CLI reads its defaults from these classes and builds them; the Python API takes
the same objects (``xtd.precompute(PrecomputeConfig(...))``). ``__post_init__``
validates and names the flag the user typed. Each config round-trips through
``to_dict``/``from_dict`` and is saved with every output (store attributes,
checkpoint ``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Self

from xtd.errors import ConfigError

__all__ = ["ConfigBase", "flag"]


def flag(field_name: str) -> str:
    """The command-line flag of a config field: ``batch_tokens`` → ``--batch-tokens``."""
    return "--" + field_name.replace("_", "-")


class ConfigBase:
    """Shared behaviour of the config dataclasses: dict/JSON round trip with full validation."""

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-able values (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict, reporting every unknown key at once.

        Raises:
            ConfigError: unknown keys, or a value that fails validation.
        """
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} keys: {', '.join(map(repr, unknown))}; "
                f"known keys are {', '.join(sorted(names))}"
            )
        kwargs = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a missing required field
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        """Read a config file written by :meth:`to_dict` (or by hand).

        Raises:
            ConfigError: the file is missing, is not a JSON object, or has duplicate keys.
        """

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    raise ConfigError(f"config {str(path)!r} sets {key!r} twice")
                seen[key] = value
            return seen

        try:
            data = json.loads(Path(path).read_text(), object_pairs_hook=no_duplicates)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
        return cls.from_dict(data)


# Each command's config class follows, in its own section, named <Verb>Config and
# declared as @dataclass(frozen=True, kw_only=True) subclassing ConfigBase.
