"""The training data pipeline: store documents → student tokens → alignment → padded tensors.

Dimension letters: ``B`` texts in a micro-batch, ``S`` student tokens, ``T`` teacher
rows, ``K`` top-k, ``H`` hidden size.

How a step's data is chosen (deterministic, so ``--resume`` replays the same order):

* The documents of all stores form one index space (store 0 first); several stores
  are therefore mixed in proportion to their sizes.
* Epoch ``e`` visits that space in the order ``numpy.random.default_rng([seed, e])
  .permutation(n)``; epochs follow each other without a gap. Optimizer step ``s``
  takes the ``batch_size`` consecutive positions ``s·B .. s·B + B − 1`` of that
  endless sequence (fixed texts per step, not a token budget: it keeps the data
  position a pure function of the step number).
* Rank ``r`` of ``W`` takes every W-th of those texts, sorts its texts by student
  length (longest first) and packs them into micro-batches of at most
  ``micro_batch_size`` texts and, with ``micro_batch_tokens``, at most that many
  padded tokens (:func:`xtd.packing.pack_longest_first`): length bucketing within the step, each
  micro-batch padded to its longest sequence (spec/ALM.md §9 item 9). Since the ALM
  and SFT losses are normalised by counts over the whole global batch (spec §4.2
  step 8), the split into ranks and micro-batches does not change the step's loss
  (nor its gradient, unless GradMag weighs each micro-batch's terms).

Long documents are **cut into pieces** (``long_documents="split"``, the default): a
document whose teacher rows exceed what ``max_student_length`` student tokens cover
(:func:`estimate_piece_rows`) becomes ``n`` pieces of equal teacher-row counts, each a
training text of its own (:class:`Pieces`): its bytes are those of its teacher rows, the
student tokenises just those bytes, and the teacher rows keep the log-probs stored with
the whole document's context. The index space above is then one of pieces. Whatever
still exceeds the limits is **truncated** (spec §3.4; ``long_documents="truncate"``
truncates whole documents): the student keeps its first ``max_student_length`` tokens,
and the teacher keeps the rows that end within the bytes those tokens cover (at most
``max_teacher_length``). The alignment stops at the first exhausted side, so a
straddling token never gets a chunk.

Tokenisation and alignment run inside :class:`StepDataset`, which a
``torch.utils.data.DataLoader`` (``batch_size=None``, ``num_workers`` ≥ 0) calls
once per optimizer step; each worker opens the stores itself and reads only the
documents of the steps it prepares, so memory stays bounded whatever the store size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from xtd.errors import ConfigError, DataError
from xtd.packing import pack_longest_first

logger = logging.getLogger(__name__)

__all__ = [
    "StepPlan",
    "DataSpec",
    "StepDataset",
    "AlignmentInputs",
    "alignment_inputs",
    "document_text",
    "count_normalizers",
    "alm_targets",
    "teacher_sigma",
    "token_loss_mask",
    "truncate_example",
    "pad_examples",
    "Pieces",
    "estimate_piece_rows",
    "document_piece",
    "read_piece",
]


# --------------------------------------------------------------------------------------
# The order of documents: a pure function of (seed, step)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """Which documents each optimizer step and rank reads.

    Args:
        store_sizes: number of documents in each store, in ``--store`` order.
        batch_size: texts per optimizer step over all ranks.
        seed: the data-order seed.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks (must divide ``batch_size``).
    """

    store_sizes: tuple[int, ...]
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    _perm_cache: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_documents == 0:
            raise DataError("the teacher store(s) hold no documents; run xtd precompute on some text first")
        if self.batch_size % self.world_size:
            raise ConfigError(
                f"--batch-size ({self.batch_size}) must be a multiple of the number of ranks "
                f"({self.world_size})"
            )

    @property
    def num_documents(self) -> int:
        """Documents over all stores."""
        return int(sum(self.store_sizes))

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_documents)
            if len(self._perm_cache) > 4:  # bounded: steps are read in order
                self._perm_cache.clear()
            self._perm_cache[epoch] = perm
        return perm

    def global_indices(self, step: int) -> np.ndarray:
        """(batch_size,) int64 global document indices of optimizer step ``step`` (0-based)."""
        n = self.num_documents
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        out = np.empty_like(positions)
        for epoch in np.unique(positions // n):
            sel = positions // n == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % n]
        return out

    def rank_indices(self, step: int) -> np.ndarray:
        """(batch_size / world_size,) global indices this rank reads at ``step``."""
        return self.global_indices(step)[self.rank :: self.world_size]

    def locate(self, index: int) -> tuple[int, int]:
        """(store number, document number in that store) of a global index."""
        bounds = np.cumsum(self.store_sizes)
        store = int(np.searchsorted(bounds, index, side="right"))
        start = 0 if store == 0 else int(bounds[store - 1])
        return store, int(index - start)

    def epoch_of(self, step: int) -> float:
        """Epochs completed (fractional) after ``step`` steps."""
        return step * self.batch_size / self.num_documents


# --------------------------------------------------------------------------------------
# Pure per-example helpers (tested against slow references in tests/test_batching.py)
# --------------------------------------------------------------------------------------


def teacher_sigma(boundary_logmass: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """σ^T per row = min(0, logsumexp of the enabled class columns) (spec/ALM.md §4.1).

    Args:
        boundary_logmass: (T, C) float16/float32 log-masses, −inf where a class has no mass.
        columns: indices of the enabled classes.

    Returns:
        (T,) float32; −inf where every enabled class has zero mass.
    """
    x = np.asarray(boundary_logmass, dtype=np.float32)[:, list(columns)]
    if x.shape[1] == 0:
        return np.full(x.shape[0], -np.inf, dtype=np.float32)
    peak = np.max(x, axis=1)
    safe = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        out = safe + np.log(np.sum(np.exp(x - safe[:, None]), axis=1))
    out = np.where(np.isfinite(peak), out, peak)  # all −inf stays −inf (not NaN)
    return np.minimum(out, 0.0).astype(np.float32)


def token_loss_mask(spans: np.ndarray, loss_spans: np.ndarray | None) -> np.ndarray:
    """Which tokens lie in the trained byte ranges (spec/ALM.md §3.4).

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
    """How many student tokens and teacher rows to keep (spec/ALM.md §3.4).

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


# --------------------------------------------------------------------------------------
# From a stored document to one training example
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Everything a worker needs to turn documents into micro-batches (picklable).

    Attributes:
        stores: store URLs, in ``--store`` order.
        student_tokenizer: the student's ByteTokenizer.
        plan: the step plan.
        micro_batch_size: at most this many texts per micro-batch.
        micro_batch_tokens: at most this many padded student tokens per micro-batch
            (None: no token budget); a text longer than the budget forms one alone.
        max_student_length, max_teacher_length: truncation limits.
        boundary_classes: enabled classes (names) of the teacher σ and student mask.
        alm_chunks: ``unconstrained`` or ``space``.
        merge, merge_threshold: for the data-only ALM group count.
        losses: the chosen loss names; they decide which teacher arrays are read and
            which data-only counts (normalisers) each micro-batch reports.
        alignment_cache: per store, the digest of an ``xtd align --cache`` group to read
            student tokens and chunk ids from (None: tokenise and align on the fly).
            Pieces of split documents are always tokenised and aligned on the fly.
        pieces: per store, its documents cut into training texts (:class:`Pieces`), or
            None: one text per document (the plan's index space is then documents).
    """

    stores: tuple[str, ...]
    student_tokenizer: Any
    plan: StepPlan
    micro_batch_size: int
    max_student_length: int
    max_teacher_length: int | None
    boundary_classes: tuple[str, ...]
    micro_batch_tokens: int | None = None
    alm_chunks: str = "unconstrained"
    merge: bool = True
    merge_threshold: float = 0.1
    losses: tuple[str, ...] = ("alm", "sft")
    alignment_cache: tuple[str | None, ...] = ()
    pieces: tuple[Pieces, ...] | None = None

    @property
    def need_topk(self) -> bool:
        return any(n in self.losses for n in ("kd", "uld", "mined"))

    @property
    def need_hidden(self) -> bool:
        return "latents" in self.losses


def count_normalizers(batch: dict[str, torch.Tensor], losses: Sequence[str], *, merge: bool, merge_threshold: float) -> dict[str, int]:
    """Data-only local counts of one micro-batch, per loss (spec/ALM.md §4.2 step 8, §4.4).

    Summed over the micro-batches of a step and all-reduced over ranks, they are the
    global normalisers passed to each loss.
    """
    from xtd import losses as L

    counts: dict[str, int] = {}
    targets = alm_targets(batch) if any(n != "sft" and n != "kd" for n in losses) else None
    for name in losses:
        if name == "alm":
            counts[name] = L.count_alm_groups(targets, merge=merge, merge_threshold=merge_threshold)
        elif name == "sft":
            counts[name] = L.count_sft_tokens(batch["sft_mask"])
        elif name == "kd":
            counts[name] = L.count_kd_rows(batch["sft_mask"])
        elif name == "mined":
            counts[name] = L.count_mined_terms(targets)
        else:  # uld and latents: scored chunks
            counts[name] = L.count_scored_chunks(targets)
    return counts


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item ``s`` is this rank's data of optimizer step ``s``.

    An item is a dict ``{"micro_batches": [dict of tensors, ...], "counts": [{loss: int}, ...],
    "student_tokens": int, "teacher_tokens": int, "documents": [int, ...]}``. Use it with
    ``DataLoader(dataset, batch_size=None, sampler=range(start, stop))``.
    """

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        self._readers: list[Any] | None = None
        self._caches: list[Any] | None = None
        self._pid: int | None = None

    def __len__(self) -> int:  # an endless sequence of steps; the sampler bounds it
        return 2**62

    # Stores are opened lazily per process: zarr handles must not cross a fork.
    def _stores(self) -> list[Any]:
        if self._readers is None or self._pid != os.getpid():
            from xtd.storage import open_store, read_alignment

            self._readers = [open_store(url) for url in self.spec.stores]
            digests = self.spec.alignment_cache or (None,) * len(self.spec.stores)
            self._caches = [
                read_alignment(url, digest) if digest else None
                for url, digest in zip(self.spec.stores, digests, strict=True)
            ]
            self._pid = os.getpid()
        return self._readers

    def __getitem__(self, step: int) -> dict[str, Any]:
        spec = self.spec
        indices = spec.plan.rank_indices(int(step))
        examples = [self.example(int(i)) for i in indices]
        lengths = [len(e["input_ids"]) for e in examples]
        micro_batches, counts = [], []
        pad_id = _pad_id(spec.student_tokenizer)
        for group in pack_longest_first(lengths, max_items=spec.micro_batch_size, max_tokens=spec.micro_batch_tokens):
            batch = pad_examples([examples[i] for i in group], pad_id=pad_id)
            micro_batches.append(batch)
            counts.append(
                count_normalizers(batch, spec.losses, merge=spec.merge, merge_threshold=spec.merge_threshold)
            )
        return {
            "micro_batches": micro_batches,
            "counts": counts,
            "student_tokens": int(sum(len(e["input_ids"]) for e in examples)),
            "teacher_tokens": int(sum(len(e["teacher_logprob"]) for e in examples)),
            "documents": [int(i) for i in indices],
        }

    def example(self, index: int) -> dict[str, np.ndarray]:
        """The training example of global text ``index`` (numpy arrays, unpadded).

        A text is a document, or a piece of one when ``spec.pieces`` is set.
        """
        spec = self.spec
        store_no, unit = spec.plan.locate(index)
        reader = self._stores()[store_no]
        cache = self._caches[store_no] if self._caches else None
        if spec.pieces is None:
            doc_no, lo, hi, whole = unit, 0, 0, True
        else:
            doc_no, lo, hi, whole = spec.pieces[store_no].locate(unit)
        if whole:
            doc = reader.document(doc_no, topk=spec.need_topk, hidden=spec.need_hidden)
            cached = cache[doc_no] if cache is not None else None
            where = f"document {doc_no} of store {spec.stores[store_no]!r}"
        else:
            num_rows = int(spec.pieces[store_no].num_rows[doc_no])
            doc = read_piece(reader, doc_no, lo, hi, num_rows, topk=spec.need_topk, hidden=spec.need_hidden)
            cached = None  # the cache aligns whole documents
            where = f"rows {lo}-{hi} of document {doc_no} of store {spec.stores[store_no]!r}"
        return build_example(
            doc,
            spec.student_tokenizer,
            columns=[list(reader.boundary_classes).index(c) for c in spec.boundary_classes],
            max_student_length=spec.max_student_length,
            max_teacher_length=spec.max_teacher_length,
            alm_chunks=spec.alm_chunks,
            need_topk=spec.need_topk,
            need_hidden=spec.need_hidden,
            cached=cached,
            where=where,
        )


@dataclass(frozen=True)
class Pieces:
    """The training texts of one store: each document whole, or cut into pieces.

    A document of ``N`` teacher rows becomes ``n = ceil(N / max_rows)`` pieces (at least
    one); piece ``k`` is rows ``[k·N // n, (k+1)·N // n)``, so the pieces of a document
    are as equal as rows allow and a document of at most ``max_rows`` rows stays whole.

    Attributes:
        max_rows: teacher rows that fit one training text.
        num_rows: (D,) int64 teacher rows of each document.
        offsets: (D + 1,) int64 index of each document's first piece.
    """

    max_rows: int
    num_rows: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, num_rows: Sequence[int] | np.ndarray, max_rows: int) -> Pieces:
        """Pieces of documents with ``num_rows`` teacher rows each."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be ≥ 1, got {max_rows}")
        rows = np.asarray(num_rows, dtype=np.int64)
        counts = np.maximum(1, -(-rows // max_rows))
        return cls(max_rows, rows, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, piece: int) -> tuple[int, int, int, bool]:
        """(document, first row, stop row, whether the piece is the whole document)."""
        d = int(np.searchsorted(self.offsets, piece, side="right")) - 1
        n = int(self.offsets[d + 1] - self.offsets[d])
        k = int(piece) - int(self.offsets[d])
        total = int(self.num_rows[d])
        return d, k * total // n, (k + 1) * total // n, n == 1


def document_piece(window: Any) -> Any:
    """A document window (:meth:`StoreReader.read_window`) as a document of its own.

    Its text is the bytes its teacher rows cover; spans and loss spans are shifted to
    that text. Teacher quantities keep the values stored with the whole document's
    context.
    """
    spans = np.asarray(window.token_spans)
    if not len(spans):
        return dataclasses.replace(window, text=b"", loss_spans=None)
    b0, b1 = int(spans[0, 0]), int(spans[-1, 1])
    loss_spans = getattr(window, "loss_spans", None)
    if loss_spans is not None:
        ls = np.clip(np.asarray(loss_spans, dtype=np.int64).reshape(-1, 2), b0, b1)
        loss_spans = ls[ls[:, 1] > ls[:, 0]] - b0
    return dataclasses.replace(window, text=bytes(window.text[b0:b1]), token_spans=spans - b0, loss_spans=loss_spans)


_ROW_FIELDS = (
    "token_ids",
    "token_spans",
    "token_logprob",
    "boundary_logmass",
    "topk_ids",
    "topk_logprobs",
    "tail_logmass",
    "hidden",
    "token_slot",
)
_SNAP_ROWS = 8  # a UTF-8 character spans at most 4 byte tokens


def read_piece(
    reader: Any, doc: int, lo: int, hi: int, num_rows: int, *, topk: bool = True, hidden: bool = True
) -> Any:
    """Rows ``[lo, hi)`` of document ``doc`` as a document of its own (:func:`document_piece`).

    Byte-level tokens can split a UTF-8 character, so each cut moves forward to the
    first row that starts a character (at most a few rows on). Both pieces at a cut move
    it the same way, so the pieces of a document still tile it. ``topk`` / ``hidden``:
    read those arrays too (:meth:`StoreReader.read_window`).
    """
    window = reader.read_window(doc, lo, min(hi + _SNAP_ROWS, num_rows), topk=topk, hidden=hidden)
    text = bytes(window.text)
    starts = np.asarray(window.token_spans)[:, 0]

    def snap(i: int) -> int:  # i: row within the window
        if lo + i >= num_rows:
            return num_rows - lo
        for j in range(i, min(i + _SNAP_ROWS, len(starts))):
            b = int(starts[j])
            if b >= len(text) or text[b] & 0xC0 != 0x80:
                return j
        return min(i + _SNAP_ROWS, num_rows - lo)

    a = snap(0) if lo > 0 else 0
    b = snap(hi - lo)
    rows = {
        name: getattr(window, name)[a:b] for name in _ROW_FIELDS if getattr(window, name, None) is not None
    }
    return document_piece(dataclasses.replace(window, **rows))


def estimate_piece_rows(
    readers: Sequence[Any], student_tokenizer: Any, max_student_length: int, *, sample: int = 64, window: int = 4096
) -> int:
    """Teacher rows that ``max_student_length`` student tokens cover, on average.

    Measured on up to ``sample`` documents per store, spread evenly over it (their first
    ``window`` rows): the ratio of teacher rows to student tokens of the same bytes. A
    pure function of the stores and the tokenizer, so every rank and a resumed run
    agree.
    """
    rows = tokens = 0
    for reader in readers:
        n = len(reader)
        for d in np.unique(np.linspace(0, n - 1, num=min(n, sample)).astype(np.int64)).tolist():
            piece = document_piece(reader.read_window(int(d), 0, window, topk=False, hidden=False))
            text = bytes(piece.text).decode("utf-8", errors="replace")
            if text:
                rows += piece.num_tokens
                tokens += len(student_tokenizer.encode(text).ids)
    ratio = rows / tokens if tokens else 1.0
    return max(1, int(max_student_length * ratio))


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_id", "eos_id", "bos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def build_example(
    doc: Any,
    student_tokenizer: Any,
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
    mirrors a leading teacher bos with its own, spec §10.7), the rules that
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
    from xtd.align import align, space_chunks

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


def document_text(doc: Any, *, where: str) -> str:
    """The stored text of ``doc`` as a string.

    Raises:
        DataError: the stored bytes are not valid UTF-8 (naming ``where``).
    """
    try:
        return bytes(doc.text).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: stored text is not valid UTF-8 ({exc}); check the store with xtd verify") from None


def alignment_inputs(
    doc: Any, student_tokenizer: Any, student_ids: np.ndarray, student_spans: np.ndarray, *, mirror_bos: bool = True
) -> AlignmentInputs:
    """The teacher and student sides of ``doc`` with the slot labels training aligns them with.

    The one place of these rules, so that ``xtd align --cache`` and on-the-fly
    alignment in :func:`build_example` agree:

    * teacher rows: chat stores carry ``token_slot`` (0 = text → −1); otherwise every
      empty-span row is a special token (label 0);
    * bos mirroring (``mirror_bos``): when the teacher's row 0 is a special token with an
      empty span at byte 0 (e.g. a bos) and the student has a bos, the student gets its
      own bos first, so the two form a (void) slot chunk as in spec/ALM.md §10.7;
    * student specials get label 0; other teacher slot tokens (chat templates) are
      therefore one-sided and belong to no chunk (spec §3.1 step 2).

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


def _teacher_space(doc: Any, num_t: int) -> np.ndarray:
    """(T,) bool: the teacher token's bytes start with 0x20 (spec §3.2 ``space`` chunks)."""
    text = np.frombuffer(bytes(doc.text), dtype=np.uint8)
    spans = np.asarray(doc.token_spans[:num_t]).reshape(-1, 2)
    nonempty = spans[:, 1] > spans[:, 0]
    first = np.zeros(num_t, dtype=np.uint8)
    first[nonempty] = text[spans[nonempty, 0]]
    return nonempty & (first == 0x20)


def _truncate_chunks(t_chunk: np.ndarray, s_chunk: np.ndarray, num_t: int, num_s: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ids of a whole-document alignment, cut to the kept rows of both sides.

    A chunk survives iff all its tokens are kept on both sides; that is exactly the
    chunks a fresh alignment of the truncated sides would close (spec §3.1 step 5).
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


def alm_targets(batch: dict[str, torch.Tensor]) -> Any:
    """The :class:`xtd.losses.ALMTargets` of a padded micro-batch (tensors on its device)."""
    from xtd.losses import ALMTargets

    return ALMTargets(
        teacher_logprob=batch["teacher_logprob"],
        teacher_sigma=batch["teacher_sigma"],
        teacher_chunk=batch["teacher_chunk"],
        teacher_scored=batch["teacher_scored"],
        student_chunk=batch["student_chunk"],
        student_scored=batch["student_scored"],
    )
