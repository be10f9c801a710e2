"""Chunking of two tokenizations of the same text by byte offsets (docs/method.md, "Chunks").

A *chunk* is a minimal span whose two ends are token ends on both sides: the chunk ends
are the intersection of the teacher's and the student's token-end byte offsets
(docs/method.md, "Chunks"). Special tokens / chat-template slots are atomic units with empty byte
views: matching units at the same byte position on both sides form a *slot chunk*;
one-sided units belong to no chunk. Chunks stop at the first exhausted side
(truncation, docs/method.md, "Chunks").

The result is index arrays (docs/method.md, "Chunks"), never dense [B, L, L] matrices: a chunk id per
token (-1 = in no chunk) and the byte range of every chunk. Everything is vectorised
with numpy; :func:`align_many` concatenates a whole batch (per-document byte offsets
keep documents apart) and intersects the end offsets once.

Dimension letters: ``T`` teacher tokens, ``S`` student tokens, ``C`` chunks, ``B``
documents of a batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xtd.errors import ByteIdentityError

logger = logging.getLogger(__name__)

__all__ = [
    "Alignment",
    "align",
    "align_many",
    "merge_groups",
    "space_chunks",
    "repair_leading_space",
    "spans_from_views",
]


@dataclass(frozen=True)
class Alignment:
    """Chunks of one document (docs/method.md, "Chunks").

    Attributes:
        teacher_chunk: (T,) int32 chunk id per teacher token, -1 = in no chunk.
        student_chunk: (S,) int32 chunk id per student token, -1 = in no chunk.
        num_chunks: C.
        chunk_bytes: (C, 2) int64 half-open byte range of each chunk (empty for slot chunks).
        chunk_slot: (C,) bool, True for slot chunks (paired special tokens / template slots).
    """

    teacher_chunk: np.ndarray
    student_chunk: np.ndarray
    num_chunks: int
    chunk_bytes: np.ndarray
    chunk_slot: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.chunk_slot is None:
            object.__setattr__(self, "chunk_slot", np.zeros(self.num_chunks, dtype=bool))

    @property
    def teacher_ranges(self) -> np.ndarray:
        """(C, 2) int64 half-open teacher token range [first, last + 1) of each chunk."""
        return _ranges(self.teacher_chunk, self.num_chunks)

    @property
    def student_ranges(self) -> np.ndarray:
        """(C, 2) int64 half-open student token range [first, last + 1) of each chunk."""
        return _ranges(self.student_chunk, self.num_chunks)


def _ranges(chunk: np.ndarray, num_chunks: int) -> np.ndarray:
    # Chunk ids grow with token index (chunks are ordered by position), so the tokens of
    # chunk c are found by binary search over the valid ids.
    rows = np.flatnonzero(chunk >= 0)
    ids = chunk[rows]
    first = np.searchsorted(ids, np.arange(num_chunks), side="left")
    last = np.searchsorted(ids, np.arange(num_chunks), side="right") - 1
    out = np.zeros((num_chunks, 2), dtype=np.int64)
    if num_chunks:
        out[:, 0] = rows[first]
        out[:, 1] = rows[last] + 1
    return out


def spans_from_views(views: Sequence[bytes], *, start: int = 0) -> np.ndarray:
    """(N, 2) int64 spans of consecutive byte views (empty views give empty spans)."""
    lens = np.fromiter((len(v) for v in views), np.int64, len(views))
    ends = start + np.cumsum(lens)
    return np.stack([ends - lens, ends], axis=1) if len(views) else np.zeros((0, 2), np.int64)


def repair_leading_space(
    teacher_views: Sequence[bytes],
    student_views: Sequence[bytes],
    teacher_slot: Sequence[bool] | None = None,
    student_slot: Sequence[bool] | None = None,
) -> tuple[list[bytes], list[bytes]]:
    """Leading-space repair of docs/method.md, "Chunks", as a pure function on byte views.

    After the leading slot units, count the consecutive leading space bytes across the
    first text tokens of each side and prepend the missing spaces to the first text
    token of the side with fewer. (:class:`~xtd.tokenization.ByteTokenizer` spans are
    already text offsets with the dummy prefix absorbed; this is for callers that hold
    byte views, e.g. separately tokenised segments.)

    Returns:
        New lists; the inputs are not modified.
    """
    t, s = list(teacher_views), list(student_views)
    t_slot = [False] * len(t) if teacher_slot is None else list(teacher_slot)
    s_slot = [False] * len(s) if student_slot is None else list(student_slot)

    def leading(views: list[bytes], slot: list[bool]) -> tuple[int, int | None]:
        first = next((i for i, is_slot in enumerate(slot) if not is_slot), None)
        text = b"".join(v for v, is_slot in zip(views, slot, strict=True) if not is_slot)
        return len(text) - len(text.lstrip(b" ")), first

    nt, ft = leading(t, t_slot)
    ns, fs = leading(s, s_slot)
    if nt > ns and fs is not None:
        s[fs] = b" " * (nt - ns) + s[fs]
    elif ns > nt and ft is not None:
        t[ft] = b" " * (ns - nt) + t[ft]
    return t, s


def align(
    teacher_spans: np.ndarray,
    student_spans: np.ndarray,
    *,
    teacher_special: np.ndarray | None = None,
    student_special: np.ndarray | None = None,
) -> Alignment:
    """Chunks of one document (docs/method.md, "Chunks"); see :func:`align_many`."""
    return align_many([(teacher_spans, student_spans, teacher_special, student_special)])[0]


def align_many(pairs: Sequence[Sequence[Any]]) -> list[Alignment]:
    """Chunks of a batch of documents, vectorised over the whole batch.

    Args:
        pairs: per document ``(teacher_spans, student_spans)`` or
            ``(teacher_spans, student_spans, teacher_special, student_special)``.
            Spans are (T, 2) / (S, 2) integer byte offsets into the document's bytes
            (:attr:`~xtd.tokenization.Encoding.spans`); text spans must be contiguous and
            both sides must start at the same offset (they may end at different offsets:
            truncation). ``*_special`` is None (no specials), a (T,) bool mask of atomic
            special tokens (paired in order at equal byte positions), or a (T,) int array
            of slot ids (-1 = text; consecutive tokens with the same slot id form one unit;
            units pair by slot id at equal byte positions, docs/method.md, "Byte view of a tokenizer"; ids ≤ -2 mark
            padding, which belongs to no chunk).

    Returns:
        One :class:`Alignment` per document.

    Raises:
        ByteIdentityError: spans that do not tile, sides that start at different
            offsets, or different slots at the same position (docs/method.md, "Chunks").
    """
    if not len(pairs):
        return []
    for d, pair in enumerate(pairs):
        if len(pair) not in (2, 4):
            raise ValueError(f"pair {d}: expected 2 or 4 elements, got {len(pair)}")
    sides = [_Side([p[k] for p in pairs], [p[k + 2] if len(p) == 4 else None for p in pairs], k) for k in (0, 1)]
    return _align_sides(sides[0], sides[1], len(pairs))


class _Side:
    """One side of a batch, concatenated: spans, slot labels, document of each token."""

    def __init__(self, spans_list: list[Any], special_list: list[Any], side: int) -> None:
        spans_list = [np.asarray(x).reshape(-1, 2) for x in spans_list]
        counts = np.fromiter((x.shape[0] for x in spans_list), np.int64, len(spans_list))
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        total = int(self.offsets[-1])
        # int32 offsets stay int32 (half the memory traffic); anything else becomes int64.
        # Contiguous columns: every pass below reads one of them, never both interleaved.
        dtype = np.result_type(*spans_list) if spans_list else np.int64
        if dtype not in (np.int32, np.int64):
            dtype = np.int64
        self.starts = np.concatenate([x[:, 0] for x in spans_list], dtype=dtype) if total else np.zeros(0, dtype)
        self.ends = np.concatenate([x[:, 1] for x in spans_list], dtype=dtype) if total else np.zeros(0, dtype)
        # Slot labels (-1 text) and the text mask exist only when some document has
        # specials; plain text batches skip them entirely.
        self.has_slots = any(special is not None for special in special_list)
        self.slot: np.ndarray | None = None
        self.own_unit: np.ndarray | None = None
        self.text: np.ndarray | None = None
        self.has_empty = False  # set by _check_tiling
        if self.has_slots:
            self.slot = np.full(total, -1, dtype=np.int64)
            self.own_unit = np.zeros(total, dtype=bool)
            for d, special in enumerate(special_list):
                if special is not None:
                    lo, hi = int(self.offsets[d]), int(self.offsets[d + 1])
                    self.slot[lo:hi], self.own_unit[lo:hi] = _slot_labels(special, hi - lo, d, side)
            self.text = self.slot == -1

    @functools.cached_property
    def doc(self) -> np.ndarray:
        """(N,) document of each token."""
        return np.repeat(np.arange(self.counts.size), self.counts)


def _slot_labels(special: Any, n: int, doc: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(slot label per token, whether each token is a unit of its own)."""
    if special is None:
        return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
    arr = np.asarray(special)
    if arr.shape != (n,):
        name = ("teacher", "student")[side]
        raise ValueError(f"document {doc}: {name}_special has shape {arr.shape}, expected ({n},)")
    if arr.dtype == bool:  # anonymous specials: each token is one unit, paired in order
        return np.where(arr, 0, -1).astype(np.int64), arr.copy()
    return arr.astype(np.int64), np.zeros(n, dtype=bool)


def _align_sides(t: _Side, s: _Side, num_docs: int) -> list[Alignment]:
    _check_tiling(t, "teacher")
    _check_tiling(s, "student")
    # Document start: the first token's start on each side; both must agree.
    t_start = _first_start(t, num_docs)
    s_start = _first_start(s, num_docs)
    both = (t.counts > 0) & (s.counts > 0)
    bad = np.flatnonzero(both & (t_start != s_start))
    if bad.size:
        d = int(bad[0])
        raise ByteIdentityError(
            f"document {d}: the teacher's tokens start at byte {int(t_start[d])} but the student's at "
            f"{int(s_start[d])}; both tokenizations must cover the same text (docs/method.md, 'Chunks': leading-space repair)"
        )
    doc_start = np.where(t.counts > 0, t_start, s_start)
    # Disjoint global byte keys: byte b of document d is key base[d] + b - doc_start[d].
    doc_len = np.maximum(_last_end(t, num_docs), _last_end(s, num_docs)) - doc_start
    base = np.concatenate([[0], np.cumsum(doc_len + 1)])
    total = int(base[-1])
    # int64 keys: numpy gathers and scatters with native-width indices without a cast.
    shift = base[:-1] - doc_start
    t_shift = np.repeat(shift, t.counts)
    s_shift = np.repeat(shift, s.counts)
    t_end_key = np.add(t.ends, t_shift, dtype=np.int64)
    s_end_key = np.add(s.ends, s_shift, dtype=np.int64)

    # Text chunks (docs/method.md, "Chunks"): chunk ends = teacher token ends ∩ student token ends,
    # strictly after the document start. One bitmap per side over the batch's bytes
    # answers "does the other side end here?" for every token in O(1); a non-empty text
    # token whose end the other side shares *closes* a chunk (exactly one per common end,
    # as non-empty spans tile), so a token's chunk is the number of closers before it.
    t_closer = _closers(t, t_end_key, _end_bitmap(s, s_end_key, total))
    s_closer = _closers(s, s_end_key, _end_bitmap(t, t_end_key, total))
    t_idx, doc_text_lo, doc_text_hi = _closer_counts(t, t_closer)
    s_idx, s_lo, s_hi = _closer_counts(s, s_closer)
    if not (np.array_equal(doc_text_lo, s_lo) and np.array_equal(doc_text_hi, s_hi)):
        raise AssertionError("align: the two sides disagree on the number of common token ends")
    # Text chunk c ends where its closer ends and starts where the previous chunk of its
    # document ends (or at the document start); documents keep their own byte offsets.
    num_text = int(doc_text_hi[-1])
    text_hi = np.compress(t_closer, t.ends)  # (a boolean index is ~7x slower on random masks)
    text_lo = np.empty_like(text_hi)
    has_text = doc_text_hi > doc_text_lo
    if num_text:
        text_lo[1:] = text_hi[:-1]
        text_lo[doc_text_lo[has_text]] = doc_start[has_text]

    # Slot chunks: matching units at the same byte position (Python over the few units).
    if t.has_slots or s.has_slots:
        slot_key, slot_sub, t_slot_chunk, s_slot_chunk = _match_slots(t, s, t.starts + t_shift, s.starts + s_shift)
    else:
        slot_key = slot_sub = np.zeros(0, np.int64)
        t_slot_chunk = s_slot_chunk = None

    if not slot_key.size:  # text chunks only: already in document and byte order
        order = rank = None
        doc_first_rank = np.append(doc_text_lo, num_text)
        chunk_bytes = np.empty((num_text, 2), dtype=np.int64)
        chunk_bytes[:, 0], chunk_bytes[:, 1] = text_lo, text_hi
        chunk_slot = np.zeros(num_text, dtype=bool)
    else:
        # Order all chunks by (document, position, text before slot, slot order).
        slot_doc = np.searchsorted(base, slot_key, side="right") - 1
        slot_at = slot_key - base[:-1][slot_doc] + doc_start[slot_doc]
        chunk_doc = np.concatenate([np.repeat(np.arange(num_docs), doc_text_hi - doc_text_lo), slot_doc])
        chunk_hi = np.concatenate([text_hi.astype(np.int64), slot_at])
        chunk_lo = np.concatenate([text_lo.astype(np.int64), slot_at])
        sub = np.concatenate([np.zeros(num_text, np.int64), slot_sub])
        order = np.lexsort((sub, chunk_hi, chunk_doc))
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        doc_first_rank = np.searchsorted(chunk_doc[order], np.arange(num_docs + 1), side="left")
        chunk_bytes = np.stack([chunk_lo[order], chunk_hi[order]], axis=1)
        chunk_slot = (np.arange(order.size) >= num_text)[order]

    t_chunk = _assign(t, t_idx, doc_text_hi, rank, doc_first_rank, t_slot_chunk, num_text)
    s_chunk = _assign(s, s_idx, doc_text_hi, rank, doc_first_rank, s_slot_chunk, num_text)

    out = []
    for d in range(num_docs):
        a, b = doc_first_rank[d], doc_first_rank[d + 1]
        out.append(
            Alignment(
                teacher_chunk=t_chunk[t.offsets[d] : t.offsets[d + 1]],
                student_chunk=s_chunk[s.offsets[d] : s.offsets[d + 1]],
                num_chunks=int(b - a),
                chunk_bytes=chunk_bytes[a:b],
                chunk_slot=chunk_slot[a:b],
            )
        )
    return out


def _first_start(side: _Side, num_docs: int) -> np.ndarray:
    out = np.zeros(num_docs, dtype=np.int64)
    has = side.counts > 0
    out[has] = side.starts[side.offsets[:-1][has]]
    return out


def _last_end(side: _Side, num_docs: int) -> np.ndarray:
    out = np.zeros(num_docs, dtype=np.int64)
    has = side.counts > 0
    out[has] = side.ends[side.offsets[1:][has] - 1]
    return out


def _end_bitmap(side: _Side, end_key: np.ndarray, total: int) -> np.ndarray:
    """(total,) bool: some text token of ``side`` ends at this byte key."""
    out = np.zeros(total, dtype=bool)
    out[end_key if side.text is None else np.compress(side.text, end_key)] = True
    return out


def _closers(side: _Side, end_key: np.ndarray, other_ends: np.ndarray) -> np.ndarray:
    """(N,) bool: non-empty text tokens whose end the other side shares (a chunk end)."""
    closer = other_ends.take(end_key)
    if side.has_empty:
        closer &= side.ends != side.starts
    if side.text is not None:
        closer &= side.text
    return closer


def _closer_counts(side: _Side, closer: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global text chunk index per token and each document's [lo, hi) text chunk range.

    A token's text chunk is the number of closers before it: a non-empty token belongs to
    the chunk its first shared end at or after it closes, an empty token to the chunk
    after the end it sits on.
    """
    index_dtype = np.int32 if closer.size < 2**31 else np.int64
    upto = np.zeros(closer.size + 1, dtype=index_dtype)
    np.cumsum(closer, dtype=index_dtype, out=upto[1:])
    idx = upto[:-1]  # closers strictly before each token
    return idx, upto[side.offsets[:-1]].astype(np.int64), upto[side.offsets[1:]].astype(np.int64)


def _check_tiling(side: _Side, name: str) -> None:
    """Text spans contiguous, specials empty and in place (docs/method.md, "Byte view of a tokenizer" invariant).

    Sets ``side.has_empty`` (some token has an empty span). The common case costs two
    passes: the minimum token length, and the token boundaries that do not continue
    the previous token, which must all be document starts.
    """
    starts, ends = side.starts, side.ends
    side.has_empty = False
    if not starts.size:
        return
    min_len = int((ends - starts).min())
    side.has_empty = min_len == 0
    breaks = starts[1:] != ends[:-1]
    first = side.offsets[:-1][side.counts > 0]
    ok = (
        min_len >= 0
        and np.count_nonzero(breaks) == np.count_nonzero(breaks[first[first > 0] - 1])
        and int(starts[first].min()) >= 0
    )
    if ok and side.text is not None:
        ok = not np.any(~side.text & (ends != starts))
    if ok:
        return
    problem = ends < starts
    problem[1:] |= breaks
    problem[first] = (ends[first] < starts[first]) | (starts[first] < 0)  # a document starts afresh
    if side.text is not None:
        problem |= ~side.text & (ends != starts)
    bad = np.flatnonzero(problem)
    if bad.size:
        k = int(bad[0])
        d = int(side.doc[k])
        i = k - int(side.offsets[d])
        raise ByteIdentityError(
            f"document {d}: {name} token {i} has span {[int(starts[k]), int(ends[k])]}, which does not continue "
            f"the previous token at byte {int(ends[k - 1]) if i else int(starts[k])}; token spans must "
            "tile the text (special tokens empty) — use ByteTokenizer.encode to compute them"
        )


def _units(side: _Side, start_key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slot units: runs of special tokens with the same label at the same position.

    Returns (unit start rows, unit end rows, unit position keys).
    """
    rows = np.flatnonzero(side.slot >= 0) if side.slot is not None else np.zeros(0, np.int64)
    if not rows.size:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    new = np.ones(rows.size, dtype=bool)
    new[1:] = (
        (rows[1:] != rows[:-1] + 1)
        | (side.slot[rows[1:]] != side.slot[rows[:-1]])
        | (start_key[rows[1:]] != start_key[rows[:-1]])
        | side.own_unit[rows[1:]]
    )
    starts = rows[new]
    ends = np.append(rows[np.flatnonzero(new)[1:] - 1], rows[-1]) + 1
    return starts, ends, start_key[starts]


def _match_slots(
    t: _Side, s: _Side, t_start_key: np.ndarray, s_start_key: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pair slot units at equal positions (docs/method.md, "Chunks").

    Returns:
        slot_pos (P,) int64 position key of each slot chunk, slot_sub (P,) int64 order
        among chunks at that position (≥ 1, after the text chunk ending there), and
        (T,) / (S,) int64 index into the slot chunks for each token (-1 = none).
    """
    t_start, t_end, t_pos = _units(t, t_start_key)
    s_start, s_end, s_pos = _units(s, s_start_key)
    t_slot_chunk = np.full(t.starts.size, -1, dtype=np.int64)
    s_slot_chunk = np.full(s.starts.size, -1, dtype=np.int64)
    positions, subs = [], []
    shared = np.intersect1d(t_pos, s_pos)
    # Truncation (docs/method.md, "Chunks"): a slot beyond either side's last byte can never pair; the
    # position test below already guarantees that, as both sides must have a unit there.
    for p in shared.tolist():
        tu = np.flatnonzero(t_pos == p)
        su = np.flatnonzero(s_pos == p)
        t_labels = t.slot[t_start[tu]]
        s_labels = s.slot[s_start[su]]
        # One-sided units: slots the other side does not render here (e.g. Llama-3 bos
        # against Qwen2) belong to no chunk.
        tu = tu[np.isin(t_labels, s_labels)]
        su = su[np.isin(s_labels, t_labels)]
        n = min(tu.size, su.size)
        if not np.array_equal(t.slot[t_start[tu[:n]]], s.slot[s_start[su[:n]]]):
            d = int(t.doc[t_start[tu[0]]])
            raise ByteIdentityError(
                f"document {d}: different chat-template slots at the same byte position "
                f"(teacher {t.slot[t_start[tu]].tolist()}, student {s.slot[s_start[su]].tolist()}); "
                "render both sides from the same segment list (docs/method.md, 'Chunks')"
            )
        for k in range(n):
            idx = len(positions)
            positions.append(p)
            subs.append(k + 1)
            t_slot_chunk[t_start[tu[k]] : t_end[tu[k]]] = idx
            s_slot_chunk[s_start[su[k]] : s_end[su[k]]] = idx
    return (
        np.asarray(positions, dtype=np.int64),
        np.asarray(subs, dtype=np.int64),
        t_slot_chunk,
        s_slot_chunk,
    )


def _assign(
    side: _Side,
    idx: np.ndarray,
    doc_text_hi: np.ndarray,
    rank: np.ndarray | None,
    doc_first_rank: np.ndarray,
    slot_chunk: np.ndarray | None,
    num_text_chunks: int,
) -> np.ndarray:
    """Chunk id per token, local to its document, from its global text chunk index.

    Tokens past their document's last chunk end (truncation) get -1; slot tokens take
    their slot chunk; with slot chunks present, ``rank`` maps text and slot chunks to
    their final order.
    """
    if not idx.size:
        return np.zeros(0, dtype=np.int32)
    if rank is None:  # no slot chunks: text chunk order is the final order
        out = idx - np.repeat(doc_first_rank[:-1].astype(idx.dtype), side.counts)
        # ``idx`` is non-decreasing over the batch, so each document's tokens past its
        # last chunk end (idx == its chunk count) are a suffix found by binary search.
        # (Queries in idx's dtype: mixed dtypes would make numpy cast the whole of idx.)
        tail = np.maximum(np.searchsorted(idx, doc_text_hi.astype(idx.dtype), side="left"), side.offsets[:-1])
        for d in np.flatnonzero(tail < side.offsets[1:]).tolist():
            out[tail[d] : side.offsets[d + 1]] = -1
        if side.text is not None:
            out[~side.text] = -1
        return out.astype(np.int32, copy=False)
    valid = idx < np.repeat(doc_text_hi.astype(idx.dtype), side.counts)
    if side.text is not None:
        valid &= side.text
    out = np.where(valid, rank[idx.astype(np.int64) * valid], -1)
    slotted = slot_chunk >= 0
    out[slotted] = rank[num_text_chunks + slot_chunk[slotted]]
    chunked = out >= 0
    out[chunked] -= doc_first_rank[side.doc[chunked]]
    return out.astype(np.int32)


def merge_groups(keep: np.ndarray) -> np.ndarray:
    """Group ids of boundary-merged chunks (docs/method.md, "Merging").

    ``g(c) = #{c' < c : keep[c']}``: each group is a run of chunks closed by its first
    kept chunk; the chunks after the last kept chunk form a final group.

    Args:
        keep: (C,) bool, ``exp(σ^T_c) > γ``.

    Returns:
        (C,) int64 group id per chunk, non-decreasing from 0.
    """
    keep = np.asarray(keep, dtype=bool)
    if keep.ndim != 1:
        raise ValueError(f"keep must be 1-D, got shape {keep.shape}")
    out = np.zeros(keep.shape[0], dtype=np.int64)
    if keep.size > 1:
        out[1:] = np.cumsum(keep[:-1])
    return out


def space_chunks(alignment: Alignment, teacher_space: np.ndarray, student_space: np.ndarray) -> Alignment:
    """The ``space`` chunk kind of docs/method.md, "Merging": greedy chunks merged forward.

    A chunk closes its group when it is a slot chunk, when the next chunk is a slot
    chunk (slots stay atomic), when the first token of the next chunk starts with a
    space byte (0x20) on *both* sides, or at the last chunk.

    Args:
        alignment: unconstrained chunks of one document.
        teacher_space: (T,) bool, teacher token's byte view starts with 0x20
            (``tok.boundary_class[ids] == 0``).
        student_space: (S,) bool, likewise for the student.

    Returns:
        A new :class:`Alignment` whose chunks are the merged groups.
    """
    from xtd.align_ids import space_chunks_many  # the batched pass; this is its B = 1 case

    return space_chunks_many([alignment], [teacher_space], [student_space])[0]
