"""Alignment straight from token ids, a whole batch per call, at array speed.

:mod:`xtd.align` chunks two tokenizations given their byte spans. This module supplies
what a caller that holds only token ids needs (a pre-tokenised dataset, a reference
collator's inputs), and the ``space`` chunk kind for a whole batch at once:

* :func:`spans_from_ids`: byte spans from ids through the tokenizer's per-token byte-length
  table (``ByteTokenizer.token_lengths``): one gather and one cumulative sum over the
  concatenated batch, equal to ``ByteTokenizer.encode(text).spans`` for ids that encode
  a text (without the byte-identity check, which needs the text);
* :func:`space_chunks_many`: unconstrained chunks merged into space chunks for a batch of
  documents in one vectorised pass (``xtd.align.space_chunks`` is its one-document case);
* :func:`align_ids`: ids of both sides → either chunk kind, for a batch
  (:func:`align_ids_both`: both kinds from one unconstrained pass).

Chunks and space chunks are defined in (docs/method.md, "Chunks"); the leading space that
a SentencePiece dummy prefix adds is described in (docs/method.md, "Byte view of a
tokenizer").

Dimension letters: ``T`` teacher tokens, ``S`` student tokens, ``C`` chunks, ``B``
documents of a batch, ``V`` vocabulary entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np

from xtd.align import Alignment, align_many
from xtd.errors import TokenizerError

__all__ = ["ChunkKind", "TokenTables", "align_ids", "align_ids_both", "space_chunks_many", "spans_from_ids"]

ChunkKind = Literal["unconstrained", "space"]


class TokenTables(Protocol):
    """What alignment from ids reads from a tokenizer (``xtd.tokenization.ByteTokenizer``)."""

    name: str
    kind: str  # "wordpiece" byte views depend on the text, so ids alone cannot give spans
    token_lengths: np.ndarray  # (V,) int, byte length of each id's view (0 for specials)
    boundary_class: np.ndarray  # (V,) int8, 0 = the view starts with a space byte
    has_dummy_prefix: bool

    def special_mask(self, ids: np.ndarray) -> np.ndarray: ...


def _concat(ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 concatenated ids and (B + 1,) offsets of each document."""
    arrays = [np.asarray(x).reshape(-1) for x in ids]
    counts = np.fromiter((a.size for a in arrays), np.int64, len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int64, copy=False) if offsets[-1] else np.zeros(0, np.int64)
    return flat, offsets


def _flat_spans(tokenizer: TokenTables, flat: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 starts and ends of every token, each document counted from byte 0."""
    if tokenizer.kind == "wordpiece":
        raise TokenizerError(
            f"tokenizer {tokenizer.name!r} is WordPiece: its byte views depend on the text around "
            "each token, so spans cannot come from ids alone; use ByteTokenizer.encode"
        )
    table = tokenizer.token_lengths
    if flat.size and (int(flat.min()) < 0 or int(flat.max()) >= table.shape[0]):
        raise TokenizerError(
            f"token ids outside the vocabulary of tokenizer {tokenizer.name!r} (0..{table.shape[0] - 1})"
        )
    lens = table[flat]  # (N,)
    ends = np.cumsum(lens)
    # Each document restarts at byte 0: subtract the bytes of the documents before it.
    before = np.concatenate([[0], ends])[offsets]  # (B + 1,)
    base = np.repeat(before[:-1], np.diff(offsets))
    if tokenizer.has_dummy_prefix and flat.size:
        # The dummy prefix adds one space that is not in the text to the first non-empty
        # view; ByteTokenizer.encode absorbs it into the first token, so spans stay text
        # offsets. Here: shift the document by one byte when its views start with 0x20.
        first = np.searchsorted(ends, before[:-1], side="right")  # first non-empty token
        has = first < offsets[1:]
        dummy = np.zeros(offsets.size - 1, dtype=np.int64)
        dummy[has] = tokenizer.boundary_class[flat[first[has]]] == 0
        base += np.repeat(dummy, np.diff(offsets))
    ends -= base
    starts = np.maximum(ends - lens, 0)
    np.maximum(ends, 0, out=ends)
    return starts, ends


def spans_from_ids(tokenizer: TokenTables, ids: Sequence[Any]) -> list[np.ndarray]:
    """Byte spans of a batch of token-id sequences, from the per-token byte-length table.

    Equal to ``tokenizer.encode(text).spans`` for the ids that encode ``text`` (a
    SentencePiece dummy-prefix space is absorbed into the first token, as there), but
    without the byte-identity check, which needs the text.

    Args:
        tokenizer: a ``ByteTokenizer`` (or anything with its :class:`TokenTables`).
        ids: B sequences of token ids, each (N_b,) int.

    Returns:
        B arrays (N_b, 2) int32 of half-open byte offsets; special tokens have empty spans.

    Raises:
        TokenizerError: ids outside the vocabulary, or a WordPiece tokenizer.
    """
    flat, offsets = _concat(ids)
    starts, ends = _flat_spans(tokenizer, flat, offsets)
    spans = np.stack([starts, ends], axis=1).astype(np.int32)  # (N, 2)
    return [spans[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


def space_chunks_many(
    alignments: Sequence[Alignment], teacher_space: Sequence[Any], student_space: Sequence[Any]
) -> list[Alignment]:
    """The ``space`` chunk kind for a batch of documents, in one vectorised pass.

    Unconstrained chunks are merged forward: a chunk closes its group when it is a slot
    chunk, when the next chunk is a slot chunk (slots stay atomic), when the first token
    of the next chunk starts with a space byte (0x20) on *both* sides, or when it is the
    document's last chunk.

    Args:
        alignments: B unconstrained :class:`~xtd.align.Alignment` (from ``align_many``).
        teacher_space: B (T_b,) bool, the teacher token's view starts with 0x20
            (``tokenizer.boundary_class[ids] == 0``).
        student_space: B (S_b,) bool, likewise for the student.

    Returns:
        B new alignments whose chunks are the merged groups.

    Raises:
        ValueError: lengths that do not match, or alignments not made by :mod:`xtd.align`.
    """
    num_docs = len(alignments)
    if len(teacher_space) != num_docs or len(student_space) != num_docs:
        raise ValueError("space_chunks: one teacher_space and one student_space array per alignment")
    if not num_docs:
        return []
    t_space = np.concatenate([np.asarray(x, dtype=bool).reshape(-1) for x in teacher_space])
    s_space = np.concatenate([np.asarray(x, dtype=bool).reshape(-1) for x in student_space])
    t_sizes = np.fromiter((np.size(x) for x in teacher_space), np.int64, num_docs)
    s_sizes = np.fromiter((np.size(x) for x in student_space), np.int64, num_docs)
    if not (
        np.array_equal(t_sizes, [a.teacher_chunk.size for a in alignments])
        and np.array_equal(s_sizes, [a.student_chunk.size for a in alignments])
    ):
        raise ValueError("teacher_space/student_space must have one entry per token")
    return _merge_space(alignments, t_space, s_space)


class _Chunked:
    """One side of a batch of alignments, concatenated: local chunk ids, document offsets."""

    def __init__(self, chunks: list[np.ndarray], space: np.ndarray) -> None:
        self.counts = np.fromiter((c.size for c in chunks), np.int64, len(chunks))
        self.offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])
        self.chunk = np.concatenate(chunks)  # (N,) local chunk id per token, -1 = none
        # Usually every token is in a chunk (no truncation, no one-sided slots): then the
        # chunked tokens are all tokens and two gathers and a scatter can be skipped.
        self.rows = None if not self.chunk.size or self.chunk.min() >= 0 else np.flatnonzero(self.chunk >= 0)
        ids = self.chunk if self.rows is None else self.chunk[self.rows]
        size = ids.size
        # A token starts a chunk when its id differs from the previous chunked token's, or
        # when it is its document's first chunked token (ids restart at 0 per document).
        first = np.ones(size, dtype=bool)
        np.not_equal(ids[1:], ids[:-1], out=first[1:])
        doc_first = self.offsets[:-1] if self.rows is None else np.searchsorted(self.rows, self.offsets[:-1])
        first[doc_first[doc_first < size]] = True
        at = np.flatnonzero(first)  # (C,) position among the chunked tokens of each chunk's first
        self.run = np.diff(np.append(at, size))  # (C,) chunked tokens per chunk
        self.starts_space = space.take(at if self.rows is None else self.rows.take(at))  # (C,) in chunk order

    def remap(self, lo_group: np.ndarray, closes_before: np.ndarray) -> np.ndarray:
        """(N,) int32 group id per token, local to its document.

        ``closes_before[c]`` is the number of groups closed before global chunk c (its
        global group) and ``lo_group[c]`` the first group of c's document.
        """
        local_group = (closes_before - lo_group).astype(np.int32)  # (C,)
        if self.rows is None:
            return np.repeat(local_group, self.run)
        out = np.full(self.chunk.size, -1, dtype=np.int32)
        out[self.rows] = np.repeat(local_group, self.run)
        return out


def _merge_space(alignments: Sequence[Alignment], t_space: np.ndarray, s_space: np.ndarray) -> list[Alignment]:
    """:func:`space_chunks_many` on validated inputs (space flags concatenated)."""
    num_docs = len(alignments)
    c_counts = np.fromiter((a.num_chunks for a in alignments), np.int64, num_docs)
    c_off = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(c_counts, out=c_off[1:])
    num = int(c_off[-1])
    if not num:
        return list(alignments)
    t = _Chunked([a.teacher_chunk for a in alignments], t_space)
    s = _Chunked([a.student_chunk for a in alignments], s_space)
    if t.starts_space.size != num or s.starts_space.size != num:
        raise ValueError("space_chunks: some chunk has no token on one side; pass alignments made by xtd.align")
    slot = np.concatenate([a.chunk_slot for a in alignments])
    chunk_bytes = np.concatenate([a.chunk_bytes for a in alignments])
    closes = np.empty(num, dtype=bool)
    closes[:-1] = slot[:-1] | slot[1:] | (t.starts_space[1:] & s.starts_space[1:])
    closes[c_off[1:][c_counts > 0] - 1] = True  # a document's last chunk closes its group
    upto = np.zeros(num + 1, dtype=np.int64)  # groups closed before each chunk
    np.cumsum(closes, out=upto[1:])
    last = np.flatnonzero(closes)  # last chunk of each group
    first = np.concatenate([[0], last[:-1] + 1])
    # Chunks are in byte order within a document, so a group spans first-lo .. last-hi;
    # a slot chunk is always a group of its own.
    group_bytes = np.stack([chunk_bytes[first, 0], chunk_bytes[last, 1]], axis=1)
    group_slot = slot[first]
    g_off = upto[c_off]  # (B + 1,) first group of each document
    lo_group = np.repeat(g_off[:-1], c_counts)  # (C,)
    t_new = t.remap(lo_group, upto[:-1])
    s_new = s.remap(lo_group, upto[:-1])
    t_off, s_off, g = t.offsets.tolist(), s.offsets.tolist(), g_off.tolist()
    return [
        Alignment(
            teacher_chunk=t_new[t_off[d] : t_off[d + 1]],
            student_chunk=s_new[s_off[d] : s_off[d + 1]],
            num_chunks=g[d + 1] - g[d],
            chunk_bytes=group_bytes[g[d] : g[d + 1]],
            chunk_slot=group_slot[g[d] : g[d + 1]],
        )
        for d in range(num_docs)
    ]


def align_ids(
    teacher: TokenTables,
    student: TokenTables,
    teacher_ids: Sequence[Any],
    student_ids: Sequence[Any],
    *,
    chunks: ChunkKind = "unconstrained",
) -> list[Alignment]:
    """Chunks of a batch of documents given only the token ids of both sides.

    Spans come from :func:`spans_from_ids`; special tokens (``special_mask``) are atomic
    units paired in order at equal byte positions, as ``align_many`` does with bool masks.

    Args:
        teacher: the teacher's ``ByteTokenizer`` (or :class:`TokenTables`).
        student: the student's.
        teacher_ids: B (T_b,) int teacher id sequences.
        student_ids: B (S_b,) int student id sequences of the same texts (either side may
            be truncated).
        chunks: ``"unconstrained"`` or ``"space"``.

    Returns:
        One :class:`~xtd.align.Alignment` per document.

    Raises:
        ValueError: different numbers of documents, or an unknown chunk kind.
        TokenizerError: ids outside a vocabulary, or a WordPiece tokenizer.
        ByteIdentityError: the two sides do not start at the same byte.
    """
    if chunks not in ("unconstrained", "space"):
        raise ValueError(f"align_ids: unknown chunk kind {chunks!r}; choose unconstrained or space")
    alignments, t_flat, s_flat = _unconstrained(teacher, student, teacher_ids, student_ids)
    if chunks == "unconstrained":
        return alignments
    return _merge_space(alignments, teacher.boundary_class[t_flat] == 0, student.boundary_class[s_flat] == 0)


def align_ids_both(
    teacher: TokenTables, student: TokenTables, teacher_ids: Sequence[Any], student_ids: Sequence[Any]
) -> tuple[list[Alignment], list[Alignment]]:
    """Both chunk kinds of a batch from ids, sharing one unconstrained pass.

    Arguments and errors as :func:`align_ids`.

    Returns:
        ``(unconstrained, space)``: one :class:`~xtd.align.Alignment` per document each.
    """
    alignments, t_flat, s_flat = _unconstrained(teacher, student, teacher_ids, student_ids)
    space = _merge_space(alignments, teacher.boundary_class[t_flat] == 0, student.boundary_class[s_flat] == 0)
    return alignments, space


def _unconstrained(
    teacher: TokenTables, student: TokenTables, teacher_ids: Sequence[Any], student_ids: Sequence[Any]
) -> tuple[list[Alignment], np.ndarray, np.ndarray]:
    """Unconstrained alignments of a batch, and the concatenated ids of both sides."""
    if len(teacher_ids) != len(student_ids):
        raise ValueError(f"align_ids: {len(teacher_ids)} teacher documents but {len(student_ids)} student documents")
    t_flat, t_off = _concat(teacher_ids)
    s_flat, s_off = _concat(student_ids)
    t_spans = np.stack(_flat_spans(teacher, t_flat, t_off), axis=1)  # (T, 2)
    s_spans = np.stack(_flat_spans(student, s_flat, s_off), axis=1)  # (S, 2)
    t_special = teacher.special_mask(t_flat)
    s_special = student.special_mask(s_flat)
    t_b, s_b = t_off.tolist(), s_off.tolist()
    docs = range(len(t_b) - 1)
    if t_special.any() or s_special.any():
        pairs: list[tuple[Any, ...]] = [
            (t_spans[t_b[d] : t_b[d + 1]], s_spans[s_b[d] : s_b[d + 1]], t_special[t_b[d] : t_b[d + 1]],
             s_special[s_b[d] : s_b[d + 1]])
            for d in docs
        ]
    else:
        pairs = [(t_spans[t_b[d] : t_b[d + 1]], s_spans[s_b[d] : s_b[d + 1]]) for d in docs]
    return align_many(pairs), t_flat, s_flat
