"""Schema of the teacher shard store, format version 1 (docs/format.md).

A store is a Zarr v3 group. Its root attribute ``xtd`` describes the whole dataset
(teacher, tokenizer, settings, the manifest of parts); each writer (one per rank) owns
one part group, and a part is a list of immutable shard groups, each a small CSR
dataset of whole documents. This module holds the names, the metadata records and
the few helpers every other storage module shares: opening a URL as a zarr store,
reading/writing group metadata, checksums.

Dimension letters: ``D`` documents, ``N`` token rows, ``K`` top-k, ``C`` boundary
classes, ``H`` hidden size, ``M`` loss spans. Byte spans are half-open ``[start, end)``
offsets into the UTF-8 bytes of one document.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, ZipStore

from xtd.errors import ConfigError, StoreFormatError, StoreNotFoundError
from xtd.outputs import check_output_folder
from xtd.storage.codecs import codec_params

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BOUNDARY_CLASSES",
    "Document",
    "StoreUrl",
    "open_zarr_store",
    "read_json",
    "write_group_json",
    "read_group_attrs",
    "read_root_meta",
    "checksum",
    "part_name",
    "shard_name",
    "describe_quantities",
    "describe_url",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "xtd-teacher-shards"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "crc32c"

# Column order of boundary_logmass (docs/method.md, "What the store holds"). Kept here rather than imported from
# xtd.tokenization so that storage depends on nothing above it (README, Architecture).
BOUNDARY_CLASSES: tuple[str, ...] = ("space", "newline", "tab", "special")

ROOT_ATTR = "xtd"
PART_ATTR = "xtd_part"
SHARD_ATTR = "xtd_shard"
ALIGNMENT_ATTR = "xtd_alignment"

# Arrays of one shard group: name -> (stored dtype, trailing shape kind, row space).
# Row spaces: "doc" (D), "doc+1" (D+1, offsets), "byte" (text bytes), "token" (N),
# "loss" (M). Trailing kinds are resolved per store (K, C, H).
DOC_ARRAYS = ("doc_index", "doc_token_offsets", "doc_byte_offsets")
TOKEN_ARRAYS_REQUIRED = ("token_ids", "token_spans", "token_logprob", "boundary_logmass")
# Top-k arrays depend on the codec: xtd.storage.codecs.topk_array_names, plus tail_logmass.

StoreUrl = str | Path | Store


@dataclasses.dataclass(kw_only=True)
class Document:
    """One scored document: its exact bytes and every per-token quantity.

    Attributes:
        text: the exact UTF-8 bytes the teacher saw.
        token_ids: (N,) int32 teacher token ids.
        token_spans: (N, 2) int32 byte ``[start, end)`` of each token in ``text``;
            special tokens have ``start == end`` at the byte offset where they occur.
        token_logprob: (N,) float32 log p_T(t_i | t_<i); NaN where not scored (row 0,
            first row of a window without context).
        boundary_logmass: (N, C) float16 log next-token mass of each boundary class,
            columns in the store's ``boundary_classes`` order.
        topk_ids: (N, K) int32 top-k next-token ids, or None when the store has k = 0.
        topk_logprobs: (N, K) float32 their log-probs (quantised on disk).
        tail_logmass: (N,) float32 log(1 - sum of the top-k probs).
        hidden: (N, H) float16 teacher last hidden state, or None.
        token_slot: (N,) int8 chat-template slot per token (0 = ordinary text), or None.
        loss_spans: (M, 2) int64 byte ranges trained on, or None (train on everything).
        doc_index: position of the document in the source dataset.
    """

    text: bytes
    token_ids: np.ndarray
    token_spans: np.ndarray
    token_logprob: np.ndarray
    boundary_logmass: np.ndarray
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    tail_logmass: np.ndarray | None = None
    hidden: np.ndarray | None = None
    token_slot: np.ndarray | None = None
    loss_spans: np.ndarray | None = None
    doc_index: int

    @property
    def num_tokens(self) -> int:
        """Number of token rows N."""
        return int(len(self.token_ids))


def part_name(rank: int) -> str:
    """Name of the part group written by ``rank``: ``part-00003``."""
    return f"part-{rank:05d}"


def shard_name(index: int) -> str:
    """Name of the ``index``-th shard group of a part: ``shard-000012``."""
    return f"shard-{index:06d}"


def describe_url(url: StoreUrl) -> str:
    """How messages name a store: its path or URL as given."""
    return str(url) if not isinstance(url, Store) else repr(url)


def open_zarr_store(url: StoreUrl, *, writable: bool) -> Store:
    """Open ``url`` (see :func:`_make_store`) and make sure the store is open for I/O."""
    store = _make_store(url, writable=writable)
    sync(store._ensure_open())  # ZipStore opens its file lazily; raw get() needs it open
    return store


def _make_store(url: StoreUrl, *, writable: bool) -> Store:
    """Open a local path, a ``.zip`` file or any fsspec URL as a zarr store.

    Args:
        url: a local folder, a ``.zip`` file made from a finished store (read only), an
            fsspec URL (``memory://x``, ``s3://bucket/x``, ``file:///x``) or a zarr ``Store``.
        writable: open for writing (writers) or read only (readers, verify).

    Raises:
        StoreNotFoundError: a local path (folder or zip) that does not exist, when reading.
        ConfigError: a zip file opened for writing; a URL scheme fsspec cannot open.
        OutputError: a local folder that cannot be written, when writing.
    """
    if isinstance(url, Store):
        return url
    text = str(url)
    if "://" in text and not text.startswith("file://"):
        try:
            # No listings cache: another writer (or process) may have changed the store since.
            options = {"use_listings_cache": False}
            return FsspecStore.from_url(text, storage_options=options, read_only=not writable)
        except ImportError as exc:  # e.g. "Install s3fs to access S3": name the xtd extra
            from xtd.storage.remote import missing_package_error

            raise missing_package_error(text, exc) from None
        except ValueError as exc:  # "Protocol not known: foo"
            raise ConfigError(f"cannot open {text!r}: {exc}; use a local path or an fsspec URL") from None
    path = Path(text.removeprefix("file://")).expanduser()
    if path.suffix.lower() == ".zip":
        if writable:
            raise ConfigError(
                f"cannot write to zip file {text!r}; write a folder, then zip the finished store"
            )
        if not path.is_file():
            raise StoreNotFoundError(f"no store at {text!r}: the zip file does not exist")
        return ZipStore(path, mode="r", read_only=True)
    if not writable and not path.exists():
        raise StoreNotFoundError(
            f"no store at {text!r}: the path does not exist — check the path or run xtd precompute"
        )
    if not writable and not path.is_dir():
        raise StoreFormatError(f"{text!r} is a file, not an xtd store folder (or .zip of one)")
    if writable:
        check_output_folder(path, what="store")
    return LocalStore(path, read_only=not writable)


def read_bytes(store: Store, key: str) -> bytes | None:
    """The raw bytes stored under ``key``, or None when absent."""
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def write_bytes(store: Store, key: str, data: bytes) -> None:
    """Store ``data`` under ``key`` (atomic on local folders: zarr writes a temp file, then renames)."""
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def list_prefix(store: Store, prefix: str) -> list[str]:
    """Every key under ``prefix`` (a folder path ending in ``/``), sorted."""

    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return sorted(sync(collect()))


def list_dir(store: Store, prefix: str) -> list[str]:
    """Immediate children (keys or folder names) under ``prefix``."""

    async def collect() -> list[str]:
        return [key async for key in store.list_dir(prefix)]

    return sorted(sync(collect()))


def delete_dir(store: Store, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    sync(store.delete_dir(prefix))


def delete_key(store: Store, key: str) -> None:
    """Delete one key (no error when absent)."""
    sync(store.delete(key))


def remove_node(store: Store, key: str) -> None:
    """Delete a key or a whole folder of keys (no error when absent)."""
    try:
        delete_dir(store, key)
    except ValueError:  # LocalStore: the key is a file, not a folder
        pass
    delete_key(store, key)


def read_json(store: Store, key: str) -> dict[str, Any] | None:
    """Parse the JSON object at ``key``; None when absent.

    Raises:
        StoreFormatError: the object is not valid JSON.
    """
    data = read_bytes(store, key)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"{key!r} in the store is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise StoreFormatError(f"{key!r} in the store is not a JSON object")
    return value


def group_key(path: str) -> str:
    """Key of the ``zarr.json`` of the group at ``path`` ('' = root)."""
    return f"{path}/zarr.json" if path else "zarr.json"


def group_json_bytes(attributes: dict[str, Any]) -> bytes:
    """The bytes of a Zarr v3 group ``zarr.json`` holding ``attributes``."""
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    return json.dumps(meta, indent=1, sort_keys=False, allow_nan=False).encode()


def write_group_json(store: Store, path: str, attributes: dict[str, Any]) -> bytes:
    """Write (replace) the group metadata at ``path`` in one atomic put; returns the bytes.

    Writing the ``zarr.json`` ourselves, rather than through ``group.attrs.update``, makes
    the commit one object write (so it is atomic on local folders and object stores).
    """
    data = group_json_bytes(attributes)
    write_bytes(store, group_key(path), data)
    return data


def read_group_attrs(store: Store, path: str) -> dict[str, Any] | None:
    """The attributes of the group at ``path``; None when there is no group there.

    Raises:
        StoreFormatError: ``path`` holds an array, or metadata that is not Zarr v3.
    """
    meta = read_json(store, group_key(path))
    if meta is None:
        return None
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        where = path or "the root"
        raise StoreFormatError(
            f"{where!r} is not a Zarr v3 group (zarr.json has {meta.get('node_type')!r})"
        )
    attrs = meta.get("attributes", {})
    return attrs if isinstance(attrs, dict) else {}


def read_root_meta(store: Store, url: StoreUrl) -> dict[str, Any]:
    """Read and validate the root ``xtd`` attribute of a store.

    Raises:
        StoreNotFoundError: nothing at all at ``url``.
        StoreFormatError: not a Zarr group, a Zarr group that is not an xtd store, a
            different format, or an unsupported ``format_version``.
    """
    where = describe_url(url)
    try:
        attrs = read_group_attrs(store, "")
    except FileNotFoundError:
        attrs = None
    if attrs is None:
        try:
            anything = bool(list_dir(store, ""))
        except FileNotFoundError:
            anything = False
        if not anything:
            raise StoreNotFoundError(
                f"no store at {where!r}: nothing is there — check the path or run xtd precompute"
            )
        raise StoreFormatError(
            f"{where!r} is not an xtd store: it has no zarr.json — point at the folder "
            f"xtd precompute wrote"
        )
    meta = attrs.get(ROOT_ATTR)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StoreFormatError(
            f"{where!r} is a zarr group but not an xtd teacher store (no {ROOT_ATTR!r} attribute "
            f"with format {FORMAT_NAME!r}) — point at a store written by xtd precompute"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreFormatError(
            f"store {where!r} is format_version {version!r}; this xtd reads version "
            f"{FORMAT_VERSION} — upgrade xtd or re-run xtd precompute"
        )
    return meta


def checksum(data: bytes) -> str:
    """crc32c of ``data`` as 8 hex digits (the algorithm named in CHECKSUM_ALGORITHM)."""
    import google_crc32c

    return f"{google_crc32c.value(data):08x}"


def file_checksums(store: Store, path: str) -> dict[str, dict[str, Any]]:
    """The checksum and size of every file of the group at ``path`` (what verify checks).

    The group's own ``zarr.json`` is left out (it carries these checksums, so the caller
    writes it afterwards), as are temporary ``.partial`` files. Files are read
    concurrently, in one event-loop run.

    Returns:
        ``{key relative to path: {"crc32c": hex, "bytes": size}}``, in key order.
    """
    keys = [
        key
        for key in list_prefix(store, f"{path}/")
        if (rel := key[len(path) + 1 :]) and rel != "zarr.json" and not rel.endswith((".partial", "/"))
    ]
    blobs = sync(_read_many(store, keys))
    files: dict[str, dict[str, Any]] = {}
    for key, blob in zip(keys, blobs, strict=True):
        assert blob is not None, key  # just listed
        files[key[len(path) + 1 :]] = {"crc32c": checksum(blob), "bytes": len(blob)}
    return files


async def _read_many(store: Store, keys: list[str]) -> list[bytes | None]:
    proto = default_buffer_prototype()

    async def one(key: str) -> bytes | None:
        buf = await store.get(key, prototype=proto)
        return None if buf is None else buf.to_bytes()

    return list(await asyncio.gather(*(one(k) for k in keys)))


def digest_text(text: str) -> str:
    """16 hex chars of sha256 of ``text`` (to compare embedded tokenizers cheaply)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def special_token_ids(tokenizer_json: str) -> np.ndarray | None:
    """Sorted ids of the tokenizer's special added tokens; None when the JSON cannot be read."""
    try:
        data = json.loads(tokenizer_json)
        ids = [int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")]
    except (json.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        return None
    return np.array(sorted(ids), dtype=np.int64)


def tokenizer_vocab_size(tokenizer_json: str) -> int | None:
    """Number of ids of a ``tokenizer.json`` (model vocab plus added tokens); None if unknown."""
    try:
        data = json.loads(tokenizer_json)
        vocab = data["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [int(t["id"]) for t in data.get("added_tokens", [])]
    except (json.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        return None
    return max(ids) + 1 if ids else None


def iter_shards(part_meta: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The committed shard records of a part record."""
    yield from part_meta.get("shards", [])


def open_array(store: Store, path: str) -> zarr.Array:
    """Open the array at ``path`` read-only."""
    return zarr.open_array(store, path=path, mode="r")


def describe_quantities(
    top_k: int, topk_codec: str, hidden_size: int | None, num_classes: int
) -> dict[str, Any]:
    """The ``quantities`` root attribute: what every array holds, its dtype and codec."""
    q: dict[str, Any] = {
        "doc_index": {
            "holds": "position of each document in the source dataset",
            "dtype": "int64",
            "shape": "[D]",
        },
        "doc_token_offsets": {
            "holds": "token rows of document d: offsets[d]:offsets[d+1]",
            "dtype": "int64",
            "shape": "[D+1]",
        },
        "doc_byte_offsets": {
            "holds": "bytes of document d in text",
            "dtype": "int64",
            "shape": "[D+1]",
        },
        "text": {
            "holds": "exact UTF-8 bytes the teacher saw",
            "dtype": "uint8",
            "shape": "[bytes]",
        },
        "token_ids": {"holds": "teacher token ids", "dtype": "int32", "shape": "[N]"},
        "token_spans": {
            "holds": "byte [start, end) of each token within its document; empty for special tokens",
            "dtype": "int32",
            "shape": "[N, 2]",
        },
        "token_logprob": {
            "holds": "log p_T(t_i | t_<i); NaN where not scored",
            "dtype": "float32",
            "shape": "[N]",
        },
        "boundary_logmass": {
            "holds": "log next-token mass of each boundary class after token i",
            "dtype": "float16",
            "shape": f"[N, {num_classes}]",
        },
        "token_slot": {
            "holds": "chat-template slot (0 = text); chat stores only",
            "dtype": "int8",
            "shape": "[N]",
        },
        "loss_span_offsets": {
            "holds": "loss spans of document d: offsets[d]:offsets[d+1]; chat stores only",
            "dtype": "int64",
            "shape": "[D+1]",
        },
        "loss_spans": {
            "holds": "byte ranges trained on; chat stores only",
            "dtype": "int64",
            "shape": "[M, 2]",
        },
    }
    if top_k > 0:
        q["topk_ids"] = {
            "holds": "top-k next-token ids after token i, as a set: each row's ascending "
            "ranks in topk_id_table, stored as differences along K (docs/format.md)",
            "dtype": "int32",
            "shape": f"[N, {top_k}]",
            "k": top_k,
        }
        q["topk_logprobs"] = {
            "holds": "log-probs of topk_ids, in the same order"
            + ("; q8 as topk_floor - code" if topk_codec == "q8" else ""),
            "dtype": str(np.dtype(np.float16) if topk_codec == "fp16" else np.dtype(np.uint8)),
            "shape": f"[N, {top_k}]",
            "k": top_k,
            "quantisation": codec_params(topk_codec),
        }
        if topk_codec == "q8":
            q["topk_floor"] = {
                "holds": "largest q8 code of each top-k row",
                "dtype": "uint8",
                "shape": "[N]",
            }
        q["topk_id_table"] = {
            "holds": "per shard: its most frequent top-k ids, most frequent first",
            "dtype": "int32",
            "shape": "[T]",
        }
        q["tail_logmass"] = {
            "holds": "log(1 - sum of the top-k probs)",
            "dtype": "float32",
            "shape": "[N]",
        }
    if hidden_size:
        q["hidden"] = {
            "holds": "teacher last hidden state (after the final norm)",
            "dtype": "float16",
            "shape": f"[N, {hidden_size}]",
        }
    return q
