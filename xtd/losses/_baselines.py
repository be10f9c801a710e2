"""Baseline losses: SFT, same-tokenizer top-k KD, ULD and MinED (docs/method.md, "SFT", "Baselines").

Dimension letters: ``B`` batch, ``T`` teacher rows, ``S`` student rows, ``K`` top-k,
``V`` student vocabulary, ``P`` aligned positions. Stored teacher top-k data follow the
store layout (docs/format.md): row r holds the teacher's next-token distribution *after*
token r (top-k ids, their log-probs, and the log of the remaining "tail" mass).
Every loss returns a sum divided by a global count (``normalizer``), so summing
micro-batch losses over an optimizer step gives the global-batch loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from xtd.errors import DataError
from xtd.losses._alm import (
    LOGPROB_FLOOR,
    ALMChunks,
    ALMTargets,
    _compute_dtype,
    alm_chunks,
    log1mexp,
)

__all__ = [
    "count_kd_rows",
    "count_mined_terms",
    "count_sft_tokens",
    "kd_topk_loss",
    "kd_topk_loss_from_logprob",
    "mined_loss",
    "one_to_one_chunks",
    "sft_loss",
    "uld_loss",
    "uld_loss_from_topk",
    "uld_rows",
]

_TAIL_CAP = -1e-7  # keep log(top-k mass) < 0 so log(1 − mass) stays finite


def _denominator(normalizer: int | float | Tensor | None, local: int | Tensor) -> float:
    if normalizer is not None:
        return max(float(normalizer), 1.0)
    return max(float(local), 1.0)


def _row_ge1(mask: Tensor) -> Tensor:
    return mask.bool() & (torch.arange(mask.shape[1], device=mask.device)[None, :] >= 1)


def count_sft_tokens(loss_mask: Tensor) -> int:
    """Rows ≥ 1 inside the loss mask: the local share of the SFT normaliser (all-reduce it)."""
    return int(_row_ge1(loss_mask).sum())


def sft_loss(
    student_logprob: Tensor, loss_mask: Tensor, *, normalizer: int | float | Tensor | None = None
) -> Tensor:
    """Next-token cross-entropy of the student on its own tokens (docs/method.md, "SFT").

    Teacher data needed: none.

    Args:
        student_logprob: (B, S) ℓ^S from :func:`xtd.losses.student_path` (row r scores token r).
        loss_mask: (B, S) bool, the student rows trained on (row 0 is always excluded).
        normalizer: global count of such rows (:func:`count_sft_tokens`, all-reduced); None = local.

    Returns:
        0-dim float32: −Σ ℓ^S over rows ≥ 1 in the mask, divided by the count.
    """
    mask = _row_ge1(loss_mask)
    lp = student_logprob.to(_compute_dtype(student_logprob)).clamp(LOGPROB_FLOOR, 0.0)
    total = -torch.where(mask, lp, 0.0).sum()
    return total / _denominator(normalizer, mask.sum())


def count_kd_rows(loss_mask: Tensor) -> int:
    """Rows whose *next* token is in the loss mask: the local share of the KD normaliser."""
    return int(loss_mask.bool()[:, 1:].sum())


def kd_topk_loss(
    logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    loss_mask: Tensor,
    *,
    normalizer: int | float | Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Forward KL(teacher ‖ student) from stored top-k, for a student with the teacher's tokenizer.

    Teacher data needed: ``topk_ids``, ``topk_logprobs`` and ``tail_logmass`` per row, on
    the same token sequence as the student (same tokenizer, so row r ↔ row r).

    **Tail.** The teacher's mass outside its top-k is one extra outcome, "any other token":
    its probability is e^tail for the teacher and 1 − Σ_k p_S(top-k ids) for the student.
    The loss is therefore the exact KL between the two distributions coarsened to k + 1
    outcomes: a lower bound of the full KL that equals it when the tail is empty, and that
    is still zero only when the student puts the same mass on each top-k token.

    Args:
        logits: (B, S, V') student logits; columns ≥ ``vocab_size`` are padding.
        topk_ids: (B, S, K) int teacher top-k ids of the distribution after row r.
        topk_logprobs: (B, S, K) their log-probs.
        tail_logmass: (B, S) log(1 − Σ_k p_T).
        loss_mask: (B, S) bool student/teacher loss mask; row r counts iff token r + 1 is masked in.
        normalizer: global :func:`count_kd_rows`; None = local.
        vocab_size: real vocabulary size (default: all columns).

    Returns:
        0-dim float32 loss.
    """
    vocab = vocab_size or logits.shape[-1]
    dtype = _compute_dtype(logits)
    z = logits[..., :vocab].to(dtype)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (B, S, 1)
    lp_s = z.gather(-1, topk_ids.long().clamp(0, vocab - 1)) - lse  # (B, S, K)
    return kd_topk_loss_from_logprob(lp_s, topk_logprobs, tail_logmass, loss_mask, normalizer=normalizer)


def kd_topk_loss_from_logprob(
    student_topk_logprob: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    loss_mask: Tensor,
    *,
    normalizer: int | float | Tensor | None = None,
) -> Tensor:
    """:func:`kd_topk_loss` from the student's log-probs of the teacher's top-k ids.

    For a student whose logits are never materialised: ``xtd.losses.fused_output(hidden,
    layer, gather_ids=topk_ids).gathered_logprob`` gives them.

    Args:
        student_topk_logprob: (B, S, K) student log-probs at ``topk_ids``.
        topk_logprobs, tail_logmass, loss_mask, normalizer: as :func:`kd_topk_loss`.

    Returns:
        0-dim float32 loss.
    """
    dtype = _compute_dtype(student_topk_logprob)
    lp_s = student_topk_logprob.to(dtype).clamp(LOGPROB_FLOOR, 0.0)
    lp_t = topk_logprobs.to(dtype).clamp(LOGPROB_FLOOR, 0.0)
    tail_t = tail_logmass.to(dtype).clamp(LOGPROB_FLOOR, 0.0)
    tail_s = log1mexp(torch.logsumexp(lp_s, dim=-1).clamp(max=_TAIL_CAP)).clamp(LOGPROB_FLOOR, 0.0)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1) + tail_t.exp() * (tail_t - tail_s)  # (B, S)
    rows = torch.zeros_like(loss_mask, dtype=torch.bool)
    rows[:, :-1] = loss_mask.bool()[:, 1:]
    return torch.where(rows, kl, 0.0).sum() / _denominator(normalizer, rows.sum())


def _predicting_rows(chunks: ALMChunks, sel: Tensor) -> tuple[Tensor, Tensor]:
    """Flat teacher and student rows whose next token starts each selected chunk.

    Chunk starts are at identical byte offsets on both sides, so these rows have read the
    same bytes (one-sided slot tokens have no bytes): the aligned positions of ULD and MinED.
    Scored chunks start at row ≥ 1 on both sides, so row − 1 stays in the same example.
    """
    return chunks.teacher_first[sel] - 1, chunks.student_first[sel] - 1


def uld_loss(
    logits: Tensor,
    targets: ALMTargets,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    *,
    normalizer: int | float | Tensor | None = None,
    chunks: ALMChunks | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Universal Logit Distillation over sorted probabilities at aligned positions (docs/method.md, "Baselines", "Deviations from the reference implementation").

    Teacher data needed: ``topk_logprobs`` and ``tail_logmass`` (ids are not used: ULD
    compares sorted probability vectors, so it works across vocabularies).

    Positions are aligned, not compared by raw index: for each scored chunk, the teacher
    row and student row just before its first token (the previous chunk end on each side),
    where both models have read exactly the same bytes. The distance is
    Σ_k |p_T,(k) − p_S,(k)| + |m_T − m_S| over the k largest probabilities sorted in
    descending order, plus the remaining masses m = 1 − Σ top-k (the top-k view of the
    reference's L1 between full sorted vectors). Combine with :func:`sft_loss` for ULD+CE.

    Args:
        logits: (B, S, V') student logits.
        targets: alignment and loss masks.
        topk_logprobs: (B, T, K) teacher top-k log-probs after each row.
        tail_logmass: (B, T) teacher log tail mass.
        normalizer: global :func:`xtd.losses.count_scored_chunks`; None = local.
        chunks: precomputed ``alm_chunks(targets)``.
        vocab_size: real student vocabulary size (default: all columns).

    Returns:
        0-dim float32 loss.
    """
    rows_t, rows_s = uld_rows(targets, chunks=chunks)
    if rows_s.numel() == 0:
        return logits.to(_compute_dtype(logits)).sum() * 0.0
    k = topk_logprobs.shape[-1]
    vocab = vocab_size or logits.shape[-1]
    dtype = _compute_dtype(logits)
    z = logits.reshape(-1, logits.shape[-1])[rows_s, :vocab].to(dtype)  # (P, V)
    p_s = torch.softmax(z, dim=-1).topk(min(k, vocab), dim=-1).values  # (P, k), descending
    return _uld_distance(p_s, rows_t, topk_logprobs, tail_logmass, normalizer)


def uld_rows(targets: ALMTargets, *, chunks: ALMChunks | None = None) -> tuple[Tensor, Tensor]:
    """(P,) flat teacher rows and (P,) flat student rows that ULD compares (see :func:`uld_loss`)."""
    if chunks is None:
        chunks = alm_chunks(targets, merge=False)
    return _predicting_rows(chunks, chunks.scored.nonzero().squeeze(1))


def uld_loss_from_topk(
    student_topk_logprob: Tensor,
    rows_t: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    *,
    normalizer: int | float | Tensor | None = None,
) -> Tensor:
    """:func:`uld_loss` from the student's own top-k log-probs at the rows of :func:`uld_rows`.

    For a student whose logits are never materialised: ``xtd.losses.fused_output(
    hidden.reshape(-1, H)[rows_s], layer, topk=K).topk_logprob`` gives them.

    Args:
        student_topk_logprob: (P, k) the student's k largest log-probs (descending) at the
            student rows of :func:`uld_rows`, k ≤ K.
        rows_t: (P,) the teacher rows of :func:`uld_rows`.
        topk_logprobs, tail_logmass, normalizer: as :func:`uld_loss`.

    Returns:
        0-dim float32 loss.
    """
    dtype = _compute_dtype(student_topk_logprob)
    if rows_t.numel() == 0:
        return student_topk_logprob.to(dtype).sum() * 0.0
    return _uld_distance(student_topk_logprob.to(dtype).exp(), rows_t, topk_logprobs, tail_logmass, normalizer)


def _uld_distance(
    p_s: Tensor, rows_t: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, normalizer: int | float | Tensor | None
) -> Tensor:
    """Σ over aligned positions of the L1 between sorted top-k probabilities and tails."""
    k = topk_logprobs.shape[-1]
    dtype = p_s.dtype
    if p_s.shape[-1] < k:
        p_s = F.pad(p_s, (0, k - p_s.shape[-1]))
    p_t = (
        topk_logprobs.reshape(-1, k)[rows_t]
        .to(dtype)
        .clamp(max=0.0)
        .exp()
        .sort(dim=-1, descending=True)
        .values
    )
    m_t = tail_logmass.reshape(-1)[rows_t].to(dtype).clamp(max=0.0).exp()
    m_s = (1.0 - p_s.sum(-1)).clamp(min=0.0)
    dist = (p_t - p_s).abs().sum(-1) + (m_t - m_s).abs()
    return dist.sum() / _denominator(normalizer, rows_t.numel())


def one_to_one_chunks(chunks: ALMChunks) -> Tensor:
    """(B·C,) bool: scored chunks of exactly one scored token on each side.

    Written as the explicit conjunction (n^T = 1) ∧ (n^S = 1) ∧ scored; the reference mixes
    ``==`` and ``&`` without parentheses and gets a different mask (docs/method.md, "Deviations from the reference implementation").
    """
    return (chunks.teacher_count == 1) & (chunks.student_count == 1) & chunks.scored


def count_mined_terms(targets: ALMTargets) -> int:
    """#1:1 chunks + #other scored student tokens: the local share of the MinED normaliser."""
    chunks = alm_chunks(targets, merge=False)
    one = one_to_one_chunks(chunks)
    return int(one.sum() + _mined_ce_rows(chunks, one).sum())


def _mined_ce_rows(chunks: ALMChunks, one: Tensor) -> Tensor:
    size = one.numel()
    in_one = torch.cat([one, one.new_zeros(1)])[chunks.student_index]  # (B·S,)
    return chunks.student_weight & ~in_one & (chunks.student_index < size)


def mined_loss(
    logits: Tensor,
    student_logprob: Tensor,
    targets: ALMTargets,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mined_map: Tensor,
    *,
    teacher_vocab_size: int,
    temperature: float = 2.0,
    normalizer: int | float | Tensor | None = None,
    chunks: ALMChunks | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """MinED baseline (Wan et al.; docs/method.md, "Baselines"): KL at 1:1 chunks, CE on every other token.

    Teacher data needed: ``topk_ids``, ``topk_logprobs`` and ``tail_logmass`` per row, plus
    the student→teacher vocabulary map of :func:`xtd.losses.build_mined_map`.

    At each 1:1 chunk (one scored token on each side) the teacher distribution predicting
    it is gathered into the student vocabulary through the map, as the reference gathers
    logits: student token v gets the teacher log-prob of ``mined_map[v]``. Only the
    teacher's top-k is stored, so the comparison is over the distributions coarsened as in
    :func:`kd_topk_loss`: one outcome per student token that maps into the top-k, plus
    one "any other token" outcome holding the teacher's tail mass and, for the student,
    the mass of its remaining tokens. Both coarsened sides are softened by
    ``temperature`` and the loss is the forward KL(teacher ‖ student).

    (Spreading the tail evenly over the other V_T − K ids instead, our first version,
    trains the student's tail towards uniform; at temperature 2 a spread tail outweighs
    the top-k, and in the Table 1 miniature that left MinED students worse than their
    untrained initialisation.)

    Every other scored student token gets cross-entropy (the reference's near-one-hot
    target). Sum / (#1:1 chunks + #other tokens), the 1:1 mask computed explicitly
    (docs/method.md, "Deviations from the reference implementation").

    Args:
        logits: (B, S, V') student logits.
        student_logprob: (B, S) ℓ^S from :func:`xtd.losses.student_path`.
        targets: alignment and loss masks.
        topk_ids: (B, T, K) teacher top-k ids after each row.
        topk_logprobs: (B, T, K) their log-probs.
        tail_logmass: (B, T) teacher log tail mass.
        mined_map: (V,) int, teacher id for each student id (−1 = none).
        teacher_vocab_size: V_T (bounds the top-k ids).
        temperature: KL temperature (reference: 2).
        normalizer: global :func:`count_mined_terms`; None = local.
        chunks: precomputed ``alm_chunks(targets)``.
        vocab_size: real student vocabulary size (default: ``len(mined_map)``).

    Returns:
        0-dim float32 loss.
    """
    if chunks is None:
        chunks = alm_chunks(targets, merge=False)
    vocab = vocab_size or int(mined_map.numel())
    if vocab > logits.shape[-1] or mined_map.numel() < vocab:
        raise DataError(
            f"MinED map covers {mined_map.numel()} student ids but the logits have {logits.shape[-1]} columns"
        )
    if teacher_vocab_size < topk_ids.shape[-1]:
        raise DataError(
            f"mined_loss got teacher_vocab_size={teacher_vocab_size} but {topk_ids.shape[-1]} top-k ids per "
            "row; pass the teacher tokenizer's vocabulary size"
        )
    dtype = _compute_dtype(logits, student_logprob)
    one = one_to_one_chunks(chunks)
    ce_rows = _mined_ce_rows(chunks, one)
    ce = -torch.where(
        ce_rows, student_logprob.reshape(-1).to(dtype).clamp(LOGPROB_FLOOR, 0.0), 0.0
    ).sum()
    sel = one.nonzero().squeeze(1)
    kl = logits.to(dtype).sum() * 0.0
    if sel.numel():
        rows_t, rows_s = _predicting_rows(chunks, sel)
        k = topk_ids.shape[-1]
        ids_t = topk_ids.reshape(-1, k)[rows_t].long()  # (P, K)
        lp_t = topk_logprobs.reshape(-1, k)[rows_t].to(dtype).clamp(LOGPROB_FLOOR, 0.0)
        tail = tail_logmass.reshape(-1)[rows_t].to(dtype).clamp(LOGPROB_FLOOR, 0.0)
        # Teacher log-prob of each student token's mapped id, -inf outside the top-k
        # (and for the "no teacher id" column V_T that −1 maps to).
        dense = lp_t.new_full((lp_t.shape[0], teacher_vocab_size + 1), -math.inf)  # (P, V_T + 1)
        dense.scatter_(1, ids_t.clamp(0, teacher_vocab_size - 1), lp_t)
        mapped = mined_map[:vocab].to(logits.device).long()
        mapped = torch.where(mapped < 0, teacher_vocab_size, mapped)
        t_top = dense[:, mapped]  # (P, V)
        in_top = torch.isfinite(t_top)
        s_lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[rows_s, :vocab].to(dtype), dim=-1)
        # (A constant e^FLOOR column keeps the log-sum finite, and its gradient defined,
        # should every student token map into the top-k.)
        floor = s_lp.new_full((s_lp.shape[0], 1), LOGPROB_FLOOR)
        s_tail = torch.logsumexp(torch.cat([s_lp.masked_fill(in_top, -math.inf), floor], dim=1), dim=-1)
        coarse_t = torch.cat([t_top, tail[:, None]], dim=1)  # (P, V + 1)
        coarse_s = torch.cat([s_lp.masked_fill(~in_top, -math.inf), s_tail[:, None]], dim=1)
        q_t = torch.log_softmax(coarse_t / temperature, dim=-1)
        q_s = torch.log_softmax(coarse_s / temperature, dim=-1)
        present = torch.cat([in_top, in_top.new_ones(in_top.shape[0], 1)], dim=1)
        kl = torch.where(present, q_t.exp() * (q_t - q_s), 0.0).sum()
    local = sel.numel() + ce_rows.sum()
    return (kl + ce) / _denominator(normalizer, local)
