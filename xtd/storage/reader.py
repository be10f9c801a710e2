"""The store reader: random access to documents, streaming with bounded memory.

A reader sees every part listed in the root manifest as one dataset of ``D``
documents in global order — sorted by ``doc_index`` — so a store written by two ranks
reads back exactly like one written by one. Only committed shards are visible (the
part records are the truth, never the files present).

Two access paths:

- ``reader[d]`` / :meth:`StoreReader.read_window`: reads only the rows of document
  ``d`` (a few chunks per array) unless its shard is already cached.
- :meth:`StoreReader.iter_documents`: loads whole shards, keeping at most
  ``cache_shards`` decoded shards (and at least one per part) in memory.

Dimension letters: ``D`` documents, ``N`` token rows, ``K`` top-k, ``C`` boundary
classes, ``H`` hidden size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import zarr

from xtd.errors import CorruptShardError, StoreFormatError
from xtd.storage.codecs import decode_topk, topk_array_names, unpack_topk
from xtd.storage.format import (
    PART_ATTR,
    SHARD_ATTR,
    TOKEN_ARRAYS_REQUIRED,
    Document,
    StoreUrl,
    checksum,
    describe_url,
    group_key,
    open_zarr_store,
    read_bytes,
    read_group_attrs,
    read_root_meta,
)
from xtd.storage.integrity import CheckedStore, check_key, check_part_record, decoding

__all__ = ["StoreReader", "open_store", "ArrayStat"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ArrayStat:
    """Size of one array over the whole store (``xtd inspect``)."""

    name: str
    dtype: str  # stored dtype
    shape: tuple[int, ...]  # rows summed over shards
    stored_bytes: int  # compressed bytes on disk (files + array metadata)
    bytes_per_token: float


@dataclasses.dataclass
class _Shard:
    part: str
    name: str
    path: str
    arrays: tuple[str, ...]  # array names in this shard
    files: dict[str, Any]  # the shard's checksum list (xtd_shard.files)
    doc_token_offsets: np.ndarray  # (D_s + 1,) int64
    doc_byte_offsets: np.ndarray  # (D_s + 1,) int64


def open_store(url: StoreUrl, *, cache_shards: int = 4) -> StoreReader:
    """Open a teacher store for reading (local folder, ``.zip``, fsspec URL or zarr Store).

    Raises:
        StoreNotFoundError: nothing at ``url``.
        StoreFormatError: not an xtd store, or an unsupported format version.
    """
    return StoreReader(url, cache_shards=cache_shards)


class StoreReader:
    """Read a teacher store as one dataset of documents in ``doc_index`` order.

    Attributes:
        attrs: the root ``xtd`` attribute (teacher, tokenizer_json, settings, layout, ...).
        tokenizer_json: the teacher's ``tokenizer.json`` text.
        boundary_classes: column names of ``boundary_logmass``.
        top_k: K of the top-k arrays (0 = none); topk_codec: their codec.
        hidden_size: H of ``hidden`` or None.
        complete: True when every part of the manifest was closed complete; training
            should refuse an incomplete store, inspect/verify may read it.
        num_tokens: token rows N over all committed documents.
        num_bytes: text bytes over all committed documents.
    """

    def __init__(self, url: StoreUrl, *, cache_shards: int = 4) -> None:
        self.url = url
        where = describe_url(url)
        # Every committed file is checked against its shard's checksum list on first read,
        # and a listed file that is absent is an error, never zarr's fill value.
        self._store = CheckedStore(open_zarr_store(url, writable=False), where=where)
        self.attrs: dict[str, Any] = read_root_meta(self._store, url)
        layout = self.attrs.get("layout", {})
        self.tokenizer_json: str = self.attrs.get("tokenizer_json", "")
        self.boundary_classes: tuple[str, ...] = tuple(self.attrs.get("boundary_classes", ()))
        self.top_k: int = int(layout.get("top_k") or 0)
        self.topk_codec: str = layout.get("topk_codec", "q8")
        self.hidden_size: int | None = layout.get("hidden_size") or None
        self.text_coverage: str = self.attrs.get("text_coverage", "full")
        self.parts: dict[str, dict[str, Any] | None] = {}
        self._shards: list[_Shard] = []
        doc_index_chunks: list[np.ndarray] = []
        manifest = self.attrs.get("manifest")
        parts = manifest.get("parts") if isinstance(manifest, dict) else None
        if not isinstance(parts, list):
            raise StoreFormatError(f"store {where!r}: the root manifest holds no list of parts")
        for part in parts:
            check_key(part, what="part name", where=where)
            record = (read_group_attrs(self._store, part) or {}).get(PART_ATTR)
            self.parts[part] = record
            if record is None:
                continue
            check_part_record(record, part, where=where)
            entries = [(f"{part}/{e['name']}", e) for e in record["shards"]]
            files = [self._shard_files(path, entry) for path, entry in entries]
            self._store.check_present(part)
            for (path, entry), listed in zip(entries, files, strict=True):
                names = self._array_names(entry.get("optional_arrays") or [])
                doc_index_chunks.append(self._read_all(path, "doc_index"))
                self._shards.append(
                    _Shard(
                        part=part,
                        name=entry["name"],
                        path=path,
                        arrays=names,
                        files=listed,
                        doc_token_offsets=self._read_all(path, "doc_token_offsets"),
                        doc_byte_offsets=self._read_all(path, "doc_byte_offsets"),
                    )
                )
        self.complete: bool = bool(self.parts) and all(
            rec is not None and rec.get("complete") for rec in self.parts.values()
        )
        counts = [len(s.doc_token_offsets) - 1 for s in self._shards]
        doc_index = np.concatenate(doc_index_chunks) if doc_index_chunks else np.zeros(0, np.int64)
        shard_of = np.repeat(np.arange(len(self._shards), dtype=np.int64), counts)
        local = (
            np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
            if counts
            else np.zeros(0, np.int64)
        )
        order = np.argsort(doc_index, kind="stable")
        self.doc_index: np.ndarray = doc_index[order]  # (D,) int64, sorted
        self._doc_shard = shard_of[order]
        self._doc_local = local[order]
        self.num_tokens: int = int(sum(int(s.doc_token_offsets[-1]) for s in self._shards))
        self.num_bytes: int = int(sum(int(s.doc_byte_offsets[-1]) for s in self._shards))
        self._cache_shards = max(1, cache_shards)
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._handles: OrderedDict[tuple[int, str], zarr.Array] = OrderedDict()
        self._tables: dict[int, np.ndarray] = {}  # shard -> topk_id_table (small)

    # ----------------------------------------------------------------- layout

    def _array_names(self, optional: list[str]) -> tuple[str, ...]:
        names = list(TOKEN_ARRAYS_REQUIRED)
        if self.top_k:
            names += [*topk_array_names(self.topk_codec), "tail_logmass"]
        if self.hidden_size:
            names.append("hidden")
        if "token_slot" in optional:
            names.append("token_slot")
        if "loss_spans" in optional:
            names += ["loss_span_offsets", "loss_spans"]
        return ("text", *names)

    def _shard_files(self, path: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Check a shard's ``zarr.json`` against the part record; register its checksum list."""
        where = self._store.where
        blob = read_bytes(self._store, group_key(path))
        if blob is None or checksum(blob) != entry.get("zarr_json_crc32c"):
            what = "is missing" if blob is None else "does not match the checksum in the part record"
            raise CorruptShardError(
                f"store {where!r} is damaged: {group_key(path)} {what}; `xtd verify {where}` lists "
                "every problem"
            )
        try:
            files = json.loads(blob)["attributes"][SHARD_ATTR]["files"]
        except (ValueError, KeyError, TypeError):
            raise StoreFormatError(
                f"store {where!r}: {group_key(path)} holds no shard record with a checksum list; "
                f"`xtd verify {where}` lists every problem"
            ) from None
        self._store.expect(path, files)
        return files

    def _decoding(self, path: str, name: str) -> Any:
        where = self._store.where
        return decoding(where, f"array {name!r} of {path}", f"`xtd verify {where}` lists every problem")

    def _open(self, path: str, name: str) -> zarr.Array:
        with self._decoding(path, name):
            return zarr.open_array(self._store, path=f"{path}/{name}", mode="r")

    def _read_all(self, path: str, name: str) -> np.ndarray:
        arr = self._open(path, name)
        with self._decoding(path, name):
            return arr[...]

    def _handle(self, s: int, name: str) -> zarr.Array:
        key = (s, name)
        arr = self._handles.get(key)
        if arr is None:
            arr = self._open(self._shards[s].path, name)
            self._handles[key] = arr
            if len(self._handles) > 64 * 16:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(key)
        return arr

    @property
    def num_shards(self) -> int:
        """Committed shards over all parts."""
        return len(self._shards)

    def __len__(self) -> int:
        return int(len(self._doc_shard))

    def doc_num_tokens(self) -> np.ndarray:
        """(D,) int64 token rows of every document in global order (for batching)."""
        per_shard = [np.diff(s.doc_token_offsets) for s in self._shards]
        if not per_shard:
            return np.zeros(0, np.int64)
        flat = np.concatenate(per_shard)
        starts = np.concatenate([[0], np.cumsum([len(p) for p in per_shard])[:-1]])
        return flat[starts[self._doc_shard] + self._doc_local]

    # ----------------------------------------------------------------- access

    def _locate(self, d: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= d < n:
            raise IndexError(f"document {d} out of range: the store has {n} documents")
        d %= n
        return int(self._doc_shard[d]), int(self._doc_local[d])

    def __getitem__(self, d: int) -> Document:
        """Document ``d`` in global order (sorted by ``doc_index``), every stored quantity."""
        return self.document(d)

    def document(self, d: int, *, topk: bool = True, hidden: bool = True) -> Document:
        """Document ``d``; ``topk=False`` / ``hidden=False`` skip reading those arrays
        (the largest ones) and leave their fields None."""
        s, j = self._locate(d)
        shard = self._shards[s]
        t0, t1 = (int(x) for x in shard.doc_token_offsets[j : j + 2])
        return self._document(s, j, t0, t1, topk=topk, hidden=hidden)

    def read_window(self, d: int, start: int, stop: int, *, topk: bool = True, hidden: bool = True) -> Document:
        """Token rows ``[start, stop)`` of document ``d`` (text is the whole document).

        Spans stay relative to the document's bytes, so they index ``doc.text`` directly.
        ``topk`` / ``hidden`` as in :meth:`document`.
        """
        s, j = self._locate(d)
        shard = self._shards[s]
        t0, t1 = (int(x) for x in shard.doc_token_offsets[j : j + 2])
        lo, hi = max(0, start), min(t1 - t0, stop)
        return self._document(s, j, t0 + lo, t0 + max(lo, hi), topk=topk, hidden=hidden)

    def _rows(self, s: int, name: str, lo: int, hi: int) -> np.ndarray:
        cached = self._cache.get(s)
        if cached is not None:
            return cached[name][lo:hi]
        arr = self._handle(s, name)
        with self._decoding(self._shards[s].path, name):
            return arr[lo:hi]

    def _document(self, s: int, j: int, t0: int, t1: int, *, topk: bool = True, hidden: bool = True) -> Document:
        shard = self._shards[s]
        b0, b1 = (int(x) for x in shard.doc_byte_offsets[j : j + 2])
        doc = Document(
            text=self._rows(s, "text", b0, b1).tobytes(),
            token_ids=self._rows(s, "token_ids", t0, t1),
            token_spans=self._rows(s, "token_spans", t0, t1),
            token_logprob=self._rows(s, "token_logprob", t0, t1),
            boundary_logmass=self._rows(s, "boundary_logmass", t0, t1),
            doc_index=self._shard_doc_index(s, j),
        )
        if self.top_k and topk:
            doc.topk_ids, values = self._topk(s, t0, t1)
            doc.topk_logprobs = decode_topk(values, self.topk_codec)
            doc.tail_logmass = self._rows(s, "tail_logmass", t0, t1)
        if self.hidden_size and hidden:
            doc.hidden = self._rows(s, "hidden", t0, t1)
        if "token_slot" in shard.arrays:
            doc.token_slot = self._rows(s, "token_slot", t0, t1)
        if "loss_spans" in shard.arrays:
            l0, l1 = (int(x) for x in self._rows(s, "loss_span_offsets", j, j + 2))
            doc.loss_spans = self._rows(s, "loss_spans", l0, l1)
        return doc

    def _topk(self, s: int, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[t0, t1)`` of shard ``s``: (n, K) int32 ids and quantised values, canonical order."""
        cached = self._cache.get(s)
        if cached is not None:
            return cached["topk_ids"][t0:t1], cached["topk_values"][t0:t1]
        stored = {
            name: self._rows(s, name, t0, t1)
            for name in topk_array_names(self.topk_codec)
            if name != "topk_id_table"
        }
        table = self._tables.get(s)
        if table is None:
            table = self._tables[s] = self._rows(s, "topk_id_table", 0, None)  # type: ignore[arg-type]
        stored["topk_id_table"] = table
        return unpack_topk(stored, self.topk_codec)

    def _shard_doc_index(self, s: int, j: int) -> int:
        cached = self._cache.get(s)
        if cached is not None:
            return int(cached["doc_index"][j])
        return int(self._rows(s, "doc_index", j, j + 1)[0])

    # ----------------------------------------------------------------- streaming

    def _load_shard(self, s: int) -> None:
        """Decode every array of shard ``s`` into the LRU cache."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return
        shard = self._shards[s]
        data = {name: self._rows(s, name, 0, None) for name in (*shard.arrays, "doc_index")}  # type: ignore[arg-type]
        if self.top_k:
            # Decode the whole shard's top-k once: documents then slice it.
            with self._decoding(shard.path, "topk_ids"):
                ids, values = unpack_topk(data, self.topk_codec)
            for name in topk_array_names(self.topk_codec):
                del data[name]
            data["topk_ids"], data["topk_values"] = ids, values
        self._cache[s] = data
        while len(self._cache) > self._cache_limit():
            self._cache.popitem(last=False)

    def _cache_limit(self) -> int:
        # Global order interleaves parts, so streaming needs one live shard per part.
        return max(self._cache_shards, len(self.parts) + 1)

    def iter_documents(self, indices: Iterable[int] | None = None) -> Iterator[Document]:
        """Yield documents (default: all, in global order), loading whole shards.

        Memory stays bounded by ``max(cache_shards, parts + 1)`` decoded shards.
        """
        for d in range(len(self)) if indices is None else indices:
            s, _ = self._locate(d)
            self._load_shard(s)
            yield self[d]

    def __iter__(self) -> Iterator[Document]:
        return self.iter_documents()

    # ----------------------------------------------------------------- sizes

    def array_stats(self) -> list[ArrayStat]:
        """Stored size of every array (from the checksummed file list of each shard)."""
        stored: dict[str, int] = {}
        rows: dict[str, int] = {}
        dtypes: dict[str, str] = {}
        tails: dict[str, tuple[int, ...]] = {}
        for s, shard in enumerate(self._shards):
            for rel, info in shard.files.items():
                name = rel.split("/", 1)[0]
                stored[name] = stored.get(name, 0) + int(info["bytes"])
            for name in (*shard.arrays, "doc_index", "doc_token_offsets", "doc_byte_offsets"):
                arr = self._handle(s, name)
                rows[name] = rows.get(name, 0) + int(arr.shape[0])
                dtypes[name] = str(arr.dtype)
                tails[name] = tuple(int(x) for x in arr.shape[1:])
        n = max(self.num_tokens, 1)
        return [
            ArrayStat(
                name,
                dtypes[name],
                (rows[name], *tails[name]),
                stored.get(name, 0),
                stored.get(name, 0) / n,
            )
            for name in sorted(rows, key=_array_order)
        ]

    def close(self) -> None:
        """Drop caches and close the underlying store."""
        self._cache.clear()
        self._handles.clear()
        self._tables.clear()
        self._store.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into DataLoader workers: drop caches and open handles, keep the rest.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_handles"] = OrderedDict()
        state["_tables"] = {}
        return state


_ORDER = (
    "doc_index doc_token_offsets doc_byte_offsets text token_ids token_spans token_logprob "
    "boundary_logmass topk_ids topk_logprobs topk_floor topk_id_table tail_logmass hidden token_slot "
    "loss_span_offsets loss_spans"
).split()


def _array_order(name: str) -> int:
    return _ORDER.index(name) if name in _ORDER else len(_ORDER)
