"""How two tokenizers chunk a corpus, numbers above all: the ``xtd align --report`` audit.

Cross-tokenizer distillation compares likelihoods of *chunks*, the minimal byte spans
that both tokenizations end on (docs/method.md, "Chunks"). Where the two tokenizers cut
text differently, chunks grow to several tokens on one side, and ALM can only match
the probability of the whole span. Numbers are where tokenizers differ most: one
splits every digit, another groups three digits from the left, a third merges
arbitrary digit strings learnt from its training data. This module measures that on
a corpus:

* **tokens and chunks**: token counts per side; text chunks and their length
  distribution in tokens on each side (1, 2, 3, 4 or more), and the share of 1:1
  chunks (one token on each side);
* **digits**: ASCII digit bytes, and the share of them inside *multi-token chunks*
  (chunks with more than one token on either side);
* **numbers**: maximal runs of ASCII digits; tokens per number on each side (tokens
  that overlap its bytes), and how many numbers are *split at different places*:
  the two sides' token boundaries strictly inside the number differ;
* **merged groups under γ** (only with the teacher's stored boundary masses):
  chunks merge forward until one whose teacher boundary probability after its last
  token exceeds γ (docs/method.md, "Merging"), as ALM's loss does; the number of
  groups, chunks and tokens per group, and the share of digit bytes in groups of
  several chunks.

Slot chunks (paired special tokens) are counted apart and never as text chunks.
Dimension letters: ``T`` teacher tokens, ``S`` student tokens, ``C`` chunks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from xtd.errors import DataError, TokenizerMismatchError

if TYPE_CHECKING:
    from xtd.tokenization import ByteTokenizer

__all__ = [
    "AlignmentSample",
    "AlignReport",
    "SideCounts",
    "report_alignments",
    "report_texts",
    "report_store",
    "format_rows",
    "HISTOGRAM_BINS",
]

HISTOGRAM_BINS = ("1", "2", "3", "4+")
"""Bins of the tokens-per-chunk and chunks-per-group histograms."""

_DIGIT_RUN = re.compile(rb"[0-9]+")
_BATCH = 64  # texts encoded and aligned per vectorised call


@dataclass(frozen=True)
class AlignmentSample:
    """One aligned text, the input of :func:`report_alignments`.

    Attributes:
        text: the UTF-8 bytes both sides tokenised.
        teacher_spans: (T, 2) byte spans of the teacher tokens (empty for specials).
        student_spans: (S, 2) byte spans of the student tokens.
        teacher_chunk: (T,) chunk id per teacher token, -1 = in no chunk.
        student_chunk: (S,) chunk id per student token.
        chunk_bytes: (C, 2) byte range of each chunk.
        chunk_slot: (C,) bool, slot chunks.
        teacher_sigma: (T,) log boundary mass after each teacher token (σ^T), or None
            when unknown (no merge statistics then).
    """

    text: bytes
    teacher_spans: np.ndarray
    student_spans: np.ndarray
    teacher_chunk: np.ndarray
    student_chunk: np.ndarray
    chunk_bytes: np.ndarray
    chunk_slot: np.ndarray
    teacher_sigma: np.ndarray | None = None


@dataclass
class SideCounts:
    """Counts for one side (teacher or student)."""

    tokens: int = 0
    chunk_tokens: int = 0
    chunk_histogram: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HISTOGRAM_BINS, 0))
    max_chunk_tokens: int = 0
    number_tokens: int = 0

    def to_dict(self, *, chunks: int, numbers: int) -> dict[str, Any]:
        """Totals and the derived means."""
        return {
            "tokens": self.tokens,
            "tokens_in_chunks": self.chunk_tokens,
            "tokens_per_chunk": _ratio(self.chunk_tokens, chunks),
            "tokens_per_chunk_histogram": dict(self.chunk_histogram),
            "max_tokens_per_chunk": self.max_chunk_tokens,
            "tokens_per_number": _ratio(self.number_tokens, numbers),
        }


@dataclass
class AlignReport:
    """Totals over a corpus; :meth:`to_dict` is the ``--json`` output.

    Attributes:
        teacher, student: tokenizer names.
        texts, bytes: how much was read.
        chunks, slot_chunks, one_to_one_chunks: text chunks, slot chunks, 1:1 text chunks.
        chunk_bytes_total: bytes covered by text chunks.
        digit_bytes, digit_bytes_in_multi_token_chunks: ASCII digit bytes, and those in a
            text chunk with more than one token on either side.
        numbers, numbers_split_differently: maximal digit runs, and those whose interior
            token boundaries differ between the sides.
        merge_threshold: γ of the merge statistics (None: no teacher masses given).
        groups, group_histogram, group_teacher_tokens, group_student_tokens,
        digit_bytes_in_merged_groups: merge statistics over text chunks
            (``group_histogram``: groups by number of chunks).
    """

    teacher: str
    student: str
    merge_threshold: float | None = None
    texts: int = 0
    bytes: int = 0
    teacher_side: SideCounts = field(default_factory=SideCounts)
    student_side: SideCounts = field(default_factory=SideCounts)
    chunks: int = 0
    slot_chunks: int = 0
    chunk_bytes_total: int = 0
    one_to_one_chunks: int = 0
    digit_bytes: int = 0
    digit_bytes_in_multi_token_chunks: int = 0
    numbers: int = 0
    numbers_split_differently: int = 0
    groups: int = 0
    group_histogram: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HISTOGRAM_BINS, 0))
    group_teacher_tokens: int = 0
    group_student_tokens: int = 0
    digit_bytes_in_merged_groups: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: counts, and the shares and means derived from them."""
        out: dict[str, Any] = {
            "teacher_tokenizer": self.teacher,
            "student_tokenizer": self.student,
            "texts": self.texts,
            "bytes": self.bytes,
            "teacher": self.teacher_side.to_dict(chunks=self.chunks, numbers=self.numbers),
            "student": self.student_side.to_dict(chunks=self.chunks, numbers=self.numbers),
            "chunks": self.chunks,
            "slot_chunks": self.slot_chunks,
            "bytes_per_chunk": _ratio(self.chunk_bytes_total, self.chunks),
            "one_to_one_chunks": self.one_to_one_chunks,
            "one_to_one_share": _ratio(self.one_to_one_chunks, self.chunks),
            "digit_bytes": self.digit_bytes,
            "digit_bytes_in_multi_token_chunks": self.digit_bytes_in_multi_token_chunks,
            "digit_share_in_multi_token_chunks": _ratio(self.digit_bytes_in_multi_token_chunks, self.digit_bytes),
            "numbers": self.numbers,
            "numbers_split_differently": self.numbers_split_differently,
            "numbers_split_differently_share": _ratio(self.numbers_split_differently, self.numbers),
        }
        if self.merge_threshold is None:
            out["merge"] = None
        else:
            out["merge"] = {
                "merge_threshold": self.merge_threshold,
                "groups": self.groups,
                "chunks_per_group": _ratio(self.chunks, self.groups),
                "chunks_per_group_histogram": dict(self.group_histogram),
                "teacher_tokens_per_group": _ratio(self.group_teacher_tokens, self.groups),
                "student_tokens_per_group": _ratio(self.group_student_tokens, self.groups),
                "digit_bytes_in_merged_groups": self.digit_bytes_in_merged_groups,
                "digit_share_in_merged_groups": _ratio(self.digit_bytes_in_merged_groups, self.digit_bytes),
            }
        return out


def _ratio(num: float, den: float) -> float | None:
    return float(num) / den if den else None


def _bin(count: int) -> str:
    return HISTOGRAM_BINS[min(count, len(HISTOGRAM_BINS)) - 1]


def _add_histogram(histogram: dict[str, int], counts: np.ndarray) -> None:
    clipped = np.minimum(counts, len(HISTOGRAM_BINS))
    for b, n in zip(*np.unique(clipped[clipped >= 1], return_counts=True), strict=True):
        histogram[HISTOGRAM_BINS[int(b) - 1]] += int(n)


def _boundaries(spans: np.ndarray) -> np.ndarray:
    """Sorted unique byte offsets where a non-empty token starts or ends."""
    spans = spans[spans[:, 1] > spans[:, 0]]
    return np.unique(spans.reshape(-1))


def _tokens_overlapping(spans: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(N,) number of non-empty tokens overlapping each byte range [lo, hi)."""
    spans = spans[spans[:, 1] > spans[:, 0]]
    if len(spans) == 0:
        return np.zeros(len(lo), dtype=np.int64)
    # Tokens tile the text in order: those overlapping [lo, hi) are the ones with
    # end > lo and start < hi, a contiguous index range.
    first = np.searchsorted(spans[:, 1], lo, side="right")
    last = np.searchsorted(spans[:, 0], hi, side="left")
    return np.maximum(last - first, 0)


def _interior_cuts(bounds: np.ndarray, lo: int, hi: int) -> np.ndarray:
    a, b = np.searchsorted(bounds, lo, side="right"), np.searchsorted(bounds, hi, side="left")
    return bounds[a:b]


def _accumulate(report: AlignReport, sample: AlignmentSample) -> None:
    text = np.frombuffer(sample.text, dtype=np.uint8)
    t_spans = np.asarray(sample.teacher_spans, dtype=np.int64).reshape(-1, 2)
    s_spans = np.asarray(sample.student_spans, dtype=np.int64).reshape(-1, 2)
    t_chunk = np.asarray(sample.teacher_chunk, dtype=np.int64)
    s_chunk = np.asarray(sample.student_chunk, dtype=np.int64)
    slot = np.asarray(sample.chunk_slot, dtype=bool)
    chunk_bytes = np.asarray(sample.chunk_bytes, dtype=np.int64).reshape(-1, 2)
    num_chunks = len(slot)
    report.texts += 1
    report.bytes += len(text)
    report.teacher_side.tokens += int((t_spans[:, 1] > t_spans[:, 0]).sum())
    report.student_side.tokens += int((s_spans[:, 1] > s_spans[:, 0]).sum())

    # Tokens per chunk on each side; text chunks only.
    t_count = np.bincount(t_chunk[t_chunk >= 0], minlength=num_chunks)[:num_chunks]
    s_count = np.bincount(s_chunk[s_chunk >= 0], minlength=num_chunks)[:num_chunks]
    text_chunk = ~slot
    report.chunks += int(text_chunk.sum())
    report.slot_chunks += int(slot.sum())
    report.chunk_bytes_total += int((chunk_bytes[text_chunk, 1] - chunk_bytes[text_chunk, 0]).sum())
    report.one_to_one_chunks += int((text_chunk & (t_count == 1) & (s_count == 1)).sum())
    for side, count in ((report.teacher_side, t_count), (report.student_side, s_count)):
        side.chunk_tokens += int(count[text_chunk].sum())
        _add_histogram(side.chunk_histogram, count[text_chunk])
        if text_chunk.any():
            side.max_chunk_tokens = max(side.max_chunk_tokens, int(count[text_chunk].max()))

    # Digit bytes and the chunk each lies in (-1: in no chunk).
    is_digit = (text >= 0x30) & (text <= 0x39)
    report.digit_bytes += int(is_digit.sum())
    byte_chunk = np.full(len(text), -1, dtype=np.int64)
    for c in np.flatnonzero(text_chunk):
        byte_chunk[chunk_bytes[c, 0] : chunk_bytes[c, 1]] = c
    digit_chunk = byte_chunk[is_digit]
    digit_chunk = digit_chunk[digit_chunk >= 0]
    multi = (t_count > 1) | (s_count > 1)
    report.digit_bytes_in_multi_token_chunks += int(multi[digit_chunk].sum())

    # Numbers: maximal digit runs.
    runs = [(m.start(), m.end()) for m in _DIGIT_RUN.finditer(sample.text)]
    if runs:
        lo = np.array([r[0] for r in runs], dtype=np.int64)
        hi = np.array([r[1] for r in runs], dtype=np.int64)
        report.numbers += len(runs)
        report.teacher_side.number_tokens += int(_tokens_overlapping(t_spans, lo, hi).sum())
        report.student_side.number_tokens += int(_tokens_overlapping(s_spans, lo, hi).sum())
        t_bounds, s_bounds = _boundaries(t_spans), _boundaries(s_spans)
        report.numbers_split_differently += sum(
            not np.array_equal(_interior_cuts(t_bounds, a, b), _interior_cuts(s_bounds, a, b)) for a, b in runs
        )

    if report.merge_threshold is not None and sample.teacher_sigma is not None:
        _accumulate_groups(report, sample.teacher_sigma, t_chunk, s_count, t_count, text_chunk, digit_chunk, num_chunks)


def _accumulate_groups(
    report: AlignReport,
    teacher_sigma: np.ndarray,
    t_chunk: np.ndarray,
    s_count: np.ndarray,
    t_count: np.ndarray,
    text_chunk: np.ndarray,
    digit_chunk: np.ndarray,
    num_chunks: int,
) -> None:
    """Merge text chunks forward until the teacher's boundary probability exceeds γ."""
    from xtd.align import merge_groups

    if not text_chunk.any():
        return
    sigma = np.asarray(teacher_sigma, dtype=np.float64)
    rows = np.flatnonzero(t_chunk >= 0)
    last_row = np.full(num_chunks, -1, dtype=np.int64)
    np.maximum.at(last_row, t_chunk[rows], rows)
    chunks = np.flatnonzero(text_chunk)  # the text chunks, in order
    keep = np.exp(sigma[last_row[chunks]]) > report.merge_threshold
    group = merge_groups(keep)
    num_groups = int(group[-1]) + 1
    per_group = np.bincount(group, minlength=num_groups)
    report.groups += num_groups
    _add_histogram(report.group_histogram, per_group)
    report.group_teacher_tokens += int(t_count[chunks].sum())
    report.group_student_tokens += int(s_count[chunks].sum())
    group_of_chunk = np.full(num_chunks, -1, dtype=np.int64)
    group_of_chunk[chunks] = group
    merged = per_group[group_of_chunk[digit_chunk]] > 1
    report.digit_bytes_in_merged_groups += int(merged.sum())


def report_alignments(
    samples: Iterable[AlignmentSample],
    *,
    teacher: str,
    student: str,
    merge_threshold: float | None = None,
) -> AlignReport:
    """Accumulate the report over aligned texts (see the module docstring).

    Args:
        samples: the aligned texts.
        teacher, student: tokenizer names for the report.
        merge_threshold: γ; None leaves out the merge statistics (every sample must
            then carry ``teacher_sigma`` for them to count).
    """
    report = AlignReport(teacher=teacher, student=student, merge_threshold=merge_threshold)
    for sample in samples:
        _accumulate(report, sample)
    return report


def format_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(quantity, teacher, student)`` rows of the printed table, from :meth:`AlignReport.to_dict`."""

    def num(x: float | None, digits: int = 2) -> str:
        return "–" if x is None else f"{x:,.{digits}f}"

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    def hist(h: dict[str, int], total: int) -> str:
        return " / ".join(pct(h[b] / total if total else None) for b in HISTOGRAM_BINS)

    t, s = report["teacher"], report["student"]
    both = ""
    rows = [
        ("texts · bytes", f"{report['texts']:,} · {report['bytes']:,}", both),
        ("tokens", f"{t['tokens']:,}", f"{s['tokens']:,}"),
        ("chunks (text · slot)", f"{report['chunks']:,} · {report['slot_chunks']:,}", both),
        ("bytes per chunk", num(report["bytes_per_chunk"]), both),
        ("tokens per chunk (mean · max)", f"{num(t['tokens_per_chunk'])} · {t['max_tokens_per_chunk']}",
         f"{num(s['tokens_per_chunk'])} · {s['max_tokens_per_chunk']}"),
        ("chunks of 1 / 2 / 3 / 4+ tokens", hist(t["tokens_per_chunk_histogram"], report["chunks"]),
         hist(s["tokens_per_chunk_histogram"], report["chunks"])),
        ("1:1 chunks", pct(report["one_to_one_share"]), both),
        ("digit bytes in multi-token chunks",
         f"{pct(report['digit_share_in_multi_token_chunks'])} of {report['digit_bytes']:,}", both),
        ("numbers (digit runs)", f"{report['numbers']:,}", both),
        ("tokens per number", num(t["tokens_per_number"]), num(s["tokens_per_number"])),
        ("numbers split at different places",
         f"{report['numbers_split_differently']:,} ({pct(report['numbers_split_differently_share'])})", both),
    ]
    merge = report["merge"]
    if merge is None:
        rows.append(("merged groups under γ", "– (needs a teacher store: --store)", both))
    else:
        gamma = merge["merge_threshold"]
        rows += [
            (f"groups under γ = {gamma:g}", f"{merge['groups']:,} ({num(merge['chunks_per_group'])} chunks each)", both),
            ("groups of 1 / 2 / 3 / 4+ chunks", hist(merge["chunks_per_group_histogram"], merge["groups"]), both),
            ("tokens per group", num(merge["teacher_tokens_per_group"]), num(merge["student_tokens_per_group"])),
            ("digit bytes in groups of ≥ 2 chunks", pct(merge["digit_share_in_merged_groups"]), both),
        ]
    return rows


def samples_from_encodings(
    texts: Sequence[str], teacher_encodings: Sequence[Any], student_encodings: Sequence[Any], alignments: Sequence[Any]
) -> list[AlignmentSample]:
    """Samples from plain texts, their encodings and :func:`xtd.align.align_many` results."""
    return [
        AlignmentSample(
            text=text.encode("utf-8"), teacher_spans=a.spans, student_spans=b.spans,
            teacher_chunk=al.teacher_chunk, student_chunk=al.student_chunk,
            chunk_bytes=al.chunk_bytes, chunk_slot=al.chunk_slot,
        )
        for text, a, b, al in zip(texts, teacher_encodings, student_encodings, alignments, strict=True)
    ]


def report_texts(
    texts: Sequence[str], teacher: ByteTokenizer, student: ByteTokenizer, *, add_special_tokens: bool = False
) -> AlignReport:
    """The report of plain texts under two tokenizers (no merge statistics: no teacher masses).

    Raises:
        ByteIdentityError: a tokenizer does not reproduce a text's bytes.
    """
    from xtd.align import align_many

    def samples() -> Iterator[AlignmentSample]:
        for lo in range(0, len(texts), _BATCH):
            chunk = list(texts[lo : lo + _BATCH])
            t_enc = teacher.encode_batch(chunk, add_special_tokens=add_special_tokens)
            s_enc = student.encode_batch(chunk, add_special_tokens=add_special_tokens)
            pairs = [
                (a.spans, b.spans, teacher.special_mask(a.ids), student.special_mask(b.ids))
                for a, b in zip(t_enc, s_enc, strict=True)
            ]
            yield from samples_from_encodings(chunk, t_enc, s_enc, align_many(pairs))

    return report_alignments(samples(), teacher=teacher.name, student=student.name)


def report_store(
    url: str,
    student: ByteTokenizer,
    *,
    teacher: ByteTokenizer | None = None,
    merge_threshold: float = 0.1,
    progress: Callable[[int, int], None] | None = None,
) -> AlignReport:
    """The report over every document of a teacher store, merge statistics included.

    The student side is built as training builds it (:func:`xtd.examples.alignment_inputs`:
    the student mirrors a leading teacher BOS, template special tokens are one-sided); σ^T
    after each teacher row is the log of its stored boundary mass over all classes.

    Args:
        url: the store.
        student: the student tokenizer.
        teacher: if given, it must be the store's tokenizer (a check, not an override).
        merge_threshold: γ.
        progress: ``progress(documents_done, documents_total)`` after each batch.

    Raises:
        StoreNotFoundError, StoreFormatError: no readable store at ``url``.
        TokenizerMismatchError: ``teacher`` is not the store's tokenizer.
        DataError: the store embeds no tokenizer, or a stored text is not UTF-8.
    """
    from xtd.align import align_many
    from xtd.examples import alignment_inputs, document_text
    from xtd.storage import open_store
    from xtd.tokenization import tokenizer_from_json

    reader = open_store(url)
    if not reader.tokenizer_json:
        raise DataError(f"store {url!r} embeds no teacher tokenizer; re-run xtd precompute")
    stored = tokenizer_from_json(reader.tokenizer_json, name=f"{url} (teacher)")
    if teacher is not None and teacher.digest != stored.digest:
        raise TokenizerMismatchError(
            f"teacher tokenizer {teacher.name!r} is not the tokenizer store {url!r} was made with; "
            "leave --teacher-tokenizer out to use the store's own"
        )
    total = len(reader)

    def samples() -> Iterator[AlignmentSample]:
        for lo in range(0, total, _BATCH):
            docs = [reader.document(d, topk=False, hidden=False) for d in range(lo, min(lo + _BATCH, total))]
            texts = [document_text(doc, where=f"store {url!r}: document {lo + k}") for k, doc in enumerate(docs)]
            sides = [
                alignment_inputs(doc, student, enc.ids.astype(np.int64), enc.spans.astype(np.int64))
                for doc, enc in zip(docs, student.encode_batch(texts), strict=True)
            ]
            pairs = [(x.teacher_spans, x.student_spans, x.teacher_special, x.student_special) for x in sides]
            for doc, x, al in zip(docs, sides, align_many(pairs), strict=True):
                yield AlignmentSample(
                    text=bytes(doc.text), teacher_spans=x.teacher_spans, student_spans=x.student_spans,
                    teacher_chunk=al.teacher_chunk, student_chunk=al.student_chunk,
                    chunk_bytes=al.chunk_bytes, chunk_slot=al.chunk_slot,
                    teacher_sigma=_sigma(np.asarray(doc.boundary_logmass, dtype=np.float64)),
                )
            if progress is not None:
                progress(min(lo + _BATCH, total), total)

    return report_alignments(samples(), teacher=stored.name, student=student.name, merge_threshold=merge_threshold)


def _sigma(boundary_logmass: np.ndarray) -> np.ndarray:
    """(T,) σ^T = min(0, log Σ_k β_k) over all stored classes, from (T, classes) log-masses."""
    if boundary_logmass.size == 0:
        return np.zeros(boundary_logmass.shape[0])
    with np.errstate(invalid="ignore"):
        return np.minimum(np.logaddexp.reduce(boundary_logmass, axis=1), 0.0)
