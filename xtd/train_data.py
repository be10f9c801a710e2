"""The training data path: each optimizer step's texts → examples → packed micro-batches.

:class:`TrainData` holds everything a loader worker needs (store URLs, the student
tokenizer, the step plan, the data and ALM settings, the chosen losses' registry
entries, the usable alignment caches); :class:`StepDataset` turns step ``s`` into this
rank's micro-batches and their data-only counts. A ``torch.utils.data.DataLoader``
(``batch_size=None``, ``num_workers`` ≥ 0) calls it once per step; each worker opens the
stores itself and reads only the documents of the steps it prepares, so memory stays
bounded whatever the store size.

Within a step, rank ``r`` sorts its texts by student length and packs them longest first
into micro-batches of at most ``micro_batch_size`` texts and, with ``micro_batch_tokens``,
at most that many padded tokens (:func:`xtd.packing.pack_longest_first`), each padded to
its longest text. The losses are normalised by counts over the whole global batch
(docs/method.md, "Normalisation"), so the cut into ranks and micro-batches does not change
the step's loss (nor its gradient, unless GradMag weighs each micro-batch's terms).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch

from xtd.alignment_cache import open_cache, usable_cache
from xtd.config import ALMSettings, DataSettings
from xtd.data_plan import Pieces, StepPlan, estimate_piece_rows, read_piece
from xtd.examples import build_example, pad_examples, pad_id
from xtd.losses.registry import Batch, LossSpec, count_normalizers
from xtd.packing import pack_longest_first
from xtd.storage import AlignmentReader, StoreReader, open_store
from xtd.tokenization import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = ["StepData", "StepDataset", "TrainData", "build_train_data", "split_pieces"]


class StepData(TypedDict):
    """One rank's data of one optimizer step (an item of :class:`StepDataset`)."""

    micro_batches: list[Batch]
    counts: list[dict[str, int]]
    """Per micro-batch, the data-only count of every chosen loss."""
    student_tokens: int
    teacher_tokens: int
    documents: list[int]
    """Global text indices of this rank's texts."""


@dataclass(frozen=True)
class TrainData:
    """Everything a worker needs to turn documents into micro-batches (picklable).

    Attributes:
        stores: store URLs, in ``--store`` order.
        student_tokenizer: the student's tokenizer.
        plan: the step plan.
        data: lengths, packing and long documents.
        alm: chunk kind and boundary classes (and the merge, for the ALM count).
        losses: the chosen losses' registry entries: which teacher arrays to read and
            which counts each micro-batch reports.
        micro_batch_size: texts per micro-batch on this rank.
        alignment_cache: per store, the digest of an ``xtd align --cache`` group to read
            student tokens and chunk ids from (None: tokenise and align on the fly).
            Pieces of split documents are always tokenised and aligned on the fly.
        pieces: per store, its documents cut into training texts, or None: one text per
            document (the plan's index space is then documents).
    """

    stores: tuple[str, ...]
    student_tokenizer: ByteTokenizer
    plan: StepPlan
    data: DataSettings
    alm: ALMSettings
    losses: tuple[LossSpec, ...]
    micro_batch_size: int
    alignment_cache: tuple[str | None, ...] = ()
    pieces: tuple[Pieces, ...] | None = None

    @property
    def need_topk(self) -> bool:
        return any(spec.needs_topk for spec in self.losses)

    @property
    def need_hidden(self) -> bool:
        return any(spec.needs_hidden for spec in self.losses)


def split_pieces(
    readers: Sequence[StoreReader], student_tokenizer: ByteTokenizer, data: DataSettings
) -> tuple[Pieces, ...] | None:
    """Each store's documents as training texts: long ones cut into pieces (``split``)."""
    if data.long_documents != "split":
        return None
    max_rows = estimate_piece_rows(readers, student_tokenizer, data.max_student_length)
    if data.max_teacher_length is not None:
        max_rows = min(max_rows, data.max_teacher_length)
    pieces = tuple(Pieces.of(r.doc_num_tokens(), max_rows) for r in readers)
    documents, texts = sum(len(r) for r in readers), sum(len(p) for p in pieces)
    if texts > documents:
        logger.info(
            "%d documents longer than %d teacher rows (≈ %d student tokens) are split: %d documents → %d texts",
            sum(int((p.num_rows > max_rows).sum()) for p in pieces), max_rows, data.max_student_length,
            documents, texts,
        )  # fmt: skip
    return pieces


def build_train_data(
    stores: Sequence[tuple[str, StoreReader]],
    student_tokenizer: ByteTokenizer,
    losses: Sequence[LossSpec],
    *,
    data: DataSettings,
    alm: ALMSettings,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> TrainData:
    """Plan a run's data once: pieces, the step plan, usable alignment caches."""
    readers = [reader for _, reader in stores]
    pieces = split_pieces(readers, student_tokenizer, data)
    sizes = tuple(len(p) for p in pieces) if pieces else tuple(len(r) for r in readers)
    plan = StepPlan(sizes, data.batch_size, seed=seed, rank=rank, world_size=world_size)
    local_texts = data.batch_size // world_size
    return TrainData(
        stores=tuple(url for url, _ in stores),
        student_tokenizer=student_tokenizer,
        plan=plan,
        data=data,
        alm=alm,
        losses=tuple(losses),
        micro_batch_size=min(data.micro_batch_size or local_texts, local_texts),
        alignment_cache=tuple(usable_cache(url, r, student_tokenizer, alm.chunks) for url, r in stores),
        pieces=pieces,
    )


class StepDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item ``s`` is this rank's :class:`StepData` of step ``s``.

    Use it with ``DataLoader(dataset, batch_size=None, sampler=range(start, stop))``.
    """

    def __init__(self, spec: TrainData) -> None:
        self.spec = spec
        self._readers: list[StoreReader] | None = None
        self._caches: list[AlignmentReader | None] = []
        self._pid: int | None = None

    def __len__(self) -> int:  # an endless sequence of steps; the sampler bounds it
        return 2**62

    # Stores are opened lazily per process: zarr handles must not cross a fork.
    def _stores(self) -> list[StoreReader]:
        if self._readers is None or self._pid != os.getpid():
            self._readers = [open_store(url) for url in self.spec.stores]
            digests = self.spec.alignment_cache or (None,) * len(self.spec.stores)
            self._caches = [
                open_cache(url, digest) if digest else None for url, digest in zip(self.spec.stores, digests, strict=True)
            ]
            self._pid = os.getpid()
        return self._readers

    def __getitem__(self, step: int) -> StepData:
        spec = self.spec
        indices = spec.plan.rank_indices(int(step))
        examples = [self.example(int(i)) for i in indices]
        lengths = [len(e["input_ids"]) for e in examples]
        micro_batches, counts = [], []
        padding = pad_id(spec.student_tokenizer)
        groups = pack_longest_first(lengths, max_items=spec.micro_batch_size, max_tokens=spec.data.micro_batch_tokens)
        for group in groups:
            batch = pad_examples([examples[i] for i in group], pad_id=padding)
            micro_batches.append(batch)
            counts.append(count_normalizers(batch, spec.losses, spec.alm))
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
            assert spec.pieces is not None
            num_rows = int(spec.pieces[store_no].num_rows[doc_no])
            doc = read_piece(reader, doc_no, lo, hi, num_rows, topk=spec.need_topk, hidden=spec.need_hidden)
            cached = None  # the cache aligns whole documents
            where = f"rows {lo}-{hi} of document {doc_no} of store {spec.stores[store_no]!r}"
        return build_example(
            doc,
            spec.student_tokenizer,
            columns=[list(reader.boundary_classes).index(c) for c in spec.alm.boundary_classes],
            max_student_length=spec.data.max_student_length,
            max_teacher_length=spec.data.max_teacher_length,
            alm_chunks=spec.alm.chunks,
            need_topk=spec.need_topk,
            need_hidden=spec.need_hidden,
            cached=cached,
            where=where,
        )
