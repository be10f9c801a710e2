"""The teacher shard store, format version 1 (docs/format.md).

Write with :class:`StoreWriter` (one per rank, one document at a time, crash-safe and
resumable), read with :func:`open_store` (random access, whole-shard streaming),
check with :func:`verify_store`. Top-k log-prob codecs live in
:mod:`xtd.storage.codecs`; cached student alignments in :mod:`xtd.storage.alignments`.
"""

from __future__ import annotations

from xtd.storage.alignments import AlignmentReader, list_alignments, read_alignment, write_alignment
from xtd.storage.codecs import TOPK_CODECS, decode_topk, encode_topk, q8_error_bound
from xtd.storage.format import BOUNDARY_CLASSES, FORMAT_NAME, FORMAT_VERSION, Document
from xtd.storage.identity import existing_store
from xtd.storage.reader import ArrayStat, StoreReader, open_store
from xtd.storage.verify import VerifyReport, verify_store, verify_store_report
from xtd.storage.writer import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_TOKENS, StoreWriter

__all__ = [
    "AlignmentReader",
    "ArrayStat",
    "BOUNDARY_CLASSES",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_SHARD_TOKENS",
    "Document",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "StoreReader",
    "StoreWriter",
    "TOPK_CODECS",
    "VerifyReport",
    "decode_topk",
    "encode_topk",
    "existing_store",
    "list_alignments",
    "open_store",
    "q8_error_bound",
    "read_alignment",
    "verify_store",
    "verify_store_report",
    "write_alignment",
]
