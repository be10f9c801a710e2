"""The chunk structure of a micro-batch, data only: the ALM targets, scored rows, last rows
and merged groups (docs/method.md, "Chunks", "Merging"), and the ALM normaliser.

Dimension letters: ``B`` batch, ``T`` teacher tokens, ``S`` student tokens, ``C`` chunks
per example (padded). Chunk membership is given by index arrays (token → chunk id, −1 for
none); last rows use ``scatter_reduce(amax)``, so no dense [B, L, C] matrix is ever built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from xtd.errors import DataError

__all__ = ["LOGPROB_FLOOR", "ALMChunks", "ALMTargets", "alm_chunks", "clamp_logprob", "count_alm_groups"]

LOGPROB_FLOOR = -1.0e4
"""Lowest log-probability used anywhere: e^-10000 is zero for every purpose, and a finite
floor keeps −inf inputs (zero mass) from turning 0·∞ into NaN (docs/method.md, "Scoring a chunk")."""


def clamp_logprob(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, clamped to ``[LOGPROB_FLOOR, 0]``.

    clamp passes gradients at the bounds themselves, so L = 0 keeps its gradient.
    """
    return x.to(dtype).clamp(LOGPROB_FLOOR, 0.0)


@dataclasses.dataclass
class ALMTargets:
    """Teacher data and alignment of one (micro-)batch, as the ALM loss consumes them.

    Attributes:
        teacher_logprob: (B, T) float, ℓ^T per row (values of rows that are not scored are ignored).
        teacher_sigma: (B, T) float, σ^T per row (:func:`teacher_sigma`).
        teacher_chunk: (B, T) int, chunk id per teacher row, −1 = in no chunk (padding too).
        teacher_scored: (B, T) bool, the teacher loss mask (row ≥ 1 and chunk ≥ 0 are added here).
        student_chunk: (B, S) int, chunk id per student row, −1 = in no chunk.
        student_scored: (B, S) bool, the student loss mask.
    """

    teacher_logprob: Tensor
    teacher_sigma: Tensor
    teacher_chunk: Tensor
    teacher_scored: Tensor
    student_chunk: Tensor
    student_scored: Tensor

    @classmethod
    def from_batch(cls, batch: Mapping[str, Tensor]) -> ALMTargets:
        """The targets of a padded micro-batch (:func:`xtd.examples.pad_examples`), on its device."""
        return cls(**{f.name: batch[f.name] for f in dataclasses.fields(cls)})

    def to(self, device: torch.device | str) -> ALMTargets:
        """A copy with every tensor on ``device``."""
        return ALMTargets(
            **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)}
        )


@dataclasses.dataclass(frozen=True)
class ALMChunks:
    """Data-only structure of the chunks and merged groups of one batch.

    Chunk slots are flattened as ``b·C + c``; group slots use the same space (a group is
    named by the slot ``b·C + g``). Row indices are flattened as ``b·T + r`` / ``b·S + r``.
    """

    num_chunks: int  # C: chunk slots per example
    teacher_index: Tensor  # (B·T,) long, chunk slot per row; B·C = none
    student_index: Tensor  # (B·S,) long
    teacher_weight: Tensor  # (B·T,) bool, ω^T
    student_weight: Tensor  # (B·S,) bool, ω^S
    teacher_count: Tensor  # (B·C,) long, n^T
    student_count: Tensor  # (B·C,) long, n^S
    scored: Tensor  # (B·C,) bool
    partial: Tensor  # (B·C,) bool
    teacher_first: Tensor  # (B·C,) long flat row of the first teacher row of the chunk, −1 none
    student_first: Tensor
    teacher_last: Tensor  # (B·C,) long flat row of λ^T_c, −1 none
    student_last: Tensor
    group: Tensor  # (B·C,) long, group slot of each chunk
    group_last: Tensor  # (B·C,) long, chunk slot of each group's last scored member, −1 none
    contributes: Tensor  # (B·C,) bool, per group slot
    dropped: Tensor  # (B·C,) bool, groups lost to a partial member

    @property
    def num_groups(self) -> Tensor:
        """0-dim long tensor: contributing groups of this batch."""
        return self.contributes.sum()


def _flat_index(chunk: Tensor, k: int) -> Tensor:
    bsz, length = chunk.shape
    base = torch.arange(bsz, device=chunk.device)[:, None] * k
    return torch.where(chunk >= 0, base + chunk, torch.full_like(chunk, bsz * k)).reshape(-1)


def _scatter_rows(index: Tensor, size: int, reduce: str, valid: Tensor) -> Tensor:
    """Per slot, the amax/amin flat row index of its rows (−1 where it has none)."""
    rows = torch.arange(index.numel(), device=index.device)
    if reduce == "amin":
        init = torch.full((size + 1,), index.numel(), dtype=torch.long, device=index.device)
        out = init.scatter_reduce(0, torch.where(valid, index, size), rows, "amin")[:size]
        return torch.where(out == index.numel(), -1, out)
    init = torch.full((size + 1,), -1, dtype=torch.long, device=index.device)
    return init.scatter_reduce(0, torch.where(valid, index, size), rows, "amax")[:size]


def alm_chunks(
    targets: ALMTargets, *, merge: bool = True, merge_threshold: float = 0.1
) -> ALMChunks:
    """Scored rows, chunk status, last rows and merged groups (docs/method.md, "Merging").

    Data only: depends on the alignment, the loss masks and the teacher's σ^T, never on the
    student, so the trainer can count groups (and all-reduce the count) before the forward.

    Raises:
        DataError: shapes disagree, a chunk id is out of range, or a scored teacher row (or a
            chunk's last teacher row) holds NaN.
    """
    tc, sc = targets.teacher_chunk.long(), targets.student_chunk.long()
    if tc.dim() != 2 or sc.dim() != 2 or tc.shape[0] != sc.shape[0]:
        raise DataError(
            f"chunk ids must be (B, T) and (B, S) with the same B, got {tuple(tc.shape)} and {tuple(sc.shape)}"
        )
    for name in ("teacher_logprob", "teacher_sigma", "teacher_scored"):
        if getattr(targets, name).shape != tc.shape:
            raise DataError(
                f"ALMTargets.{name} has shape {tuple(getattr(targets, name).shape)}, expected {tuple(tc.shape)}"
            )
    if targets.student_scored.shape != sc.shape:
        raise DataError(
            f"ALMTargets.student_scored has shape {tuple(targets.student_scored.shape)}, expected {tuple(sc.shape)}"
        )
    bsz, tlen = tc.shape
    slen = sc.shape[1]
    dev = tc.device
    row_t = torch.arange(tlen, device=dev)[None, :]
    row_s = torch.arange(slen, device=dev)[None, :]
    # Step 1: ω = [r ≥ 1] ∧ loss mask ∧ [χ ≥ 0].
    w_t = targets.teacher_scored.bool() & (tc >= 0) & (row_t >= 1)
    w_s = targets.student_scored.bool() & (sc >= 0) & (row_s >= 1)
    # One host sync for the chunk count and the NaN check (both data-only).
    bad = torch.isnan(targets.teacher_logprob.float()) & w_t
    bad |= torch.isnan(targets.teacher_sigma.float()) & (tc >= 0)
    stats = torch.stack(
        [
            tc.max() if tc.numel() else torch.tensor(-1, device=dev),
            sc.max() if sc.numel() else torch.tensor(-1, device=dev),
            bad.sum(),
        ]
    ).tolist()
    if stats[2]:
        raise DataError(
            f"teacher data holds NaN at {int(stats[2])} scored rows or chunk rows; "
            "the store marks unscored rows with NaN, so check the loss mask and chunk ids"
        )
    k = int(max(stats[0], stats[1], 0)) + 1
    size = bsz * k
    t_idx, s_idx = _flat_index(tc, k), _flat_index(sc, k)
    w_t, w_s = w_t.reshape(-1), w_s.reshape(-1)
    in_t, in_s = t_idx < size, s_idx < size

    def count(idx: Tensor, w: Tensor) -> Tensor:
        return torch.zeros(size + 1, dtype=torch.long, device=dev).index_add_(0, idx, w.long())[
            :size
        ]

    # Step 2–3: counts and status.
    n_t, n_s = count(t_idx, w_t), count(s_idx, w_s)
    tot_t, tot_s = count(t_idx, in_t), count(s_idx, in_s)
    scored = (n_t >= 1) & (n_s >= 1) & (n_t == tot_t) & (n_s == tot_s)
    void = (n_t == 0) & (n_s == 0)
    partial = ~scored & ~void
    # Step 4: last (and first) rows of every chunk, on each side.
    t_last, s_last = (
        _scatter_rows(t_idx, size, "amax", in_t),
        _scatter_rows(s_idx, size, "amax", in_s),
    )
    t_first, s_first = (
        _scatter_rows(t_idx, size, "amin", in_t),
        _scatter_rows(s_idx, size, "amin", in_s),
    )
    slot = torch.arange(size, device=dev)
    # Step 5: merge_by_space_prob. The teacher alone decides; g(c) = #{c' < c : keep_c'}.
    if merge:
        sig_c = clamp_logprob(targets.teacher_sigma.reshape(-1), torch.float32)[
            t_last.clamp(min=0)
        ]
        keep = ((torch.exp(sig_c) > merge_threshold) & (t_last >= 0)).view(bsz, k).long()
        g = keep.cumsum(dim=1) - keep
        group = (torch.arange(bsz, device=dev)[:, None] * k + g).reshape(-1)
    else:
        group = slot
    n_scored = torch.zeros(size, dtype=torch.long, device=dev).index_add_(0, group, scored.long())
    n_partial = torch.zeros(size, dtype=torch.long, device=dev).index_add_(0, group, partial.long())
    contributes = (n_scored >= 1) & (n_partial == 0)
    dropped = n_partial >= 1
    group_last = torch.full((size,), -1, dtype=torch.long, device=dev).scatter_reduce(
        0, group, torch.where(scored, slot, -1), "amax"
    )
    return ALMChunks(
        num_chunks=k,
        teacher_index=t_idx,
        student_index=s_idx,
        teacher_weight=w_t,
        student_weight=w_s,
        teacher_count=n_t,
        student_count=n_s,
        scored=scored,
        partial=partial,
        teacher_first=t_first,
        student_first=s_first,
        teacher_last=t_last,
        student_last=s_last,
        group=group,
        group_last=group_last,
        contributes=contributes,
        dropped=dropped,
    )


def count_alm_groups(
    targets: ALMTargets, *, merge_threshold: float = 0.1, merge: bool = True
) -> int:
    """Number of contributing (merged) groups of a micro-batch: the local share of N_global.

    Data only (docs/method.md, "Normalisation"): sum it over the micro-batches of an optimizer step
    and all-reduce it over ranks *before* the forward passes, then pass the total to
    :func:`alm_loss` as ``normalizer``.
    """
    return int(alm_chunks(targets, merge=merge, merge_threshold=merge_threshold).num_groups)
