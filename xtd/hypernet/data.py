"""The data of one hypernetwork training step: a tokenizer drawn for the step, the step's
texts tokenised with it and aligned with the teacher rows on the fly, and the vocabulary
whose embeddings the step predicts.

:class:`HypernetStepDataset` is :class:`xtd.train_data.StepDataset` with a student
tokenizer that changes every step. Step ``s``:

1. the sampler observes the texts of the whole global step ``s`` (every rank observes the
   same texts, so every rank draws the same tokenizer) and draws a tokenizer from
   ``numpy.random.default_rng([seed, s])`` (:mod:`xtd.hypernet.sampler`); with a fixed
   tokenizer this is skipped;
2. this rank's micro-batches are built exactly as ``xtd train`` builds them (tokenise,
   align with the stored teacher spans, truncate, pack, count), with that tokenizer;
3. the step's vocabulary is chosen (:func:`xtd.hypernet.step.choose_vocabulary`: every id
   the micro-batches hold, the specials, random others up to ``max_vocab`` drawn from
   ``default_rng([seed, s, 1])``), the micro-batches' ``input_ids`` become rows of it, and
   its tokens are decomposed into base pieces.

The sampler's window is state carried from step to step, so steps are prepared in order in
the training process (no DataLoader workers; :mod:`xtd.hypernet.train` prepares one step
ahead in a thread). A resumed run replays the sampler's
observations of the steps before its checkpoint (texts only, no model), which rebuilds the
window and its tables exactly as the killed run had them.

Dimension letters: ``U`` target tokens predicted this step, ``L`` pieces per token.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from xtd.data_plan import read_piece
from xtd.examples import document_text
from xtd.hypernet.decomposition import Decomposer
from xtd.hypernet.sampler import TokenizerSampler
from xtd.hypernet.step import choose_vocabulary
from xtd.tokenization import ByteTokenizer
from xtd.train_data import StepData, StepDataset, TrainData

__all__ = ["HypernetStepDataset", "STEP_STATS"]

STEP_STATS = ("vocab_size", "bytes_per_token", "predicted_tokens", "mean_pieces", "truncated", "sample_s", "data_s")
"""What each step reports about its tokenizer and data (added to the metrics record):
the drawn tokenizer's vocabulary size, text bytes per (non-special) token, tokens
predicted (U), mean pieces per predicted token, decompositions cut at ``max_pieces``,
seconds spent drawing the tokenizer (reading the step's texts and observing included) and
preparing the whole step's data (drawing, tokenising, aligning, decomposing).
:mod:`xtd.hypernet.train` prepares a step while the one before trains and adds
``data_wait_s``, the seconds the loop waited for it."""


class HypernetStepDataset(StepDataset):
    """Item ``s`` is this rank's :class:`~xtd.train_data.StepData` of step ``s`` with a
    tokenizer drawn for the step, plus ``pieces`` (U, L) int64, ``boundary_mask`` (U,)
    bool and ``stats`` (:data:`STEP_STATS`).

    Args:
        spec: the run's data plan (its ``student_tokenizer`` is replaced every step; its
            alignment caches are not used, as they hold another tokenizer's alignment).
        decomposer: decomposes into the base model's ids.
        sampler: draws the step's tokenizer, or None with ``fixed``.
        fixed: the one tokenizer of every step (no sampling), or None.
        max_vocab: tokens predicted per step (:func:`~xtd.hypernet.step.choose_vocabulary`),
            None for the whole vocabulary.
        seed: seeds the draws (with the step number).

    Raises:
        ValueError: neither or both of ``sampler`` and ``fixed``.
    """

    def __init__(
        self,
        spec: TrainData,
        *,
        decomposer: Decomposer,
        sampler: TokenizerSampler | None = None,
        fixed: ByteTokenizer | None = None,
        max_vocab: int | None = None,
        seed: int = 0,
    ) -> None:
        if (sampler is None) == (fixed is None):
            raise ValueError("give exactly one of sampler and fixed")
        spec = dataclasses.replace(spec, alignment_cache=(None,) * len(spec.stores))
        super().__init__(spec)
        self.base_spec = spec
        self.decomposer = decomposer
        self.sampler = sampler
        self.fixed = fixed
        self.max_vocab = max_vocab
        self.seed = seed
        self._observed = 0  # steps the sampler has observed: 0 .. _observed - 1

    def __getitem__(self, step: int) -> StepData:  # type: ignore[override]
        t0 = time.perf_counter()
        step = int(step)
        tokenizer, draw_stats = self.draw(step)
        t_drawn = time.perf_counter()
        self.spec = dataclasses.replace(self.base_spec, student_tokenizer=tokenizer)
        data: dict[str, Any] = dict(super().__getitem__(step))
        batches = data["micro_batches"]
        ids = np.unique(np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches]))
        vocab_ids = choose_vocabulary(
            tokenizer, ids, max_vocab=self.max_vocab, rng=np.random.default_rng([self.seed, step, 1])
        )
        text_tokens = []
        for batch in batches:
            local = batch["input_ids"].numpy()
            text_tokens.append(local[batch["attention_mask"].numpy()])
            batch["input_ids"] = torch.from_numpy(np.searchsorted(vocab_ids, local))
        dec = self.decomposer(tokenizer, vocab_ids)
        width = int(dec.num_pieces.max()) if len(dec) else 1
        flat = np.concatenate(text_tokens) if text_tokens else np.zeros(0, np.int64)
        flat = flat[~tokenizer.special_mask(flat)]
        data["pieces"] = torch.from_numpy(np.ascontiguousarray(dec.pieces[:, :width]))
        data["boundary_mask"] = torch.from_numpy(tokenizer.boundary_mask(self.spec.alm.boundary_classes)[vocab_ids])
        data["stats"] = {
            "vocab_size": float(tokenizer.vocab_size),
            "bytes_per_token": float(tokenizer.token_lengths[flat].sum()) / max(int(flat.shape[0]), 1),
            "predicted_tokens": float(vocab_ids.shape[0]),
            "mean_pieces": float(dec.num_pieces.mean()) if len(dec) else 0.0,
            "truncated": float(dec.counts["truncated"]),
            **draw_stats,
            "sample_s": t_drawn - t0,
            "data_s": time.perf_counter() - t0,
        }
        return data  # type: ignore[return-value]

    def draw(self, step: int) -> tuple[ByteTokenizer, dict[str, float]]:
        """The tokenizer of ``step``, after the sampler has observed every step up to it.

        A first call at step ``s`` > 0 (a resumed run) replays the observations of steps
        ``0 .. s − 1`` first, so the sampler's state is that of an uninterrupted run.
        """
        if self.fixed is not None:
            return self.fixed, {}
        assert self.sampler is not None
        for s in range(self._observed, step + 1):
            self.sampler.observe(self.texts(s))
        self._observed = max(self._observed, step + 1)
        drawn = self.sampler.sample(np.random.default_rng([self.seed, step]))
        return drawn.tokenizer, {"noise_std": drawn.noise_std, "learned": float(drawn.num_learned)}

    def texts(self, step: int) -> list[str]:
        """The texts of global step ``step`` (all ranks), as the run's data plan cuts them."""
        return [self.text(int(i)) for i in self.base_spec.plan.global_indices(step)]

    def text(self, index: int) -> str:
        """The text of global text ``index`` (a document, or a piece of one)."""
        spec = self.base_spec
        store_no, unit = spec.plan.locate(index)
        reader = self._stores()[store_no]
        where = f"store {spec.stores[store_no]!r}"
        if spec.pieces is None:
            doc = reader.document(unit, topk=False, hidden=False)
        else:
            doc_no, lo, hi, whole = spec.pieces[store_no].locate(unit)
            num_rows = int(spec.pieces[store_no].num_rows[doc_no])
            doc = (
                reader.document(doc_no, topk=False, hidden=False)
                if whole
                else read_piece(reader, doc_no, lo, hi, num_rows, topk=False, hidden=False)
            )
        return document_text(doc, where=where)
