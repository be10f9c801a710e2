"""Chunking of two tokenizations of the same text by byte offsets (spec/ALM.md §3).

A *chunk* is a minimal span whose two ends are token ends on both sides: the chunk ends
are the intersection of the teacher's and the student's token-end byte offsets
(spec §3.1). Special tokens / chat-template slots are atomic units with empty byte
views: matching units at the same byte position on both sides form a *slot chunk*;
one-sided units belong to no chunk. Chunks stop at the first exhausted side
(truncation, spec §3.4).

The result is index arrays (spec §3.5), never dense [B, L, L] matrices: a chunk id per
token (-1 = in no chunk) and the byte range of every chunk. Everything is vectorised
with numpy; :func:`align_many` concatenates a whole batch (per-document byte offsets
keep documents apart) and intersects the end offsets once.

Dimension letters: ``T`` teacher tokens, ``S`` student tokens, ``C`` chunks, ``B``
documents of a batch.
"""

from __future__ import annotations

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
    """Chunks of one document (spec §3.5).

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
    """Leading-space repair of spec §3.3, as a pure function on byte views.

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
    """Chunks of one document (spec §3.1); see :func:`align_many`."""
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
            units pair by slot id at equal byte positions, spec §2.3; ids ≤ -2 mark
            padding, which belongs to no chunk).

    Returns:
        One :class:`Alignment` per document.

    Raises:
        ByteIdentityError: spans that do not tile, sides that start at different
            offsets, or different slots at the same position (spec §3.1 step 3).
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
        spans = np.concatenate(spans_list) if total else np.zeros((0, 2), np.int64)
        # int32 offsets stay int32 (half the memory traffic); anything else becomes int64.
        self.spans = spans if spans.dtype in (np.int32, np.int64) else spans.astype(np.int64)
        self.doc = np.repeat(np.arange(len(spans_list)), counts)
        # Slot labels: -1 text everywhere, filled in only for documents that have specials.
        self.slot = np.full(total, -1, dtype=np.int64)
        self.own_unit = np.zeros(total, dtype=bool)
        self.has_slots = False
        for d, special in enumerate(special_list):
            if special is not None:
                self.has_slots = True
                lo, hi = int(self.offsets[d]), int(self.offsets[d + 1])
                self.slot[lo:hi], self.own_unit[lo:hi] = _slot_labels(special, hi - lo, d, side)


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
            f"{int(s_start[d])}; both tokenizations must cover the same text (spec §3.3 leading-space repair)"
        )
    doc_start = np.where(t.counts > 0, t_start, s_start)
    # Disjoint global byte keys: byte b of document d is key base[d] + b - doc_start[d].
    doc_len = np.maximum(_last_end(t, num_docs), _last_end(s, num_docs)) - doc_start
    base = np.concatenate([[0], np.cumsum(doc_len + 1)])
    total = int(base[-1])
    shift = base[:-1] - doc_start
    if total < 2**31 - 1 and t.spans.dtype == s.spans.dtype == np.int32:
        shift = shift.astype(np.int32)
    t_key = t.spans + np.repeat(shift, t.counts)[:, None]
    s_key = s.spans + np.repeat(shift, s.counts)[:, None]

    # Text chunks (spec §3.1): chunk ends = teacher token ends ∩ student token ends,
    # strictly after the document start. A bitmap over the batch's bytes makes the
    # intersection and the token → chunk lookup O(bytes) instead of a sort or a search.
    t_text = t.slot == -1
    s_text = s.slot == -1
    is_end = np.zeros(total, dtype=bool)
    is_end[t_key[t_text, 1] if t.has_slots else t_key[:, 1]] = True
    s_end = np.zeros(total, dtype=bool)
    s_end[s_key[s_text, 1] if s.has_slots else s_key[:, 1]] = True
    is_end &= s_end
    is_end[base[:-1]] = False
    common = np.flatnonzero(is_end)
    index_dtype = np.int32 if total < 2**31 else np.int64
    ends_upto = np.cumsum(is_end, dtype=index_dtype)  # (total,) chunk ends at or before each byte
    doc_text_lo = ends_upto[base[:-1]].astype(np.int64)  # start bytes are never chunk ends
    doc_text_hi = ends_upto[base[1:] - 1].astype(np.int64)
    common_doc = np.repeat(np.arange(num_docs), doc_text_hi - doc_text_lo)
    text_chunk_start = np.empty_like(common)
    if common.size:
        text_chunk_start[1:] = common[:-1]
        first_in_doc = doc_text_lo[doc_text_hi > doc_text_lo]
        text_chunk_start[first_in_doc] = base[:-1][common_doc[first_in_doc]]

    # Slot chunks: matching units at the same byte position (Python over the few units).
    slot_pos, slot_sub, t_slot_chunk, s_slot_chunk = _match_slots(t, s, t_key, s_key)

    # Order all chunks by (position, text before slot, slot order) — documents are
    # disjoint in key space, so this also groups them by document. Text chunk ends are
    # already sorted; only slot chunks need a real sort.
    pos = np.concatenate([common, slot_pos])
    chunk_doc = np.concatenate([common_doc, np.searchsorted(base, slot_pos, side="right") - 1])
    if slot_pos.size:
        sub = np.concatenate([np.zeros(common.size, np.int64), slot_sub])
        order = np.lexsort((sub, pos))
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        doc_first_rank = np.searchsorted(chunk_doc[order], np.arange(num_docs + 1), side="left")
    else:
        order = rank = None
        doc_first_rank = np.append(doc_text_lo, common.size)

    t_chunk = _assign(t, t_key, t_text, ends_upto, doc_text_hi, rank, doc_first_rank, t_slot_chunk, common.size)
    s_chunk = _assign(s, s_key, s_text, ends_upto, doc_text_hi, rank, doc_first_rank, s_slot_chunk, common.size)

    chunk_lo = np.concatenate([text_chunk_start, slot_pos])
    chunk_hi = pos
    chunk_slot = np.concatenate([np.zeros(common.size, bool), np.ones(slot_pos.size, bool)])
    if order is not None:
        chunk_lo, chunk_hi, chunk_doc, chunk_slot = chunk_lo[order], chunk_hi[order], chunk_doc[order], chunk_slot[order]
    shift = (doc_start - base[:-1])[chunk_doc]
    chunk_bytes = np.stack([chunk_lo + shift, chunk_hi + shift], axis=1)

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
    out[has] = side.spans[side.offsets[:-1][has], 0]
    return out


def _last_end(side: _Side, num_docs: int) -> np.ndarray:
    out = np.zeros(num_docs, dtype=np.int64)
    has = side.counts > 0
    out[has] = side.spans[side.offsets[1:][has] - 1, 1]
    return out


def _check_tiling(side: _Side, name: str) -> None:
    """Text spans contiguous, specials empty and in place (spec §2.1 invariant)."""
    spans = side.spans
    if not spans.size:
        return
    starts, ends = spans[:, 0], spans[:, 1]
    problem = ends < starts
    problem[1:] |= starts[1:] != ends[:-1]
    first = side.offsets[:-1][side.counts > 0]
    problem[first] = (ends[first] < starts[first]) | (starts[first] < 0)  # a document starts afresh
    if side.has_slots:
        problem |= (side.slot != -1) & (ends != starts)
    bad = np.flatnonzero(problem)
    if bad.size:
        k = int(bad[0])
        d = int(side.doc[k])
        i = k - int(side.offsets[d])
        raise ByteIdentityError(
            f"document {d}: {name} token {i} has span {spans[k].tolist()}, which does not continue the "
            f"previous token at byte {int(spans[k - 1, 1]) if i else int(spans[k, 0])}; token spans must "
            "tile the text (special tokens empty) — use ByteTokenizer.encode to compute them"
        )


def _units(side: _Side, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slot units: runs of special tokens with the same label at the same position.

    Returns (unit start rows, unit end rows, unit position keys).
    """
    rows = np.flatnonzero(side.slot >= 0)
    if not rows.size:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    new = np.ones(rows.size, dtype=bool)
    new[1:] = (
        (rows[1:] != rows[:-1] + 1)
        | (side.slot[rows[1:]] != side.slot[rows[:-1]])
        | (key[rows[1:], 0] != key[rows[:-1], 0])
        | side.own_unit[rows[1:]]
    )
    starts = rows[new]
    ends = np.append(rows[np.flatnonzero(new)[1:] - 1], rows[-1]) + 1
    return starts, ends, key[starts, 0]


def _match_slots(
    t: _Side, s: _Side, t_key: np.ndarray, s_key: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pair slot units at equal positions (spec §3.1 steps 2–3).

    Returns:
        slot_pos (P,) int64 position key of each slot chunk, slot_sub (P,) int64 order
        among chunks at that position (≥ 1, after the text chunk ending there), and
        (T,) / (S,) int64 index into the slot chunks for each token (-1 = none).
    """
    t_start, t_end, t_pos = _units(t, t_key)
    s_start, s_end, s_pos = _units(s, s_key)
    t_slot_chunk = np.full(t.slot.size, -1, dtype=np.int64)
    s_slot_chunk = np.full(s.slot.size, -1, dtype=np.int64)
    positions, subs = [], []
    shared = np.intersect1d(t_pos, s_pos)
    # Truncation (spec §3.4): a slot beyond either side's last byte can never pair; the
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
                "render both sides from the same segment list (spec §3.1 step 3)"
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
    key: np.ndarray,
    text: np.ndarray,
    ends_upto: np.ndarray,
    doc_text_hi: np.ndarray,
    rank: np.ndarray | None,
    doc_first_rank: np.ndarray,
    slot_chunk: np.ndarray,
    num_text_chunks: int,
) -> np.ndarray:
    """Chunk id per token: the first chunk end ≥ the token's end (empty tokens: > it).

    ``ends_upto[b]`` counts the chunk ends at or before byte key ``b``, so a token ending
    at ``e`` belongs to text chunk ``ends_upto[e - 1]`` (``ends_upto[e]`` when empty).
    Tokens past their document's last chunk end (truncation) get -1.
    """
    ends = key[:, 1]
    if not ends.size:
        return np.zeros(0, dtype=np.int32)
    idx = ends_upto[ends - (key[:, 0] != ends)]
    valid = idx < np.repeat(doc_text_hi.astype(idx.dtype), side.counts)
    if side.has_slots:
        valid &= text
    if rank is None:  # no slot chunks: text chunk order is the final order
        return np.where(valid, idx - np.repeat(doc_first_rank[:-1].astype(idx.dtype), side.counts), -1).astype(np.int32)
    out = np.where(valid, rank[idx.astype(np.int64) * valid], -1)
    slotted = slot_chunk >= 0
    out[slotted] = rank[num_text_chunks + slot_chunk[slotted]]
    chunked = out >= 0
    out[chunked] -= doc_first_rank[side.doc[chunked]]
    return out.astype(np.int32)


def merge_groups(keep: np.ndarray) -> np.ndarray:
    """Group ids of boundary-merged chunks (spec §4.2 step 5).

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
    """The ``space`` chunk kind of spec §3.2: greedy chunks merged forward.

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
    num = alignment.num_chunks
    t_space = np.asarray(teacher_space, dtype=bool)
    s_space = np.asarray(student_space, dtype=bool)
    if t_space.shape != alignment.teacher_chunk.shape or s_space.shape != alignment.student_chunk.shape:
        raise ValueError("teacher_space/student_space must have one entry per token")
    if num == 0:
        return alignment
    t_first = alignment.teacher_ranges[:, 0]
    s_first = alignment.student_ranges[:, 0]
    closes = np.ones(num, dtype=bool)
    next_space = t_space[t_first[1:]] & s_space[s_first[1:]]
    closes[:-1] = alignment.chunk_slot[:-1] | alignment.chunk_slot[1:] | next_space
    group = merge_groups(closes)
    num_groups = int(group[-1]) + 1
    lo = np.full(num_groups, np.iinfo(np.int64).max)
    hi = np.zeros(num_groups, dtype=np.int64)
    np.minimum.at(lo, group, alignment.chunk_bytes[:, 0])
    np.maximum.at(hi, group, alignment.chunk_bytes[:, 1])
    slot = np.zeros(num_groups, dtype=bool)
    slot[group[alignment.chunk_slot]] = True

    def remap(chunk: np.ndarray) -> np.ndarray:
        return np.where(chunk >= 0, group[np.maximum(chunk, 0)], -1).astype(np.int32)

    return Alignment(
        teacher_chunk=remap(alignment.teacher_chunk),
        student_chunk=remap(alignment.student_chunk),
        num_chunks=num_groups,
        chunk_bytes=np.stack([lo, hi], axis=1),
        chunk_slot=slot,
    )
