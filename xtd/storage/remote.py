"""Stores that are not local folders: URL schemes, the optional package each needs, Hub URLs.

A store URL is a local path, ``file://…``, or any fsspec URL. Object stores are read and
written through fsspec's optional packages; a missing one is a one-line error naming the
xtd extra that installs it (``pip install 'xtd[s3]'``), never fsspec's import traceback.

Hugging Face Hub dataset repos are addressed as ``hf://datasets/ORG/NAME`` (optionally
``@REVISION`` after the name and a folder inside the repo after that), the form
``huggingface_hub``'s fsspec filesystem reads, so a store on the Hub opens in place.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from xtd.errors import ConfigError

__all__ = [
    "SCHEME_EXTRAS",
    "HubLocation",
    "is_remote",
    "scheme",
    "missing_package_error",
    "parse_hub_url",
]

# scheme -> (the package fsspec needs, the xtd extra that installs it)
SCHEME_EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "hf": ("huggingface_hub", "hub"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
}

_HUB_URL = re.compile(
    r"hf://(?P<kind>datasets|models|spaces)/(?P<org>[\w.-]+)/(?P<name>[\w.-]+?)"
    r"(?:@(?P<revision>[^/]+))?(?:/(?P<path>.*))?"
)


def is_remote(url: Any) -> bool:
    """Whether ``url`` is an fsspec URL other than ``file://`` (a zarr Store object is not)."""
    text = url if isinstance(url, str) else ""
    return "://" in text and not text.startswith("file://")


def scheme(url: str) -> str:
    """The URL scheme (``"s3"``), or ``""`` for a local path."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def missing_package_error(url: str, exc: BaseException) -> ConfigError:
    """The one-line error for a URL whose fsspec package is not installed.

    Args:
        url: the URL the user gave.
        exc: the ImportError fsspec raised (its text names the package).
    """
    proto = scheme(url)
    if proto in SCHEME_EXTRAS:
        package, extra = SCHEME_EXTRAS[proto]
        return ConfigError(
            f"cannot open {url!r}: {proto}:// URLs need the {package} package, which is not "
            f"installed — pip install 'xtd[{extra}]'"
        )
    return ConfigError(
        f"cannot open {url!r}: {exc} (fsspec reads {proto}:// URLs through that package; "
        "pip install it, or use a local path)"
    )


@dataclasses.dataclass(frozen=True)
class HubLocation:
    """Where a store lives on the Hugging Face Hub.

    Attributes:
        repo_id: ``ORG/NAME``.
        repo_type: ``"dataset"`` (also ``"model"`` or ``"space"``).
        revision: a branch, tag or commit, or None for the default branch.
        path_in_repo: a folder inside the repo (``""`` = the repo root).
    """

    repo_id: str
    repo_type: str
    revision: str | None
    path_in_repo: str

    def url(self) -> str:
        """The canonical ``hf://`` URL (what fsspec opens)."""
        kind = {"dataset": "datasets", "model": "models", "space": "spaces"}[self.repo_type]
        rev = f"@{self.revision}" if self.revision else ""
        tail = f"/{self.path_in_repo}" if self.path_in_repo else ""
        return f"hf://{kind}/{self.repo_id}{rev}{tail}"

    def repo_path(self, key: str) -> str:
        """The path inside the repo of the store key ``key``."""
        return f"{self.path_in_repo}/{key}" if self.path_in_repo else key


def parse_hub_url(url: str) -> HubLocation:
    """Parse ``hf://datasets/ORG/NAME[@REVISION][/PATH]``.

    Raises:
        ConfigError: not of that form (the message shows the expected one).
    """
    match = _HUB_URL.fullmatch(url.rstrip("/"))
    if match is None:
        raise ConfigError(
            f"{url!r} is not a Hugging Face Hub URL of the form hf://datasets/ORG/NAME "
            "(optionally @REVISION and a folder: hf://datasets/ORG/NAME@main/teacher)"
        )
    kind = match["kind"][:-1]
    path = (match["path"] or "").strip("/")
    if any(part in ("", ".", "..") for part in path.split("/")) and path:
        raise ConfigError(f"{url!r}: the folder inside the repo must not contain '.', '..' or '//'")
    return HubLocation(match["org"] + "/" + match["name"], kind, match["revision"], path)


def local_path(url: str | Path) -> Path:
    """The local path of a non-remote URL (``file://`` stripped, ``~`` expanded)."""
    return Path(str(url).removeprefix("file://")).expanduser()
