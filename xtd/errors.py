"""The error hierarchy of xtd.

Every error a user can cause derives from :class:`XtdError`; the command line turns
it into one ``error: ...`` line and exit code 1 (``xtd.cli.main``). Subclasses also
inherit the matching builtin, so ``except FileNotFoundError`` keeps working for
callers of the Python API.
"""

from __future__ import annotations

__all__ = [
    "XtdError",
    "XtdWarning",
    "ConfigError",
    "DataError",
    "StoreNotFoundError",
    "StoreFormatError",
    "StoreExistsError",
    "CorruptShardError",
    "TokenizerError",
    "TokenizerMismatchError",
    "ByteIdentityError",
    "ModelLoadError",
    "OutputError",
    "CheckpointError",
]


class XtdError(Exception):
    """Root of every error that xtd reports to a user as one line."""


class XtdWarning(UserWarning):
    """Warnings issued by xtd (e.g. a stripped Unicode normaliser)."""


class ConfigError(XtdError, ValueError):
    """An invalid option, flag combination or config file."""


class DataError(XtdError, ValueError):
    """Input data that cannot be used: missing field, empty dataset, invalid UTF-8."""


class StoreNotFoundError(XtdError, FileNotFoundError):
    """No teacher store at the given path or URL."""


class StoreFormatError(XtdError, ValueError):
    """A path that is not an xtd store, or a store of an unsupported format version."""


class StoreExistsError(XtdError, FileExistsError):
    """A store exists with other settings and ``--overwrite`` was not given."""


class CorruptShardError(XtdError, OSError):
    """A stored file whose checksum or structure does not match the metadata."""


class TokenizerError(XtdError, ValueError):
    """A tokenizer that cannot be loaded or used."""


class TokenizerMismatchError(TokenizerError):
    """Two tokenizers (or a tokenizer and a store/model) that do not belong together."""


class ByteIdentityError(TokenizerError):
    """Token byte views that do not reproduce the text's bytes exactly (docs/method.md, "Byte view of a tokenizer")."""


class ModelLoadError(XtdError, OSError):
    """A model that transformers cannot load from the given name or folder."""


class OutputError(XtdError, OSError):
    """An output path that cannot be written: read-only, not a folder, a full disk."""


class CheckpointError(XtdError, OSError):
    """A training checkpoint that cannot be loaded safely (damaged, foreign or crafted)."""
