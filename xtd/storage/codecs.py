"""Codecs of the store: top-k quantisation, the top-k row layout, and every array's compressor.

Pure functions, no files. Top-k log-probs are quantised with a codec chosen by name:

- ``fp16``: float16. Log-probs in [-65504, 0] keep 11 significant bits (relative error
  ≤ 2^-11 ≈ 4.9e-4); -inf stays -inf.
- ``q8``: one byte. Log-probs are clamped to [Q8_LO, 0] = [-20, 0] and rounded to 255
  evenly spaced levels (code c ∈ 0..254 means -c·Δ with Δ = 20/254); code 255 is -inf.
  **Bound**: |decode(encode(x)) - max(x, -20)| ≤ Δ/2 = 20/508 ≈ 0.0394 nats for every
  finite x ≤ 0, i.e. each stored probability is within a factor e^±0.0394 (±4 %) of the
  true one; probabilities below e^-20 ≈ 2e-9 read back as e^-20. NaN is stored as -inf.

**Row layout** (:func:`pack_topk` / :func:`unpack_topk`, docs/format.md "Top-k layout").
A top-k row is stored as a *set*: the order of the K ids carries ≈ log2(K!) bits (118 for
K = 32) that the log-probs already hold, so the writer drops it and the reader restores
it by sorting. Per shard, ``topk_id_table`` lists the shard's most frequent top-k ids
(most frequent first); an id's *rank* is its position in the table, or, for ids not in
it, ``T +`` its position among the ids not in the table. Each row holds its ranks in
ascending order, stored as differences along K (column 0: the smallest rank), so
frequent ids cost a few bits. The log-probs follow in the same order; q8 stores them as
``floor - code`` with ``topk_floor`` the row's largest code (most entries sit near the
bottom of a top-k list, so these are small). Reading sorts each row by (code, id):
**rows come back by descending quantised log-prob, ties (equal stored values) by
ascending id** — deterministic, whatever order the writer was given.

Measured on real SmolLM2-135M-Instruct top-32 (docs/format.md): ids 52 → 31 B/token,
log-probs 12 → 23, so the two arrays shrink from 64 to ≈ 54 B/token.

The compressors were chosen by measuring bytes per token and decode speed
(``bench/storage.py`` ``metrics["compressors"]``; table in docs/format.md): zstd for
text and offsets; blosc-zstd with byte shuffle for the numeric per-token arrays (the
smallest everywhere, decoding at ≥ 40 MB/s); level 9 for the top-k arrays, which are
most of a top-32 store; column-major (transposed) spans and boundary masses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from zarr.abc.codec import ArrayArrayCodec, BytesBytesCodec
from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

__all__ = [
    "TOPK_CODECS",
    "TOPK_TABLE_MAX",
    "Q8_LO",
    "Q8_STEP",
    "Q8_NEG_INF",
    "q8_error_bound",
    "topk_stored_dtype",
    "topk_array_names",
    "encode_topk",
    "decode_topk",
    "pack_topk",
    "unpack_topk",
    "canonical_topk",
    "compressors_for",
    "filters_for",
]

TopkCodec = Literal["fp16", "q8"]
TOPK_CODECS: tuple[str, ...] = ("fp16", "q8")

Q8_LO = -20.0  # e^-20 ≈ 2e-9: below any probability a distillation loss can feel
Q8_LEVELS = 255  # codes 0..254 are finite levels
Q8_STEP = -Q8_LO / (Q8_LEVELS - 1)
Q8_NEG_INF = 255

# Entries of a shard's id table: ids beyond it keep their natural order. 4,096 covers
# ≈ 90 % of top-k entries on real text; the table costs ≤ 16 KB per shard
# (≈ 0.1 B/token at 131,072 tokens); a larger one gained < 0.3 B/token (docs/format.md).
TOPK_TABLE_MAX = 4096
_LUT_MAX = 1 << 24  # ranks beyond this decode without a lookup table


def q8_error_bound() -> float:
    """Largest |decode(encode(x)) - max(x, Q8_LO)| over finite x ≤ 0: half a level."""
    return Q8_STEP / 2


def _unknown(codec: str) -> ValueError:
    return ValueError(f"unknown top-k codec {codec!r}; choose one of {', '.join(TOPK_CODECS)}")


def topk_stored_dtype(codec: str) -> np.dtype:
    """The dtype of quantised top-k values (and of ``topk_logprobs`` on disk) under ``codec``."""
    if codec == "fp16":
        return np.dtype(np.float16)
    if codec == "q8":
        return np.dtype(np.uint8)
    raise _unknown(codec)


def topk_array_names(codec: str) -> tuple[str, ...]:
    """The per-shard arrays that hold the top-k under ``codec`` (besides ``tail_logmass``)."""
    if codec == "q8":
        return ("topk_ids", "topk_logprobs", "topk_floor", "topk_id_table")
    if codec == "fp16":
        return ("topk_ids", "topk_logprobs", "topk_id_table")
    raise _unknown(codec)


def encode_topk(logprobs: np.ndarray, codec: str) -> np.ndarray:
    """Quantise top-k log-probs value by value (no layout; see :func:`pack_topk`).

    Args:
        logprobs: (N, K) float log-probs (natural log, ≤ 0; -inf allowed). Positive
            values (rounding noise of a log-softmax) are clamped to 0.
        codec: ``"fp16"`` or ``"q8"``.

    Returns:
        (N, K) array of :func:`topk_stored_dtype`: float16 values or uint8 q8 codes.
    """
    x = np.minimum(np.asarray(logprobs, dtype=np.float32), 0.0)
    if codec == "fp16":
        # NaN (never expected) becomes -inf so both codecs decode it alike; -0.0 becomes
        # 0.0 so that equal values have equal bits (the sort key of canonical_topk).
        x = np.where(np.isnan(x), -np.inf, x) + np.float32(0.0)
        return x.astype(np.float16)
    if codec == "q8":
        finite = np.isfinite(x)
        clamped = np.where(finite, np.maximum(x, Q8_LO), 0.0)
        codes = np.rint(-clamped / Q8_STEP).astype(np.uint8)  # 0..254
        codes[~finite] = Q8_NEG_INF
        return codes
    raise _unknown(codec)


def decode_topk(values: np.ndarray, codec: str) -> np.ndarray:
    """Inverse of :func:`encode_topk`: (N, K) quantised values → (N, K) float32 log-probs."""
    if codec == "fp16":
        return np.asarray(values).astype(np.float32)
    if codec == "q8":
        codes = np.asarray(values, dtype=np.uint8)
        out = codes.astype(np.float32) * np.float32(-Q8_STEP)
        out[codes == Q8_NEG_INF] = -np.inf
        return out
    raise _unknown(codec)


def _order_code(values: np.ndarray, codec: str) -> np.ndarray:
    """(N, K) uint64 that grows as the quantised log-prob falls (q8 code; fp16 |x| bits)."""
    if codec == "q8":
        return np.asarray(values, dtype=np.uint8).astype(np.uint64)
    if codec == "fp16":
        # For x ≤ 0 the bits of |x| = -x order like -x (IEEE floats of one sign sort as
        # integers), and -inf becomes +inf, the largest.
        mag = np.abs(np.asarray(values, dtype=np.float16))
        return mag.view(np.uint16).astype(np.uint64)
    raise _unknown(codec)


def canonical_topk(
    ids: np.ndarray, values: np.ndarray, codec: str
) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by descending quantised log-prob, ties by ascending id.

    Args:
        ids: (N, K) int top-k ids, each in [0, 2^32).
        values: (N, K) quantised values (:func:`encode_topk`).

    Returns:
        ``(ids, values)``: (N, K) int32 and the values' dtype, rows in canonical order.
    """
    ids = np.asarray(ids)
    # One sort of a combined integer key (order code above the id) orders by both and
    # carries the pair along: faster than argsort + two gathers. q8 codes and ids below
    # 2^24 (every real vocabulary) fit 32 bits, which sort twice as fast as 64.
    narrow = codec == "q8" and int(ids.max(initial=0)) < (1 << 24)
    kind, shift = (np.uint32, 24) if narrow else (np.uint64, 32)
    key = (_order_code(values, codec).astype(kind) << kind(shift)) | ids.astype(kind)
    key.sort(axis=1)
    out_ids = (key & kind((1 << shift) - 1)).astype(np.int32)
    code = key >> kind(shift)
    if codec == "q8":
        return out_ids, code.astype(np.uint8)
    return out_ids, np.float16(0.0) - code.astype(np.uint16).view(np.float16)


def _id_table(ids: np.ndarray, table_max: int) -> np.ndarray:
    """(T,) int32: the ``table_max`` most frequent ids of ``ids``, most frequent first, ties by id."""
    uniq, counts = np.unique(ids.ravel(), return_counts=True)
    order = np.lexsort((uniq, -counts))
    return uniq[order[:table_max]].astype(np.int32)


def ids_to_ranks(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Rank of every id: its table position, or ``T +`` its position among ids not in the table."""
    ids = np.asarray(ids, dtype=np.int64)
    t = len(table)
    if t == 0:
        return ids.copy()
    by_id = np.argsort(table, kind="stable")
    sorted_table = table[by_id].astype(np.int64)
    below = np.searchsorted(sorted_table, ids)  # table ids < id
    at = np.minimum(below, t - 1)
    hit = sorted_table[at] == ids
    return np.where(hit, by_id[at], t + ids - below)


def ranks_to_ids(ranks: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ids_to_ranks` (int32 ids): ``lut[ranks]`` with
    ``lut = concatenate([table, ids not in the table, ascending])``, built as far as needed.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    table = np.asarray(table, dtype=np.int64)
    t = len(table)
    size = int(ranks.max(initial=-1)) + 1
    if size <= t:
        lut = table
    elif size - t <= _LUT_MAX:
        outside = np.ones(size, dtype=bool)
        outside[table[table < size]] = False
        lut = np.concatenate([table, np.flatnonzero(outside)[: size - t]])
    else:  # an absurd rank (a corrupt file): no giant table, the closed form instead
        # The j-th id not in the table is j + #{i : sorted_table[i] - i ≤ j}: below the
        # table's i-th smallest id lie sorted_table[i] - i ids that are not in it.
        gaps = np.sort(table) - np.arange(t)
        j = ranks - t
        inside = table[np.clip(ranks, 0, t - 1)] if t else np.zeros_like(ranks)
        outside_ids = j + np.searchsorted(gaps, j, side="right")
        return np.where(ranks < t, inside, outside_ids).astype(np.int32)
    return lut[ranks].astype(np.int32)


def pack_topk(
    ids: np.ndarray, values: np.ndarray, codec: str, *, table_max: int = TOPK_TABLE_MAX
) -> dict[str, np.ndarray]:
    """The on-disk arrays of one shard's top-k (layout in the module docstring).

    Args:
        ids: (N, K) int top-k ids of every row of the shard, each in [0, 2^31).
        values: (N, K) quantised log-probs (:func:`encode_topk`), same order as ``ids``.
        codec: ``"q8"`` or ``"fp16"``.
        table_max: most entries of ``topk_id_table``.

    Returns:
        ``{"topk_ids": (N, K) int32 rank differences, "topk_logprobs": (N, K) uint8
        floor - code (q8) or float16 values, "topk_floor": (N,) uint8 (q8 only),
        "topk_id_table": (T,) int32}``.
    """
    ids = np.asarray(ids)
    k = ids.shape[1]
    table = _id_table(ids, table_max)
    ranks = ids_to_ranks(ids, table)
    by_rank = np.argsort(ranks, axis=1, kind="stable")
    ranks = np.take_along_axis(ranks, by_rank, axis=1)
    values = np.take_along_axis(np.asarray(values), by_rank, axis=1)
    stored_ids = ranks.copy()
    if k > 1:
        stored_ids[:, 1:] = np.diff(ranks, axis=1)
    out = {"topk_ids": stored_ids.astype(np.int32), "topk_id_table": table}
    if codec == "q8":
        codes = values.astype(np.uint8)
        floor = codes.max(axis=1, initial=0)
        out["topk_logprobs"] = (floor[:, None] - codes).astype(np.uint8)  # never wraps
        out["topk_floor"] = floor.astype(np.uint8)
    elif codec == "fp16":
        out["topk_logprobs"] = values.astype(np.float16)
    else:
        raise _unknown(codec)
    return out


def unpack_topk(stored: Mapping[str, np.ndarray], codec: str) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_topk` for any slice of rows (the whole table is needed).

    Returns:
        ``(ids, values)``: (N, K) int32 ids and quantised values in canonical order
        (:func:`canonical_topk`); decode the values with :func:`decode_topk`.
    """
    ranks = np.cumsum(np.asarray(stored["topk_ids"], dtype=np.int64), axis=1)
    ids = ranks_to_ids(ranks, np.asarray(stored["topk_id_table"]))
    if codec == "q8":
        floor = np.asarray(stored["topk_floor"], dtype=np.uint8)
        values = floor[:, None] - np.asarray(stored["topk_logprobs"], dtype=np.uint8)
    elif codec == "fp16":
        values = np.asarray(stored["topk_logprobs"], dtype=np.float16)
    else:
        raise _unknown(codec)
    return canonical_topk(ids, values, codec)


def codec_params(codec: str) -> dict[str, Any]:
    """What a plain zarr/numpy reader needs to decode ``topk_logprobs`` (stored in attrs)."""
    layout = (
        "rows are sets: ranks = cumsum(topk_ids, axis=1); ids = concat(topk_id_table, "
        "ids not in it ascending)[ranks]; sort each row by (code, id)"
    )
    if codec == "fp16":
        return {"name": "fp16", "decode": "float32(x)", "layout": layout}
    if codec == "q8":
        return {
            "name": "q8",
            "lo": Q8_LO,
            "step": Q8_STEP,
            "neg_inf_code": Q8_NEG_INF,
            "decode": "codes = topk_floor[:, None] - stored (uint8); value = codes * -step; code 255 = -inf",
            "layout": layout,
            "max_abs_error": q8_error_bound(),
        }
    raise _unknown(codec)


# Measured choices (bench/storage.py, docs/format.md "Compression"): name -> compressor.
_ZSTD = ("zstd", 3)
_LZ4_SHUFFLE = ("blosc-lz4", "shuffle")
_ZSTD_SHUFFLE = ("blosc-zstd", "shuffle")
_ZSTD9_SHUFFLE = ("blosc-zstd9", "shuffle")
COMPRESSOR_CHOICE: dict[str, tuple[str, Any]] = {
    "doc_index": _ZSTD,
    "doc_token_offsets": _ZSTD,
    "doc_byte_offsets": _ZSTD,
    "loss_span_offsets": _ZSTD,
    "loss_spans": _ZSTD,
    "text": _ZSTD,
    "token_ids": _ZSTD_SHUFFLE,
    "token_spans": _ZSTD_SHUFFLE,
    "token_slot": _ZSTD,
    "token_logprob": _ZSTD_SHUFFLE,
    "boundary_logmass": _ZSTD_SHUFFLE,
    "topk_ids": _ZSTD9_SHUFFLE,
    "topk_logprobs": _ZSTD9_SHUFFLE,
    "topk_floor": _ZSTD9_SHUFFLE,
    "topk_id_table": _ZSTD9_SHUFFLE,
    "tail_logmass": _ZSTD_SHUFFLE,
    "hidden": _LZ4_SHUFFLE,
}


def make_compressor(kind: tuple[str, Any], itemsize: int) -> list[BytesBytesCodec]:
    """Zarr compressor list for one ``(name, option)`` choice; ``[]`` for ``("none", _)``."""
    name, option = kind
    if name == "none":
        return []
    if name == "zstd":
        return [ZstdCodec(level=int(option))]
    if name in ("blosc-lz4", "blosc-zstd", "blosc-zstd9"):
        return [
            BloscCodec(
                cname=name.split("-")[1].rstrip("9"),
                clevel=9 if name.endswith("9") else 5,
                shuffle=option,
                typesize=itemsize,
            )
        ]
    raise ValueError(f"unknown compressor {name!r}")


def compressors_for(name: str, dtype: np.dtype) -> list[BytesBytesCodec]:
    """The compressor of array ``name`` (arrays not in the table: zstd level 3)."""
    return make_compressor(COMPRESSOR_CHOICE.get(name, _ZSTD), np.dtype(dtype).itemsize)


def filters_for(name: str) -> list[ArrayArrayCodec]:
    """Array→array filters: spans and boundary masses are stored column-major.

    Within a chunk, consecutive starts differ by a token's length, so a column of starts
    compresses better than interleaved ``(start, end)`` pairs (likewise one class's
    masses); the transpose codec is part of the Zarr v3 spec, so plain readers decode it
    transparently.
    """
    if name in ("token_spans", "loss_spans", "boundary_logmass"):
        return [TransposeCodec(order=(1, 0))]
    return []
