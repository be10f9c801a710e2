"""One training example: a stored document tokenised for the student, aligned, with its
teacher rows gathered; and a micro-batch of examples, padded.

Dimension letters: ``B`` texts in a micro-batch, ``S`` student tokens, ``T`` teacher
rows, ``K`` top-k, ``H`` hidden size.

A text longer than the limits is **truncated** (docs/method.md, "Chunks"): the student
keeps its first ``max_student_length`` tokens, and the teacher keeps the rows that end
within the bytes those tokens cover (at most ``max_teacher_length``). The alignment stops
at the first exhausted side, so a straddling token never gets a chunk. Both sides are
labelled by :func:`alignment_inputs`, the rules ``xtd align --cache`` applies too
(:mod:`xtd.alignment_cache`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from xtd.align import align, space_chunks
from xtd.errors import DataError
from xtd.losses import teacher_sigma
from xtd.storage import Document
from xtd.tokenization import ByteTokenizer

__all__ = [
    "AlignmentInputs",
    "alignment_inputs",
    "build_example",
    "document_text",
    "pad_examples",
    "pad_id",
    "token_loss_mask",
    "truncate_example",
]


def token_loss_mask(spans: np.ndarray, loss_spans: np.ndarray | None) -> np.ndarray:
    """Which tokens lie in the trained byte ranges (the loss mask of chat data).

    A non-empty token is trained on when its byte range overlaps a loss span; an
    empty (special) token at byte ``p`` when some span has ``start ≤ p < end``.

    Args:
        spans: (N, 2) int byte ranges of the tokens.
        loss_spans: (M, 2) int byte ranges trained on, or None (everything).

    Returns:
        (N,) bool.
    """
    n = len(spans)
    if loss_spans is None:
        return np.ones(n, dtype=bool)
    loss_spans = np.asarray(loss_spans, dtype=np.int64).reshape(-1, loss_spans.shape[-1])[:, :2]
    if n == 0 or len(loss_spans) == 0:
        return np.zeros(n, dtype=bool)
    start = spans[:, 0].astype(np.int64)[:, None]
    end = spans[:, 1].astype(np.int64)[:, None]
    ls, le = loss_spans[None, :, 0], loss_spans[None, :, 1]
    empty = start == end
    overlap = (start < le) & (end > ls) & (le > ls)  # an empty loss span covers nothing
    inside = (ls <= start) & (start < le)
    return np.any(np.where(empty, inside, overlap), axis=1)


def truncate_example(
    student_spans: np.ndarray, teacher_spans: np.ndarray, *, max_student_length: int, max_teacher_length: int | None
) -> tuple[int, int]:
    """How many student tokens and teacher rows to keep (module docstring).

    The student keeps its first ``max_student_length`` tokens; the teacher keeps the
    rows that end within the bytes those tokens cover (rows past them could never
    be in a chunk), at most ``max_teacher_length``.

    Args:
        student_spans: (S, 2) byte ranges of the student tokens.
        teacher_spans: (T, 2) byte ranges of the teacher rows (non-decreasing ends).
        max_student_length: student token limit.
        max_teacher_length: teacher row limit, or None.

    Returns:
        (student tokens kept, teacher rows kept).
    """
    num_student = min(len(student_spans), max_student_length)
    covered = int(student_spans[num_student - 1, 1]) if num_student else 0
    if num_student == len(student_spans):
        num_teacher = len(teacher_spans)  # the student saw every byte
    else:
        num_teacher = int(np.searchsorted(teacher_spans[:, 1], covered, side="right"))
    if max_teacher_length is not None:
        num_teacher = min(num_teacher, max_teacher_length)
    return num_student, num_teacher


_PAD_VALUES = {
    "input_ids": 0,
    "student_chunk": -1,
    "student_scored": False,
    "sft_mask": False,
    "attention_mask": False,
    "teacher_logprob": 0.0,
    "teacher_sigma": 0.0,
    "teacher_chunk": -1,
    "teacher_scored": False,
    "teacher_topk_ids": 0,
    "teacher_topk_logprobs": -np.inf,
    "teacher_tail_logmass": -np.inf,
    "teacher_hidden": 0.0,
}


def pad_examples(examples: Sequence[dict[str, np.ndarray]], *, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack examples into one micro-batch padded to its longest sequence on each side.

    Student arrays (``input_ids``, ``student_*``, ``sft_mask``, ``attention_mask``)
    pad to the longest student sequence, teacher arrays (``teacher_*``) to the
    longest teacher sequence, each with the neutral value of its kind (chunk −1,
    masks False, ids ``pad_id``). Both sides get at least one position, so an
    all-empty micro-batch still runs through the model.

    Args:
        examples: per-example dicts of 1-D (or, for top-k/hidden, 2-D) arrays.
        pad_id: the student's padding id.

    Returns:
        dict of tensors with a leading batch dimension ``B = len(examples)``.
    """
    if not examples:
        raise ValueError("pad_examples needs at least one example")
    out: dict[str, torch.Tensor] = {}
    student_len = max(1, max(len(e["input_ids"]) for e in examples))
    teacher_len = max(1, max(len(e["teacher_logprob"]) for e in examples))
    for key in examples[0]:
        length = teacher_len if key.startswith("teacher_") else student_len
        first = np.asarray(examples[0][key])
        pad = pad_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
        batch = np.full((len(examples), length, *first.shape[1:]), pad, dtype=first.dtype)
        for i, example in enumerate(examples):
            values = np.asarray(example[key])
            batch[i, : len(values)] = values
        out[key] = torch.from_numpy(batch)
    for key in ("input_ids", "student_chunk", "teacher_chunk", "teacher_topk_ids"):
        if key in out:
            out[key] = out[key].long()
    return out


def pad_id(tokenizer: ByteTokenizer) -> int:
    """The id that pads a student micro-batch: the pad token, else eos, else bos, else 0."""
    for name in ("pad_id", "eos_id", "bos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def build_example(
    doc: Document,
    student_tokenizer: ByteTokenizer,
    *,
    columns: Sequence[int],
    max_student_length: int,
    max_teacher_length: int | None,
    alm_chunks: str = "unconstrained",
    need_topk: bool = False,
    need_hidden: bool = False,
    cached: dict[str, np.ndarray] | None = None,
    where: str = "document",
) -> dict[str, np.ndarray]:
    """Tokenise one stored document for the student, align it and gather teacher rows.

    Both sides are labelled by :func:`alignment_inputs` (slot tokens; the student
    mirrors a leading teacher bos with its own), the rules that
    ``xtd align --cache`` applies too.

    Args:
        doc: an ``xtd.storage.Document``.
        student_tokenizer: the student's ``ByteTokenizer``.
        columns: the enabled ``boundary_logmass`` columns.
        max_student_length, max_teacher_length: truncation limits (module docstring).
        alm_chunks: ``unconstrained`` or ``space`` chunk ids.
        need_topk, need_hidden: also gather the teacher's top-k / hidden rows.
        cached: this document's ``xtd align --cache`` record (``student_ids``,
            ``student_spans``, ``student_chunk``, ``teacher_chunk`` over the whole
            document), or None to tokenise and align here.
        where: names the document in error messages.

    Returns:
        dict of 1-D arrays over student tokens (``input_ids`` int64, ``attention_mask``,
        ``student_chunk`` int64, ``student_scored``, ``sft_mask``) and teacher rows
        (``teacher_logprob`` f32 with 0 where not scored, ``teacher_sigma`` f32,
        ``teacher_chunk`` int64, ``teacher_scored``), plus ``teacher_topk_*`` (T, K) and
        ``teacher_hidden`` (T, H) when asked.
    """
    if cached is not None:
        sides = alignment_inputs(
            doc,
            student_tokenizer,
            np.asarray(cached["student_ids"]).astype(np.int64),
            np.asarray(cached["student_spans"]).reshape(-1, 2),
            mirror_bos=False,  # the cache holds the student side as aligned, bos included
        )
    else:
        enc = student_tokenizer.encode(document_text(doc, where=where))
        sides = alignment_inputs(
            doc, student_tokenizer, np.asarray(enc.ids).astype(np.int64), np.asarray(enc.spans).reshape(-1, 2)
        )
    t_spans_full, t_special_full = sides.teacher_spans, sides.teacher_special
    s_ids, s_spans, s_special_full = sides.student_ids, sides.student_spans, sides.student_special

    num_s, num_t = truncate_example(
        s_spans, t_spans_full, max_student_length=max_student_length, max_teacher_length=max_teacher_length
    )
    s_ids, s_spans, t_spans = s_ids[:num_s], s_spans[:num_s], t_spans_full[:num_t]
    if cached is not None:
        t_chunk, s_chunk = _truncate_chunks(
            np.asarray(cached["teacher_chunk"], np.int64), np.asarray(cached["student_chunk"], np.int64), num_t, num_s
        )
    else:
        alignment = align(
            t_spans, s_spans, teacher_special=t_special_full[:num_t], student_special=s_special_full[:num_s]
        )
        if alm_chunks == "space":
            space = student_tokenizer.boundary_class[s_ids] == 0
            t_space = _teacher_space(doc, num_t)
            alignment = space_chunks(alignment, t_space, space)
        t_chunk = np.asarray(alignment.teacher_chunk, dtype=np.int64)
        s_chunk = np.asarray(alignment.student_chunk, dtype=np.int64)

    loss_spans = getattr(doc, "loss_spans", None)
    s_mask = token_loss_mask(s_spans, loss_spans)
    t_mask = token_loss_mask(t_spans, loss_spans)
    t_logprob = np.asarray(doc.token_logprob[:num_t], dtype=np.float32)
    t_valid = np.isfinite(t_logprob)  # NaN: row 0, or a window row without context
    rows_t = np.arange(num_t)
    rows_s = np.arange(num_s)
    example: dict[str, np.ndarray] = {
        "input_ids": s_ids,
        "attention_mask": np.ones(num_s, dtype=bool),
        "student_chunk": s_chunk,
        "student_scored": (rows_s >= 1) & s_mask & (s_chunk >= 0),
        "sft_mask": (rows_s >= 1) & s_mask,
        "teacher_logprob": np.where(t_valid, np.minimum(np.nan_to_num(t_logprob), 0.0), 0.0).astype(np.float32),
        "teacher_sigma": teacher_sigma(np.asarray(doc.boundary_logmass[:num_t]), columns),
        "teacher_chunk": t_chunk,
        "teacher_scored": t_valid & (rows_t >= 1) & t_mask & (t_chunk >= 0),
    }
    if need_topk:
        example["teacher_topk_ids"] = np.asarray(doc.topk_ids[:num_t], dtype=np.int64)
        example["teacher_topk_logprobs"] = np.asarray(doc.topk_logprobs[:num_t], dtype=np.float32)
        example["teacher_tail_logmass"] = np.asarray(doc.tail_logmass[:num_t], dtype=np.float32)
    if need_hidden:
        example["teacher_hidden"] = np.asarray(doc.hidden[:num_t], dtype=np.float32)
    return example


class AlignmentInputs(NamedTuple):
    """Both sides of one stored document, labelled as :func:`xtd.align.align` takes them.

    Attributes:
        teacher_spans: (T, 2) byte ranges of the stored teacher rows.
        teacher_special: (T,) int64 slot label per teacher row, −1 = text.
        student_ids: (S,) student ids (the caller's dtype), a mirrored bos first.
        student_spans: (S, 2) byte ranges of the student tokens.
        student_special: (S,) int64: 0 for a student special token, −1 = text.
    """

    teacher_spans: np.ndarray
    teacher_special: np.ndarray
    student_ids: np.ndarray
    student_spans: np.ndarray
    student_special: np.ndarray


def document_text(doc: Document, *, where: str) -> str:
    """The stored text of ``doc`` as a string.

    Raises:
        DataError: the stored bytes are not valid UTF-8 (naming ``where``).
    """
    try:
        return bytes(doc.text).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: stored text is not valid UTF-8 ({exc}); check the store with xtd verify") from None


def alignment_inputs(
    doc: Document,
    student_tokenizer: ByteTokenizer,
    student_ids: np.ndarray,
    student_spans: np.ndarray,
    *,
    mirror_bos: bool = True,
) -> AlignmentInputs:
    """The teacher and student sides of ``doc`` with the slot labels training aligns them with.

    The one place of these rules, so that ``xtd align --cache`` and on-the-fly
    alignment in :func:`build_example` agree:

    * teacher rows: chat stores carry ``token_slot`` (0 = text → −1); otherwise every
      empty-span row is a special token (label 0);
    * bos mirroring (``mirror_bos``): when the teacher's row 0 is a special token with an
      empty span at byte 0 (e.g. a bos) and the student has a bos, the student gets its
      own bos first, so the two form a (void) slot chunk (docs/method.md, "Worked example");
    * student specials get label 0; other teacher slot tokens (chat templates) are
      therefore one-sided and belong to no chunk (docs/method.md, "Chunks").

    Args:
        doc: an ``xtd.storage.Document``.
        student_tokenizer: the student's ``ByteTokenizer``.
        student_ids: (S,) ids of the student's encoding of the document text.
        student_spans: (S, 2) their byte ranges.
        mirror_bos: prepend the student bos by the rule above (False when the ids
            already went through this function, e.g. read from the cache).
    """
    t_spans = np.asarray(doc.token_spans).reshape(-1, 2)
    slots = getattr(doc, "token_slot", None)
    if slots is not None:
        slots = np.asarray(slots, dtype=np.int64)
        t_special = np.where(slots == 0, -1, slots)
    else:
        t_special = np.where(t_spans[:, 0] == t_spans[:, 1], 0, -1).astype(np.int64)
    s_ids, s_spans = student_ids, student_spans
    bos = getattr(student_tokenizer, "bos_id", None)
    if mirror_bos and bos is not None and len(t_spans) and t_special[0] >= 0 and t_spans[0, 1] == 0:
        s_ids = np.concatenate([[bos], s_ids]).astype(s_ids.dtype)
        s_spans = np.concatenate([np.zeros((1, 2), s_spans.dtype), s_spans])
    s_special = np.where(np.isin(s_ids, student_tokenizer.special_ids), 0, -1).astype(np.int64)
    return AlignmentInputs(t_spans, t_special, s_ids, s_spans, s_special)


def _teacher_space(doc: Document, num_t: int) -> np.ndarray:
    """(T,) bool: the teacher token's bytes start with 0x20 (docs/method.md, "Chunks": space chunks)."""
    text = np.frombuffer(bytes(doc.text), dtype=np.uint8)
    spans = np.asarray(doc.token_spans[:num_t]).reshape(-1, 2)
    nonempty = spans[:, 1] > spans[:, 0]
    first = np.zeros(num_t, dtype=np.uint8)
    first[nonempty] = text[spans[nonempty, 0]]
    return nonempty & (first == 0x20)


def _truncate_chunks(t_chunk: np.ndarray, s_chunk: np.ndarray, num_t: int, num_s: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ids of a whole-document alignment, cut to the kept rows of both sides.

    A chunk survives iff all its tokens are kept on both sides; that is exactly the
    chunks a fresh alignment of the truncated sides would close (docs/method.md, "Chunks").
    """
    cut_t = t_chunk[num_t:][t_chunk[num_t:] >= 0]
    cut_s = s_chunk[num_s:][s_chunk[num_s:] >= 0]
    lost = [int(cut.min()) for cut in (cut_t, cut_s) if cut.size]
    first_lost = min(lost) if lost else np.iinfo(np.int64).max
    t = t_chunk[:num_t].copy()
    s = s_chunk[:num_s].copy()
    t[t >= first_lost] = -1
    s[s >= first_lost] = -1
    return t, s


