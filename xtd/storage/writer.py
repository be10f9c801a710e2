"""The store writer: one document at a time, whole shards, atomic commits, resume.

A writer owns one part (``part-<rank>``) of a store. Documents are buffered until they
hold at least ``shard_tokens`` token rows; the buffer is then written as one new,
immutable shard group, the checksum of every file of that shard is recorded in the
shard's ``zarr.json``, and only then is the part record (the part's ``zarr.json``)
rewritten — in one atomic object write — to list the shard and advance
``documents_committed``. A kill at any moment therefore loses at most the buffer and
never leaves a part that claims a shard it does not fully have; a half-written shard
is an orphan that no reader looks at and that the next writer deletes.

Shard boundaries depend only on the documents (a shard closes as soon as it reaches
``shard_tokens`` rows), so resuming after the watermark reproduces exactly the files
of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from zarr.abc.store import Store
from zarr.core.sync import sync

from xtd.errors import ConfigError, StoreExistsError, StoreFormatError
from xtd.outputs import writing
from xtd.storage.card import write_card
from xtd.storage.codecs import (
    TOPK_CODECS,
    compressors_for,
    filters_for,
)
from xtd.storage.format import (
    BOUNDARY_CLASSES,
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    FORMAT_VERSION,
    PART_ATTR,
    ROOT_ATTR,
    SHARD_ATTR,
    Document,
    StoreUrl,
    checksum,
    describe_quantities,
    describe_url,
    file_checksums,
    list_dir,
    open_zarr_store,
    part_name,
    read_group_attrs,
    remove_node,
    shard_name,
    write_group_json,
)
from xtd.storage.identity import (
    ALIGNMENTS_DIR,
    EXTENDABLE,
    classify,
    differences,
    identity,
    is_part_name,
)
from xtd.storage.integrity import check_part_record
from xtd.storage.shards import normalise_document, shard_arrays

__all__ = ["StoreWriter", "DEFAULT_SHARD_TOKENS", "DEFAULT_CHUNK_ROWS", "write_arrays"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 17  # 131,072 rows: a shard file of top-32 q8 is ≈ 4 MB raw
DEFAULT_CHUNK_ROWS = 2048  # a random 512-token window touches one or two chunks


def _xtd_version() -> str:
    try:
        from importlib.metadata import version

        return version("xtd")
    except Exception:  # noqa: BLE001 - not installed (source checkout): still writable
        return "0+unknown"


def write_arrays(
    store: Store,
    path: str,
    arrays: dict[str, np.ndarray],
    *,
    chunk_rows: int,
) -> dict[str, dict[str, Any]]:
    """Write ``arrays`` as one group at ``path`` and return the checksum of every file.

    Each array is chunked along rows (``chunk_rows``) and stored as one zarr shard file
    holding all its chunks. The group's own ``zarr.json`` is written by the caller,
    because it carries the returned checksums.

    Returns:
        ``{key relative to path: {"crc32c": hex, "bytes": size}}`` for every file written.
    """
    # One event-loop run creates and fills every array concurrently: per-call overhead of
    # zarr's sync wrapper dominated small shards otherwise.
    sync(_write_arrays_async(*_array_home(store, path), arrays, chunk_rows))
    return file_checksums(store, path)


def _array_home(store: Store, path: str) -> tuple[Store, str]:
    """The store and prefix to create the arrays of group ``path`` in.

    zarr's ``create_array`` writes a default ``zarr.json`` into every missing parent
    group, and on a local folder even an existing parent gets a temporary
    ``zarr.<hex>.partial`` file beside its ``zarr.json`` for a moment. A writer killed in
    that moment would leave the file at the store root, outside every shard. A store
    rooted at the shard's own folder keeps all of that inside the (not yet committed)
    shard, which a resumed writer removes as an orphan.
    """
    from zarr.storage import LocalStore

    if isinstance(store, LocalStore):
        return LocalStore(Path(store.root) / path), ""
    return store, path


async def _write_arrays_async(
    store: Store, path: str, arrays: dict[str, np.ndarray], chunk_rows: int
) -> None:
    from zarr.api.asynchronous import create_array

    async def one(name: str, data: np.ndarray) -> None:
        rows = int(data.shape[0])
        tail = tuple(int(x) for x in data.shape[1:])
        if rows == 0:
            chunks: tuple[int, ...] = (1, *[max(1, t) for t in tail])
            shards = None
        else:
            inner = min(chunk_rows, rows)
            chunks = (inner, *tail)
            shards = (-(-rows // inner) * inner, *tail)
        arr = await create_array(
            store,
            name=f"{path}/{name}" if path else name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=shards,
            filters=filters_for(name),
            compressors=compressors_for(name, data.dtype),
            fill_value=0,
            overwrite=True,
        )
        if rows:
            await arr.setitem(slice(None), data)

    await asyncio.gather(*(one(name, data) for name, data in arrays.items()))


class StoreWriter:
    """Write one part of a teacher store, one document at a time.

    Use as a context manager: a clean exit marks the part complete, an exception leaves
    it resumable. Reopening with the same settings resumes: skip the first
    :attr:`documents_committed` of this rank's documents and write the rest.

    Args:
        url: local folder or fsspec URL of the store (created if absent).
        attrs: the root ``xtd`` attribute content: at least ``tokenizer_json`` (str) and
            ``boundary_classes`` (list of names, column order of ``boundary_logmass``);
            also ``teacher``, ``dataset``, ``settings``, ``text_coverage`` (``"full"``
            default, or ``"prefix"`` when the teacher may truncate a document).
        top_k: number of top-k columns (0: no top-k arrays).
        hidden_size: H of the stored hidden states, or None for none.
        topk_codec: ``"q8"`` or ``"fp16"`` (xtd.storage.codecs).
        rank: this writer's part; world_size: number of parts.
        overwrite: replace this part (and a store written with other settings). Only an
            xtd store is ever replaced, and only what writers create in it (parts, cached
            alignments, the root ``zarr.json``); a folder holding anything else is refused.
        extend: the caller has checked that the stored documents are a prefix of the
            documents it will write (more records of the same data): ``dataset`` and
            ``settings.limit`` may differ from the store's, the root metadata is replaced by
            ``attrs``, and a complete part is reopened to append the new documents.
        shard_tokens: a shard is written once the buffer holds at least this many rows.
        chunk_rows: rows per chunk inside a shard file.

    Raises:
        ConfigError: invalid arguments or attrs.
        StoreExistsError: the store holds data written with other settings and
            ``overwrite`` is False, or the folder holds anything that is not an xtd store.
        StoreFormatError: the existing store is of another format version.
    """

    def __init__(
        self,
        url: StoreUrl,
        *,
        attrs: dict[str, Any],
        top_k: int,
        hidden_size: int | None = None,
        topk_codec: str = "q8",
        rank: int = 0,
        world_size: int = 1,
        overwrite: bool = False,
        extend: bool = False,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        _check_args(
            attrs, top_k, hidden_size, topk_codec, rank, world_size, shard_tokens, chunk_rows
        )
        self.url = url
        self.top_k = top_k
        self.hidden_size = hidden_size or None
        self.topk_codec = topk_codec
        self.rank = rank
        self.world_size = world_size
        self.shard_tokens = shard_tokens
        self.chunk_rows = chunk_rows
        self.boundary_classes = tuple(attrs["boundary_classes"])
        self._part = part_name(rank)
        self._extend = extend
        self._root_meta = self._root_metadata(attrs)
        self._failed = False  # a write failed: the buffer is lost, the committed part stands
        with self._writing(opening=True):
            self._store = open_zarr_store(url, writable=True)
            if self._prepare(overwrite):  # the root was (re)written: so is the card, README.md
                write_card(self._store, describe_url(url), self._root_meta)
        self._buffer: list[Document] = []
        self._buffered_tokens = 0
        self._closed = False

    # ----------------------------------------------------------------- set-up

    def _root_metadata(self, attrs: dict[str, Any]) -> dict[str, Any]:
        meta = dict(attrs)
        meta.setdefault("text_coverage", "full")
        meta.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            xtd_version=_xtd_version(),
            layout={
                "top_k": self.top_k,
                "topk_codec": self.topk_codec,
                "hidden_size": self.hidden_size,
                "shard_tokens": self.shard_tokens,
                "chunk_rows": self.chunk_rows,
                "checksum": CHECKSUM_ALGORITHM,
            },
            quantities=describe_quantities(
                self.top_k, self.topk_codec, self.hidden_size, len(self.boundary_classes)
            ),
            manifest={
                "world_size": self.world_size,
                "parts": [part_name(r) for r in range(self.world_size)],
            },
        )
        return meta

    def _prepare(self, overwrite: bool) -> bool:
        """Check what is at the root and prepare this part; True when the root was written."""
        store, where = self._store, str(self.url)
        existing, children = classify(store, where)
        is_xtd = existing is not None
        if is_xtd and not overwrite:
            if existing.get("format_version") != FORMAT_VERSION:
                raise StoreFormatError(
                    f"store {where!r} is format_version {existing.get('format_version')!r}; this "
                    f"xtd writes version {FORMAT_VERSION} — pass --overwrite to replace it"
                )
            ignored = EXTENDABLE if self._extend else ()
            diffs = differences(
                identity(existing, ignored), identity(self._root_meta, ignored)
            )
            if diffs:
                raise StoreExistsError(
                    f"store {where!r} was written with other settings ({'; '.join(diffs)}); "
                    f"pass --overwrite to replace it, or use another output path"
                )
        if is_xtd and overwrite:
            # Only what a writer creates is removed: each rank replaces its own part; rank 0
            # also removes parts of no current rank and the cached alignments. Any other file
            # in the folder is left where it is.
            keep = {part_name(r) for r in range(self.world_size) if r != self.rank}
            for child in children:
                ours = is_part_name(child) or child == ALIGNMENTS_DIR
                if child == self._part or (self.rank == 0 and ours and child not in keep):
                    remove_node(store, child)
        if self._extend and is_xtd and not overwrite:
            # Reopen the part before the root names the new data: a kill between the two
            # writes leaves a resumable part, never a complete one missing documents.
            self._load_part()
            write_group_json(store, "", {ROOT_ATTR: self._root_meta})
            return True
        if overwrite or not is_xtd:
            write_group_json(store, "", {ROOT_ATTR: self._root_meta})
        self._load_part()
        return overwrite or not is_xtd

    def _load_part(self) -> None:
        attrs = read_group_attrs(self._store, self._part)
        record = (attrs or {}).get(PART_ATTR)
        if record is not None:
            check_part_record(record, self._part, where=str(self.url))
        else:
            record = {
                "rank": self.rank,
                "world_size": self.world_size,
                "documents_committed": 0,
                "tokens_committed": 0,
                "bytes_committed": 0,
                "last_doc_index": None,
                "complete": False,
                "shards": [],
            }
        reopened = self._extend and bool(record.get("complete"))
        if reopened:
            record["complete"] = False
        self._record: dict[str, Any] = record
        # Anything of this part that no commit lists is an orphan of a killed writer.
        committed = {s["name"] for s in record["shards"]}
        for child in list_dir(self._store, f"{self._part}/"):
            if child == "zarr.json" or child in committed:
                continue
            logger.info(
                "removing uncommitted %s/%s left by an interrupted writer", self._part, child
            )
            remove_node(self._store, f"{self._part}/{child}")
        if attrs is None or reopened:
            self._commit_record()
        elif record["documents_committed"]:
            logger.info(
                "resuming part %s after %d committed documents (%d tokens)",
                self._part,
                record["documents_committed"],
                record["tokens_committed"],
            )

    # ----------------------------------------------------------------- state

    @property
    def documents_committed(self) -> int:
        """Documents of this rank safely on disk: the resume point."""
        return int(self._record["documents_committed"])

    @property
    def tokens_committed(self) -> int:
        """Token rows of this rank safely on disk."""
        return int(self._record["tokens_committed"])

    @property
    def complete(self) -> bool:
        """Whether this part was closed complete."""
        return bool(self._record["complete"])

    # ----------------------------------------------------------------- writing

    def write(self, doc: Document) -> None:
        """Add one document; writes a shard whenever the buffer reaches ``shard_tokens`` rows.

        Raises:
            DataError: arrays of the wrong shape, spans outside the text, invalid UTF-8,
                or a ``doc_index`` not larger than the previous one.
            ConfigError: the writer is closed or the part is already complete.
        """
        if self._closed or self._failed:
            raise ConfigError("this StoreWriter is closed (or a write failed); open a new one to write more documents")
        if self.complete:
            raise ConfigError(
                f"part {self._part!r} of {str(self.url)!r} is already complete; pass --overwrite to rewrite it"
            )
        doc = self._normalise(doc)
        self._buffer.append(doc)
        self._buffered_tokens += doc.num_tokens
        if self._buffered_tokens >= self.shard_tokens:
            with self._writing():
                self._flush()

    @contextmanager
    def _writing(self, *, opening: bool = False) -> Iterator[None]:
        """OS write failures (full disk, read-only folder) as one error naming the store.

        After a failure the writer writes nothing more (``close`` only closes): the half
        written shard is an orphan the next writer removes, and the part record still
        names only whole shards.
        """
        advice = (
            "choose another output path"
            if opening
            else "free space or choose another output path; committed documents are kept and the "
            "same command resumes after them"
        )
        try:
            with writing("store", self.url, advice):
                yield
        except BaseException:
            self._failed = True
            raise

    def _normalise(self, doc: Document) -> Document:
        """Validate one document and cast its arrays to the stored dtypes."""
        last = self._buffer[-1].doc_index if self._buffer else self._record["last_doc_index"]
        return normalise_document(
            doc, last_doc_index=last, num_classes=len(self.boundary_classes), top_k=self.top_k,
            topk_codec=self.topk_codec, hidden_size=self.hidden_size,
        )  # fmt: skip

    def _flush(self) -> None:
        """Write the buffer as the next shard, then commit it in the part record."""
        if not self._buffer:
            return
        docs = self._buffer
        optional = [
            n for n in ("token_slot", "loss_spans") if any(getattr(d, n) is not None for d in docs)
        ]
        arrays = shard_arrays(docs, self.top_k, self.topk_codec, self.hidden_size, optional)
        name = shard_name(len(self._record["shards"]))
        path = f"{self._part}/{name}"
        files = write_arrays(self._store, path, arrays, chunk_rows=self.chunk_rows)
        n_tokens = int(arrays["doc_token_offsets"][-1])
        n_bytes = int(arrays["doc_byte_offsets"][-1])
        shard_meta = {
            SHARD_ATTR: {
                "documents": len(docs),
                "tokens": n_tokens,
                "bytes": n_bytes,
                "optional_arrays": optional,
                "first_doc_index": docs[0].doc_index,
                "last_doc_index": docs[-1].doc_index,
                "checksum": CHECKSUM_ALGORITHM,
                "files": files,
            }
        }
        meta_bytes = write_group_json(self._store, path, shard_meta)
        rec = self._record
        rec["shards"].append(
            {
                "name": name,
                "documents": len(docs),
                "tokens": n_tokens,
                "bytes": n_bytes,
                "optional_arrays": optional,
                "stored_bytes": sum(f["bytes"] for f in files.values()) + len(meta_bytes),
                "zarr_json_crc32c": checksum(meta_bytes),
            }
        )
        rec["documents_committed"] += len(docs)
        rec["tokens_committed"] += n_tokens
        rec["bytes_committed"] += n_bytes
        rec["last_doc_index"] = docs[-1].doc_index
        self._commit_record()
        logger.debug("committed %s: %d documents, %d tokens", path, len(docs), n_tokens)
        self._buffer = []
        self._buffered_tokens = 0

    def _commit_record(self) -> None:
        write_group_json(self._store, self._part, {PART_ATTR: self._record})

    def close(self, *, complete: bool = True) -> None:
        """Commit the buffer (a last, possibly short shard) and finish.

        Args:
            complete: True marks the part complete; False leaves it resumable (e.g. after
                Ctrl-C: everything written so far is committed, a rerun continues).
        """
        if self._closed:
            return
        self._closed = True
        try:
            if not self.complete and not self._failed:
                with self._writing():
                    self._flush()
                    if complete:
                        self._record["complete"] = True
                        self._commit_record()
                    write_card(self._store, describe_url(self.url), self._root_meta)
        finally:
            self._store.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(complete=exc_type is None)


def _check_args(
    attrs: dict[str, Any],
    top_k: int,
    hidden_size: int | None,
    topk_codec: str,
    rank: int,
    world_size: int,
    shard_tokens: int,
    chunk_rows: int,
) -> None:
    if not isinstance(attrs.get("tokenizer_json"), str) or not attrs["tokenizer_json"]:
        raise ConfigError("store attrs need 'tokenizer_json': the teacher tokenizer.json text")
    classes = attrs.get("boundary_classes")
    if (
        not isinstance(classes, list | tuple)
        or not classes
        or not all(isinstance(c, str) for c in classes)
    ):
        raise ConfigError(
            f"store attrs need 'boundary_classes': a list of class names such as {list(BOUNDARY_CLASSES)}"
        )
    if top_k < 0:
        raise ConfigError(f"--top-k ({top_k}) must be 0 or more")
    if hidden_size is not None and hidden_size < 0:
        raise ConfigError(f"hidden_size ({hidden_size}) must be positive or None")
    if topk_codec not in TOPK_CODECS:
        raise ConfigError(f"--topk-codec {topk_codec!r} is not one of {', '.join(TOPK_CODECS)}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"--rank ({rank}) must be in [0, --world-size ({world_size}))")
    if shard_tokens < 1 or chunk_rows < 1:
        raise ConfigError(
            f"shard_tokens ({shard_tokens}) and chunk_rows ({chunk_rows}) must be positive"
        )
