"""What every config class shares: declared options, sections, flat and nested dicts, files.

A config is a ``@dataclass(frozen=True, kw_only=True)`` subclassing :class:`ConfigBase`.
Each field is declared with :func:`option` — its default *and* its one line of help live
there, and the command line is generated from them (:mod:`xtd.cli._options`) — or with
:func:`section` for a nested config of a concept that several layers share (the ALM settings
read by the data path and the loss). Every leaf has one key, the word of its flag
(``batch_size`` ↔ ``--batch-size``), unique across the sections.

Round trips: :meth:`ConfigBase.to_dict` gives the nested form (what run folders save),
:meth:`ConfigBase.flat_dict` the flag-keyed form (what messages and resume checks compare);
:meth:`ConfigBase.from_dict` reads either (or a mix), and :meth:`ConfigBase.from_file` a JSON
or YAML file of either, reporting every unknown key and every bad value at once.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import yaml

from xtd.errors import ConfigError

__all__ = [
    "ConfigBase",
    "Leaf",
    "flag",
    "option",
    "section",
    "DTYPES",
    "DTYPE_ALIASES",
    "canonical_dtype",
    "DEVICE_PATTERN",
    "device_problem",
]

JSONValue = Any  # a value that json.dumps accepts: str, int, float, bool, None, list, dict


def flag(key: str) -> str:
    """The command-line flag of a config key: ``batch_tokens`` → ``--batch-tokens``."""
    return "--" + key.replace("_", "-")


DTYPES = ("auto", "fp32", "bf16", "fp16")
"""Precision of a forward pass, spelled the same by every command (``auto``: see
:func:`xtd.runtime.resolve_dtype`)."""
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""torch's names, accepted for the short ones (configs store the short form)."""
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
"""Device spellings every command accepts (resolved by :func:`xtd.runtime.resolve_device`)."""


def device_problem(device: str) -> list[str]:
    """``[]`` for a valid ``--device`` value, else the one problem to report."""
    if DEVICE_PATTERN.fullmatch(device):
        return []
    return [f"{flag('device')} must be auto, cpu, cuda, cuda:N or mps, not {device!r}"]


def canonical_dtype(dtype: str) -> str:
    """The short spelling of a dtype name: ``bfloat16`` → ``bf16``; ``auto`` stays.

    Raises:
        ConfigError: neither one of :data:`DTYPES` nor an alias.
    """
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ConfigError(f"{flag('dtype')} {dtype!r}: choose from {', '.join(DTYPES)}")
    return name


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    sep: str | None = None,
) -> Any:
    """A config field with its default and help (both shown by ``--help``).

    Args:
        default: the default; omit it for a required value.
        help: one line, shown by ``--help`` and in generated documentation.
        flag: the key (and flag) when it differs from the field name (fields of a section).
        short: a one-letter alias such as ``-o``.
        metavar: the placeholder in ``--help`` (``PATH``, ``N``); default: from the type.
        sep: a tuple field given as one comma-separated value instead of a repeated flag.
    """
    metadata = {"help": help, "flag": flag, "short": short, "metavar": metavar, "sep": sep}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type[ConfigBase], *, help: str) -> Any:
    """A nested config (its defaults by default)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable value of a config tree.

    Attributes:
        path: field names from the root, e.g. ``("alm", "tau")``.
        key: its flag word, unique in the tree (``tau``; ``alm_chunks`` for ``alm.chunks``).
        type: the resolved annotation (``float``, ``int | None``, ``tuple[str, ...]``).
        default: the default, or ``dataclasses.MISSING``.
        help, short, metavar, sep: from :func:`option`.
    """

    path: tuple[str, ...]
    key: str
    type: Any
    default: Any
    help: str
    short: str | None
    metavar: str | None
    sep: str | None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def _plain(value: Any) -> JSONValue:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


_LEAVES: dict[type, tuple[Leaf, ...]] = {}


class _FlatKeywords(type):
    """Lets a config be built with flag keys for the leaves of its sections:
    ``TrainConfig(store=..., out=..., lr=1e-4, tau=5.0)`` sets ``optim.lr`` and ``alm.tau``.

    A call with field names only is the dataclass's own constructor. Otherwise every value
    (a section given as an object included) is read by flag key and built as
    :meth:`ConfigBase.from_dict` builds, reporting every problem at once.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if args or all(k in names for k in kwargs):
            return super().__call__(*args, **kwargs)
        by_field = {leaf.path[0]: leaf.key for leaf in cls.leaves() if len(leaf.path) == 1}  # type: ignore[attr-defined]
        keys = {leaf.key for leaf in cls.leaves()}  # type: ignore[attr-defined]
        flat: dict[str, Any] = {}
        for key, value in kwargs.items():
            if isinstance(value, ConfigBase) and key in names:
                flat.update({k: v for k, v in value.flat_dict().items() if k not in kwargs})
            elif key in by_field:
                flat[by_field[key]] = value
            elif key in keys:
                flat[key] = value
            else:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}")
        return cls._build(flat)  # type: ignore[attr-defined]


class ConfigBase(metaclass=_FlatKeywords):
    """Shared behaviour of the config dataclasses (module docstring).

    Besides the nested fields (``config.alm.tau``), every leaf reads by its flag key
    (``config.tau``), and the constructor takes flag keys (:class:`_FlatKeywords`).
    """

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails
        if name.startswith("_"):
            raise AttributeError(name)
        for leaf in type(self).leaves():
            if leaf.key == name and len(leaf.path) > 1:
                value: Any = self
                for part in leaf.path:
                    value = getattr(value, part)
                return value
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ structure

    @classmethod
    def leaves(cls) -> tuple[Leaf, ...]:
        """Every settable value, sections flattened, in declaration order."""
        cached = _LEAVES.get(cls)
        if cached is not None:
            return cached
        out: list[Leaf] = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.metadata.get("section"):
                section_cls = hints[f.name]
                out.extend(dataclasses.replace(leaf, path=(f.name, *leaf.path)) for leaf in section_cls.leaves())
                continue
            meta = f.metadata
            out.append(
                Leaf(
                    path=(f.name,),
                    key=meta.get("flag") or f.name,
                    type=hints[f.name],
                    default=f.default,
                    help=meta.get("help", ""),
                    short=meta.get("short"),
                    metavar=meta.get("metavar"),
                    sep=meta.get("sep"),
                )
            )
        keys = [leaf.key for leaf in out]
        if len(set(keys)) != len(keys):  # pragma: no cover - a declaration error
            raise TypeError(f"{cls.__name__}: keys repeat across sections: {sorted(keys)}")
        _LEAVES[cls] = tuple(out)
        return _LEAVES[cls]

    @classmethod
    def leaf(cls, key: str) -> Leaf:
        """The leaf of a flag word (``tau`` or ``--tau``)."""
        word = key.removeprefix("--").replace("-", "_")
        for leaf in cls.leaves():
            if leaf.key == word:
                return leaf
        raise KeyError(key)

    # ------------------------------------------------------------------ to plain values

    def to_dict(self) -> dict[str, JSONValue]:
        """Every field as plain JSON-able values, sections as nested dicts (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def flat_dict(self) -> dict[str, JSONValue]:
        """Every leaf by its key (the flag word), tuples as lists."""
        out: dict[str, JSONValue] = {}
        for leaf in self.leaves():
            value: Any = self
            for name in leaf.path:
                value = getattr(value, name)
            out[leaf.key] = _plain(value)
        return out

    # ------------------------------------------------------------------ from plain values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str | None = None) -> Self:
        """Build from nested sections or flag keys (``tau``, ``merge-threshold``), or a mix.

        Lists become tuples. Every unknown key and every bad value is reported at once.

        Raises:
            ConfigError: unknown keys, a missing required value, or values that fail validation.
        """
        flat, problems = cls._flatten(data)
        if problems:
            raise ConfigError(f"{where + ': ' if where else ''}{'; '.join(problems)}")
        return cls._build(flat, where=where)

    @classmethod
    def _flatten(cls, data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``data`` as ``{key: value}``; sections may be nested dicts or flat keys."""
        hints = typing.get_type_hints(cls)
        sections = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("section")}  # type: ignore[arg-type]
        keys = {leaf.key for leaf in cls.leaves()}
        field_keys = {leaf.path[0]: leaf.key for leaf in cls.leaves() if len(leaf.path) == 1}
        flat: dict[str, Any] = {}
        problems: list[str] = []
        unknown: list[str] = []
        for raw_key, value in data.items():
            key = str(raw_key).removeprefix("--").replace("-", "_")
            key = field_keys.get(key, key)  # a field name (what to_dict writes) → its key
            if key in sections and isinstance(value, Mapping):
                inner, inner_problems = sections[key]._flatten(value)
                flat.update(inner)
                problems.extend(inner_problems)
            elif key in keys:
                flat[key] = value
            else:
                unknown.append(str(raw_key))
        if unknown:
            problems.insert(
                0,
                f"unknown {cls.__name__} keys: {', '.join(map(repr, unknown))}; known keys are "
                f"{', '.join(sorted(keys | set(sections)))}",
            )
        return flat, problems

    @classmethod
    def flat_values(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` (nested sections, flag keys, or a mix) by flag key, values as given;
        unknown keys are left out. For comparing saved settings, not for building."""
        return cls._flatten(data)[0]

    @classmethod
    def _build(cls, flat: Mapping[str, Any], *, where: str | None = None) -> Self:
        """Construct from flag keys, each section first, collecting every problem."""
        hints = typing.get_type_hints(cls)
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        by_field = {leaf.path[0]: leaf.key for leaf in cls.leaves() if len(leaf.path) == 1}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.metadata.get("section"):
                section_cls = hints[f.name]
                mine = {leaf.key: flat[leaf.key] for leaf in section_cls.leaves() if leaf.key in flat}
                try:
                    kwargs[f.name] = section_cls._build(mine)
                except ConfigError as exc:
                    problems.append(str(exc))
                    kwargs[f.name] = section_cls()  # keep going: report the other problems too
            elif by_field[f.name] in flat:
                value = flat[by_field[f.name]]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        missing = [flag(by_field[f.name]) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name in by_field and f.name not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]  # fmt: skip
        if missing:
            problems.append(
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (see --help)"
            )
        else:
            try:
                built = cls(**kwargs)
            except ConfigError as exc:
                problems.append(str(exc))
            except TypeError as exc:  # a value of the wrong kind reaching a comparison
                problems.append(f"{cls.__name__}: {exc}")
            else:
                if not problems:
                    return built
        raise ConfigError(f"{where + ': ' if where else ''}{'; '.join(problems)}")

    def replace(self, **values: Any) -> Self:
        """A copy with some leaves changed, by key (``config.replace(tau=5.0, lr=1e-3)``).

        Raises:
            ConfigError: an unknown key or a value that fails validation.
        """
        flat = self.flat_dict()
        unknown = [k for k in values if k not in flat]
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} keys: {', '.join(map(repr, unknown))}")
        flat.update(values)
        return self.from_dict(flat)

    # ------------------------------------------------------------------ files

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """The mapping in a ``.json``, ``.yaml`` or ``.yml`` file (not yet validated).

        Raises:
            ConfigError: the file is missing, not valid JSON/YAML, not a mapping, or sets a key twice.
        """
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {where!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {where!r} cannot be read ({exc})") from None
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            try:
                data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {where!r} is not valid YAML: {' '.join(str(exc).split())}") from None
            except ConfigError as exc:
                raise ConfigError(f"config file {where!r} {exc}") from None
        else:

            def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
                seen: dict[str, Any] = {}
                for key, value in pairs:
                    if key in seen:
                        raise ConfigError(f"config file {where!r} sets {key!r} twice")
                    seen[key] = value
                return seen

            try:
                data = json.loads(text, object_pairs_hook=no_duplicates)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"config file {where!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {where!r} must hold a mapping of settings")
        return data

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Read a config file (:meth:`read_file`) written by :meth:`to_dict` or by hand."""
        return cls.from_dict(cls.read_file(path), where=f"config file {str(path)!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise ConfigError(f"sets {', '.join(map(repr, repeated))} twice")
        return super().construct_mapping(node, deep=deep)
