"""Cached per-document ragged arrays keyed by a name: ``alignments/<digest>/``.

``xtd align --cache`` stores, for one student tokenizer (``digest``), the student
tokenization and chunk ids of every document so training need not recompute them.
The group is generic: any set of named ragged arrays, one row block per document in
the store's global order (sorted by ``doc_index``). Each array ``name`` is stored as
``name`` (rows, ...) plus ``name_offsets`` (D + 1,) int64. Arrays whose name starts
with ``teacher_`` have one row per teacher token (``verify`` checks the counts).

The group is written in one pass and becomes visible only when its record (with the
checksum of every file and ``complete: true``) is written last.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import zarr

from xtd.errors import ConfigError, DataError, StoreExistsError, StoreFormatError
from xtd.storage.codecs import compressors_for
from xtd.storage.format import (
    ALIGNMENT_ATTR,
    CHECKSUM_ALGORITHM,
    StoreUrl,
    describe_url,
    file_checksums,
    list_dir,
    open_zarr_store,
    read_group_attrs,
    read_root_meta,
    remove_node,
    write_group_json,
)
from xtd.storage.integrity import CheckedStore, check_key, decoding

__all__ = ["write_alignment", "read_alignment", "list_alignments", "AlignmentReader"]

logger = logging.getLogger(__name__)

_FLUSH_ROWS = 1 << 18
_CHUNK_ROWS = 1 << 14


def list_alignments(url: StoreUrl) -> list[str]:
    """Digests of the complete alignment groups of a store."""
    store = open_zarr_store(url, writable=False)
    read_root_meta(store, url)
    out = []
    for digest in list_dir(store, "alignments/"):
        meta = (read_group_attrs(store, f"alignments/{digest}") or {}).get(ALIGNMENT_ATTR)
        if meta and meta.get("complete"):
            out.append(digest)
    return out


def write_alignment(
    url: StoreUrl,
    digest: str,
    documents: Iterable[Mapping[str, np.ndarray]],
    *,
    num_documents: int,
    attrs: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write one ragged array group for every document of the store, in global order.

    Args:
        url: the store (writable: a folder or fsspec URL, not a zip).
        digest: the key, e.g. the student tokenizer digest (letters, digits, ``-_``).
        documents: per document, ``{name: array}`` with rows along axis 0 (e.g.
            ``student_ids`` (S,) int32, ``student_spans`` (S, 2) int32,
            ``student_chunk`` (S,) int32, ``teacher_chunk`` (T,) int32). Every document
            must carry the same names, dtypes and trailing shapes.
        num_documents: documents the store holds (the iterable must yield exactly that many).
        attrs: extra JSON kept in the record (e.g. the student tokenizer name).
        overwrite: replace an existing group of the same digest.

    Raises:
        StoreExistsError: a complete group with this digest exists and not ``overwrite``.
        DataError: inconsistent names/dtypes, or a document count other than ``num_documents``.
    """
    if not digest or not all(c.isalnum() or c in "-_" for c in digest):
        raise ConfigError(f"alignment digest {digest!r} must be letters, digits, '-' or '_'")
    store = open_zarr_store(url, writable=True)
    read_root_meta(store, url)
    path = f"alignments/{digest}"
    existing = (read_group_attrs(store, path) or {}).get(ALIGNMENT_ATTR)
    if existing and existing.get("complete") and not overwrite:
        raise StoreExistsError(
            f"store {str(url)!r} already caches alignment {digest!r}; pass --overwrite to rebuild it"
        )
    remove_node(store, path)
    new_parent = read_group_attrs(store, "alignments") is None
    if new_parent:
        write_group_json(store, "alignments", {})
    write_group_json(store, path, {ALIGNMENT_ATTR: {"complete": False}})
    try:
        _fill(store, path, digest, documents, num_documents, attrs)
    except BaseException:
        # A failed write (bad input, a damaged store read while aligning, Ctrl-C) leaves
        # nothing behind; only a killed writer leaves an incomplete group, which readers
        # ignore and verify reports.
        remove_node(store, path)
        if new_parent and list_dir(store, "alignments/") in ([], ["zarr.json"]):
            remove_node(store, "alignments")
        raise


def _fill(
    store: Any,
    path: str,
    digest: str,
    documents: Iterable[Mapping[str, np.ndarray]],
    num_documents: int,
    attrs: dict[str, Any] | None,
) -> None:
    """Write the arrays of one alignment group, then its record (``complete: true``)."""
    group = zarr.open_group(store, path=path, mode="r+")
    arrays: dict[str, zarr.Array] = {}
    offsets: dict[str, list[int]] = {}
    buffers: dict[str, list[np.ndarray]] = {}
    buffered = 0
    count = 0
    for doc in documents:
        if not arrays:
            for name, value in doc.items():
                value = np.asarray(value)
                arrays[name] = group.create_array(
                    name,
                    shape=(0, *value.shape[1:]),
                    dtype=value.dtype,
                    chunks=(_CHUNK_ROWS, *value.shape[1:]),
                    compressors=compressors_for(name, value.dtype),
                    fill_value=0,
                )
                offsets[name] = [0]
                buffers[name] = []
        if set(doc) != set(arrays):
            raise DataError(
                f"alignment document {count}: arrays {sorted(doc)}, expected {sorted(arrays)}"
            )
        for name, value in doc.items():
            value = np.asarray(value)
            if value.dtype != arrays[name].dtype or value.shape[1:] != arrays[name].shape[1:]:
                raise DataError(
                    f"alignment document {count}: {name} is {value.dtype} {value.shape}, expected "
                    f"{arrays[name].dtype} rows × {arrays[name].shape[1:]}"
                )
            buffers[name].append(value)
            offsets[name].append(offsets[name][-1] + len(value))
            buffered += len(value)
        count += 1
        if buffered >= _FLUSH_ROWS:
            _append(arrays, buffers)
            buffered = 0
    if count != num_documents:
        raise DataError(
            f"alignment {digest!r}: got {count} documents, the store has {num_documents}"
        )
    _append(arrays, buffers)
    for name, off in offsets.items():
        group.create_array(
            f"{name}_offsets",
            data=np.asarray(off, dtype=np.int64),
            chunks=(max(1, min(len(off), 1 << 16)),),
            compressors=compressors_for("doc_token_offsets", np.dtype(np.int64)),
        )
    files = file_checksums(store, path)
    record = {
        "complete": True,
        "documents": count,
        "arrays": sorted(arrays),
        "checksum": CHECKSUM_ALGORITHM,
        "files": files,
        "attrs": attrs or {},
    }
    write_group_json(store, path, {ALIGNMENT_ATTR: record})
    logger.info("cached alignment %s: %d documents", digest, count)


def _append(arrays: dict[str, zarr.Array], buffers: dict[str, list[np.ndarray]]) -> None:
    for name, parts in buffers.items():
        if parts:
            arrays[name].append(np.concatenate(parts, axis=0), axis=0)
            parts.clear()


class AlignmentReader:
    """Random access to one cached alignment group: ``reader[d] -> {name: rows}``."""

    def __init__(self, url: StoreUrl, digest: str) -> None:
        where = describe_url(url)
        # Files are checked against the group's checksum list on first read (as shards are).
        self._store = CheckedStore(open_zarr_store(url, writable=False), where=where)
        read_root_meta(self._store, url)
        check_key(digest, what="alignment digest", where=where)
        path = f"alignments/{digest}"
        meta = (read_group_attrs(self._store, path) or {}).get(ALIGNMENT_ATTR)
        if meta is None or not meta.get("complete"):
            raise StoreFormatError(
                f"store {str(url)!r} has no complete alignment {digest!r}; run xtd align --cache"
            )
        self.digest = digest
        self.attrs: dict[str, Any] = meta.get("attrs", {})
        names = meta.get("arrays")
        if not isinstance(names, list):
            raise StoreFormatError(f"store {where!r}: {path} lists no arrays; run xtd verify")
        self.names: tuple[str, ...] = tuple(check_key(n, what="array name", where=where) for n in names)
        self._len = int(meta["documents"])
        self._store.expect(path, meta.get("files"))
        self._store.check_present(path)
        with decoding(where, f"cached alignment {digest!r}", "rebuild it with xtd align --cache --overwrite"):
            self._arrays = {
                n: zarr.open_array(self._store, path=f"{path}/{n}", mode="r") for n in self.names
            }
            self._offsets = {
                n: zarr.open_array(self._store, path=f"{path}/{n}_offsets", mode="r")[...]
                for n in self.names
            }

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, d: int) -> dict[str, np.ndarray]:
        if not -self._len <= d < self._len:
            raise IndexError(f"document {d} out of range: the alignment has {self._len} documents")
        d %= self._len
        return {
            n: self._arrays[n][int(self._offsets[n][d]) : int(self._offsets[n][d + 1])]
            for n in self.names
        }


def read_alignment(url: StoreUrl, digest: str) -> AlignmentReader:
    """Open the cached alignment group ``digest`` of a store.

    Raises:
        StoreFormatError: no complete group with that digest.
    """
    return AlignmentReader(url, digest)
