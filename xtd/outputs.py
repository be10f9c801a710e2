"""What xtd may write and delete: output folders, the run-folder marker, canonical locations.

xtd writes only into a new or empty folder, or into one it recognises as its own by its
own metadata — a teacher store by the ``xtd`` attribute of its root ``zarr.json``
(:mod:`xtd.storage.writer`), a training run folder by the :data:`RUN_MARKER` file that
``xtd train`` writes first — and it deletes only what it wrote there. A folder holding
anything else is refused whatever the flags, with a message that names a way out other
than ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xtd.errors import OutputError, XtdError

__all__ = [
    "RUN_MARKER",
    "canonical_location",
    "check_output_folder",
    "writing",
    "folder_listing",
    "is_run_folder",
    "read_run_marker",
    "write_run_marker",
]

RUN_MARKER = ".xtd-run"
"""File that marks a folder as an ``xtd train`` run folder (JSON, written before anything else)."""
_RUN_FORMAT = "xtd-run"
_LEGACY_RUN_CONFIG = "train_config.json"  # run folders written before the marker existed


def canonical_location(url: str) -> str:
    """A store path or URL in one canonical form, for comparing settings.

    A local path (``runs/t``, ``./runs/t/``, ``file:///abs/runs/t``) becomes its absolute,
    symlink-resolved path; a URL keeps its scheme and loses a trailing ``/``.
    """
    text = str(url)
    if "://" in text and not text.startswith("file://"):
        return text.rstrip("/")
    return os.path.realpath(Path(text.removeprefix("file://")).expanduser())


def check_output_folder(path: str | os.PathLike[str], *, what: str) -> None:
    """Raise unless ``path`` is a folder xtd can write into, or can be created as one.

    Checked before any model loads, so a mistyped output path costs nothing.

    Raises:
        OutputError: ``path`` is a file, lies under a file, or its nearest existing
            folder is not writable.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a file, not a folder; choose a folder path")
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create {what} {str(path)!r}: {str(ancestor)!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {str(path)!r}: {str(ancestor)!r} is not writable")


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike[str], advice: str = "") -> Iterator[None]:
    """Turn an operating-system write failure into one clear error naming the user's path.

    Only the reason (``strerror``: "No space left on device", "Read-only file system") is
    kept: the failing file is often a temporary name the user never chose.
    """
    try:
        yield
    except XtdError:
        raise
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(
            f"cannot write {what} {str(path)!r}: {reason}" + (f" — {advice}" if advice else "")
        ) from None


def folder_listing(path: Path, limit: int = 3) -> str:
    """``'a.txt', 'b/', ...``: the first entries of a folder, for messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(repr(n) for n in names[:limit]) + (", ..." if len(names) > limit else "")


def read_run_marker(folder: Path) -> dict[str, Any] | None:
    """The run marker of ``folder``; None when the folder is not an xtd run folder.

    A folder written before the marker existed is recognised by a ``train_config.json``
    holding an xtd train config (a JSON object with ``store``, ``out`` and ``losses``).
    """
    try:
        marker = json.loads((folder / RUN_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("format") == _RUN_FORMAT:
        return marker
    try:
        legacy = json.loads((folder / _LEGACY_RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(legacy, dict) and {"store", "out", "losses"} <= set(legacy):
        done = (folder / "xtd_student.json").exists()  # the model is saved last
        return {"format": _RUN_FORMAT, "complete": done, "steps": legacy.get("max_steps") if done else None}
    return None


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` is an ``xtd train`` run folder (see :func:`read_run_marker`)."""
    return read_run_marker(folder) is not None


def write_run_marker(folder: Path, **info: Any) -> None:
    """Write (replace) the run marker with ``info`` (e.g. ``complete``, ``steps``), atomically."""
    from xtd import __version__

    tmp = folder / f"{RUN_MARKER}.tmp"
    tmp.write_text(json.dumps({"format": _RUN_FORMAT, "xtd_version": __version__, **info}, indent=1))
    os.replace(tmp, folder / RUN_MARKER)
