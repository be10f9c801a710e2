"""What is already at a store's path, and whether a writer may continue it.

A writer never writes into, or deletes, a folder that is not recognisably an xtd store
(:func:`classify`; :func:`existing_store` asks before any expensive work). An xtd store
is continued only by a writer with the same identity (:func:`identity`: the settings,
teacher, data, tokenizer, layout and world size of its root attribute); every difference
is named (:func:`differences`). When the caller extends a store with more records of the
same data, the keys in :data:`EXTENDABLE` may differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zarr.abc.store import Store

from xtd.errors import StoreExistsError, StoreFormatError
from xtd.outputs import check_output_folder
from xtd.storage.format import (
    FORMAT_NAME,
    ROOT_ATTR,
    StoreUrl,
    digest_text,
    list_dir,
    open_zarr_store,
    read_group_attrs,
)

__all__ = [
    "IDENTITY_ATTRS",
    "EXTENDABLE",
    "ALIGNMENTS_DIR",
    "classify",
    "existing_store",
    "identity",
    "differences",
    "is_part_name",
]

# Root attributes that, when they differ, make a store "written with other settings".
IDENTITY_ATTRS = ("settings", "teacher", "dataset", "boundary_classes", "text_coverage")
# What may differ when a store is extended with more documents of the same data (the
# caller, which knows the data, has checked that the stored documents are its prefix).
EXTENDABLE = ("dataset", "settings.limit")
ALIGNMENTS_DIR = "alignments"


def identity(meta: dict[str, Any], ignored: tuple[str, ...] = ()) -> dict[str, Any]:
    """What must be equal for a writer to continue the store described by ``meta``.

    Args:
        meta: a root ``xtd`` attribute.
        ignored: keys left out, top-level (``"dataset"``) or one level down (``"settings.limit"``).
    """
    ident = {key: meta.get(key) for key in IDENTITY_ATTRS}
    for dotted in ignored:
        key, _, sub = dotted.partition(".")
        if not sub:
            ident.pop(key, None)
        elif isinstance(ident.get(key), dict):
            ident[key] = {k: v for k, v in ident[key].items() if k != sub}
    ident["text_coverage"] = ident["text_coverage"] or "full"
    ident["tokenizer_json"] = digest_text(meta.get("tokenizer_json") or "")
    layout = meta.get("layout", {})
    for key in ("top_k", "topk_codec", "hidden_size", "shard_tokens", "chunk_rows"):
        ident[key] = layout.get(key)
    ident["world_size"] = meta.get("manifest", {}).get("world_size")
    ident["format_version"] = meta.get("format_version")
    return ident


def classify(store: Store, where: str) -> tuple[dict[str, Any] | None, list[str]]:
    """What is at a store's root: (its ``xtd`` attribute, or None when empty; the root's entries).

    Raises:
        StoreExistsError: the root holds anything and is not an xtd store (including a
            root ``zarr.json`` that cannot be read): xtd never writes into it or deletes it.
    """
    try:
        root_attrs = read_group_attrs(store, "")
        readable = True
    except StoreFormatError:  # an array, or metadata that is not valid JSON
        root_attrs, readable = None, False
    existing = None if root_attrs is None else root_attrs.get(ROOT_ATTR)
    children = list_dir(store, "")
    if isinstance(existing, dict) and existing.get("format") == FORMAT_NAME:
        return existing, children
    # Other ranks may already have created their parts: those are not foreign content.
    foreign = [c for c in children if c != "zarr.json" and not is_part_name(c)]
    if root_attrs is not None or not readable or foreign:
        shown = ", ".join(repr(c) for c in children[:3]) + (", ..." if len(children) > 3 else "")
        what = "its zarr.json cannot be read" if not readable else f"it holds {shown}"
        raise StoreExistsError(
            f"{where!r} is not an xtd store and is not empty ({what}); xtd writes only into an "
            "empty folder or a store it wrote, and never deletes other files — choose another output path"
        )
    return None, children


def existing_store(url: StoreUrl) -> dict[str, Any] | None:
    """The root ``xtd`` attribute of the store a writer would open at ``url``; None if nothing is there.

    Reads only (creates nothing), so callers run it before any expensive work.

    Raises:
        StoreExistsError: ``url`` holds something that is not an xtd store.
        OutputError: a local path that cannot be written.
        ConfigError: a zip file, or a URL scheme fsspec cannot open.
    """
    text = str(url)
    local = isinstance(url, Path) or ("://" not in text or text.startswith("file://"))
    if local and not isinstance(url, Store):
        path = Path(text.removeprefix("file://")).expanduser()
        if path.suffix.lower() == ".zip":
            open_zarr_store(url, writable=True)  # raises the zip error
        check_output_folder(path, what="store")
        if not path.exists():
            return None
    store = open_zarr_store(url, writable=False)
    try:
        return classify(store, text)[0]
    finally:
        store.close()


def is_part_name(name: str) -> bool:
    return name.startswith("part-") and name[5:].isdigit()


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable ``key: store value vs new value`` lines for every differing leaf."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif _normal(a) != _normal(b):
            out.append(f"{prefix}{key}: {_short(a)} in the store vs {_short(b)} now")
    return out


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _short(value: Any) -> str:
    text = repr(_normal(value))
    return text if len(text) <= 60 else text[:57] + "..."
