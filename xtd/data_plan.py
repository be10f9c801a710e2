"""Which texts each optimizer step reads: the step plan, and long documents cut into pieces.

How a step's data is chosen (deterministic, so ``--resume`` replays the same order):

* The documents of all stores form one index space (store 0 first); several stores
  are therefore mixed in proportion to their sizes.
* Epoch ``e`` visits that space in the order ``numpy.random.default_rng([seed, e])
  .permutation(n)``; epochs follow each other without a gap. Optimizer step ``s``
  takes the ``batch_size`` consecutive positions ``s·B .. s·B + B − 1`` of that
  endless sequence (fixed texts per step, not a token budget: it keeps the data
  position a pure function of the step number).
* Rank ``r`` of ``W`` takes every W-th of those texts.

Long documents are **cut into pieces** (``--long-documents split``, the default): a
document whose teacher rows exceed what ``max_student_length`` student tokens cover
(:func:`estimate_piece_rows`) becomes ``n`` pieces of equal teacher-row counts, each a
training text of its own (:class:`Pieces`): its bytes are those of its teacher rows, the
student tokenises just those bytes, and the teacher rows keep the log-probs stored with
the whole document's context. The index space above is then one of pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from xtd.errors import ConfigError, DataError
from xtd.storage import Document, StoreReader
from xtd.tokenization import ByteTokenizer

__all__ = ["StepPlan", "Pieces", "document_piece", "read_piece", "estimate_piece_rows"]


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


def document_piece(window: Document) -> Document:
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
    reader: StoreReader, doc: int, lo: int, hi: int, num_rows: int, *, topk: bool = True, hidden: bool = True
) -> Document:
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
    readers: Sequence[StoreReader], student_tokenizer: ByteTokenizer, max_student_length: int, *, sample: int = 64,
    window: int = 4096,
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


