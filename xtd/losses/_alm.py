"""Approximate Likelihood Matching: chunk log-likelihoods, merging, debiasing, distances.

Dimension letters: ``B`` batch, ``T`` teacher tokens, ``S`` student tokens, ``C`` chunks
per example (padded), ``V`` vocabulary. Chunk membership is given by index arrays
(token → chunk id, −1 for none, spec/ALM.md §3.5); chunk sums use ``index_add`` over
flattened (example, chunk) slots and last rows use ``scatter_reduce(amax)``, so no dense
[B, L, C] matrix is ever built. All arithmetic runs in float32 (float64 inputs stay
float64, for ``gradcheck``); log-probabilities are clamped to ``[LOGPROB_FLOOR, 0]``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal, get_args

import torch
from torch import Tensor

from xtd.errors import ConfigError, DataError

__all__ = [
    "ALM_DISTANCES",
    "LOGPROB_FLOOR",
    "ALMChunks",
    "ALMTargets",
    "alm_chunks",
    "alm_distance",
    "alm_loss",
    "count_alm_groups",
    "log1mexp",
    "student_path",
    "teacher_sigma",
]

logger = logging.getLogger(__name__)

LOGPROB_FLOOR = -1.0e4
"""Lowest log-probability used anywhere: e^-10000 is zero for every purpose, and a finite
floor keeps −inf inputs (zero mass) from turning 0·∞ into NaN (spec/ALM.md §4.1)."""

Distance = Literal[
    "binary_ce",
    "binary_kl",
    "abs",
    "abs_exp",
    "reverse_binary_kl",
    "binary_kl_temp_limit",
    "renyi",
    "joschu_k2",
    "joschu_k3",
]
ALM_DISTANCES: tuple[str, ...] = get_args(Distance)
"""The ALM distances of :func:`alm_distance`, in the order of the ``Distance`` type."""

_LN2 = math.log(2.0)
_CHUNK_ELEMENTS = 1 << 23  # rows × vocab per slab in student_path: 32 MB of fp32 temporaries


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32 (bf16/fp16 are cast up)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _clamp_logprob(x: Tensor, dtype: torch.dtype) -> Tensor:
    # clamp passes gradients at the bounds themselves, so L = 0 keeps its gradient.
    return x.to(dtype).clamp(LOGPROB_FLOOR, 0.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, stable at both ends (spec/ALM.md §4.2 step 7).

    Uses ``log1p(−eˣ)`` below −ln 2 and ``log(−expm1(x))`` above. The unused branch is fed
    a harmless value so that neither its value nor its gradient can be NaN.
    """
    small = x < -_LN2
    x_small = torch.where(small, x, torch.full_like(x, -1.0))
    x_big = torch.where(small, torch.full_like(x, -0.5), x)
    return torch.where(small, torch.log1p(-torch.exp(x_small)), torch.log(-torch.expm1(x_big)))


def alm_distance(
    teacher_logp: Tensor,
    student_logp: Tensor,
    tau: float = 100.0,
    kind: Distance = "binary_ce",
    *,
    eps: float = 1e-6,
    alpha: float = 0.5,
) -> Tensor:
    """Element-wise ALM distance between teacher and student (debiased) chunk log-likelihoods.

    With a = clamp(L̃^T), b = clamp(L̃^S), u = a/τ − ε and v = b/τ − ε (spec/ALM.md §4.2 step 7):

    - ``binary_ce`` (default): −[eᵘ·v + (1 − eᵘ)·log1mexp(v)], the binary cross-entropy between
      Bernoulli(p_T^{1/τ}) and Bernoulli(p_S^{1/τ}); the binary KL plus the teacher's entropy.
    - ``binary_kl``: eᵘ(u − v) + (1 − eᵘ)(log1mexp(u) − log1mexp(v)); same gradient, floor 0.
    - ``abs``: |a − b| (no τ). ``abs_exp``: |eᵘ − eᵛ|.
    - ``reverse_binary_kl``: eᵛ(v − u) + (1 − eᵛ)(log1mexp(v) − log1mexp(u)).
    - ``binary_kl_temp_limit`` (τ → ∞): (a' − b') + a'·log(−b') − a'·log(−a'), a', b' = a − ε, b − ε.
    - ``renyi``: binary Rényi divergence of order ``alpha`` between the same Bernoullis.
    - ``joschu_k2`` = r²/2 and ``joschu_k3`` = eʳ − 1 − r with r = (a − b)/τ.

    Args:
        teacher_logp: (...) teacher log-likelihoods L̃^T (the target), any float dtype.
        student_logp: (...) student log-likelihoods L̃^S, broadcastable to ``teacher_logp``.
        tau: binarisation temperature τ (> 0).
        kind: one of :data:`ALM_DISTANCES`.
        eps: the offset ε that keeps v < 0.
        alpha: order of ``renyi`` (≠ 1).

    Returns:
        (...) float32 distances (float64 if an input is float64).

    Raises:
        ConfigError: an unknown ``kind`` or a non-positive ``tau``.
    """
    if kind not in ALM_DISTANCES:
        raise ConfigError(
            f"unknown ALM distance {kind!r}; choose one of {', '.join(ALM_DISTANCES)}"
        )
    if not tau > 0:
        raise ConfigError(f"ALM temperature tau must be > 0, got {tau!r}")
    dtype = _compute_dtype(teacher_logp, student_logp)
    a = _clamp_logprob(teacher_logp, dtype)
    b = _clamp_logprob(student_logp, dtype)
    if kind == "abs":
        return (a - b).abs()
    if kind == "binary_kl_temp_limit":
        a1, b1 = a - eps, b - eps
        return (a1 - b1) + a1 * torch.log(-b1) - a1 * torch.log(-a1)
    if kind in ("joschu_k2", "joschu_k3"):
        r = (a - b) / tau
        return r.square() / 2 if kind == "joschu_k2" else torch.expm1(r) - r
    u = a / tau - eps
    v = b / tau - eps
    pu = torch.exp(u)
    if kind == "binary_ce":
        return -(pu * v + (1 - pu) * log1mexp(v))
    if kind == "binary_kl":
        return pu * (u - v) + (1 - pu) * (log1mexp(u) - log1mexp(v))
    if kind == "abs_exp":
        return (pu - torch.exp(v)).abs()
    if kind == "reverse_binary_kl":
        pv = torch.exp(v)
        return pv * (v - u) + (1 - pv) * (log1mexp(v) - log1mexp(u))
    # renyi: 1/(α−1)·log(p^α q^(1−α) + (1−p)^α (1−q)^(1−α)), evaluated in log space.
    if alpha == 1.0:
        raise ConfigError("the renyi ALM distance needs alpha != 1 (alpha = 1 is binary_kl)")
    hit = alpha * u + (1 - alpha) * v
    miss = alpha * log1mexp(u) + (1 - alpha) * log1mexp(v)
    return torch.logaddexp(hit, miss) / (alpha - 1)


# ---------------------------------------------------------------------------------------
# Student side: ℓ^S and σ^S from one pass over the logits
# ---------------------------------------------------------------------------------------


class _StudentPathFn(torch.autograd.Function):
    """Token log-probs and boundary log-mass of each row, without (R, V) autograd buffers.

    Forward and backward walk the rows in slabs and take one exp per logit each. Only the
    logits themselves (already alive as the model's output) and three numbers per row are
    saved. With p = softmax(z), the boundary mass is β = p·1_B (a matrix-vector product) and
    the gradient is g_tok·(onehot − p) + g_sig·(p·1_B/β − p). A boundary mass below e^-87 of
    the largest probability underflows to 0 in float32; σ then sits at the floor with zero
    gradient, which is harmless for a chunk that unlikely.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: Tensor, next_ids: Tensor, bmask: Tensor | None, vocab: int, rows: int
    ) -> tuple[Tensor, Tensor]:
        dtype = _compute_dtype(logits)
        n = logits.shape[0]
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        beta = torch.ones(n, dtype=dtype, device=logits.device)
        tok = torch.empty(n, dtype=dtype, device=logits.device)
        maskf = None if bmask is None else bmask.to(dtype)
        for s in range(0, n, rows):
            z = logits[s : s + rows, :vocab].to(dtype)  # (r, V)
            top = z.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
            e = (z - top).exp_()  # (r, V), the one exp of the forward pass
            total = e.sum(dim=-1)
            lse[s : s + rows] = top.squeeze(1) + total.log()
            tok[s : s + rows] = z.gather(1, next_ids[s : s + rows, None]).squeeze(1)
            if maskf is not None:
                beta[s : s + rows] = (e @ maskf) / total
        ctx.save_for_backward(logits, next_ids, maskf if maskf is not None else beta, lse, beta)
        ctx.has_mask = bmask is not None
        ctx.vocab, ctx.rows = vocab, rows
        return tok - lse, beta.log()

    @staticmethod
    def backward(ctx, g_tok: Tensor, g_sig: Tensor):  # type: ignore[override]
        logits, next_ids, maskf, lse, beta = ctx.saved_tensors
        vocab, rows = ctx.vocab, ctx.rows
        dtype = lse.dtype
        grad = torch.zeros_like(logits) if vocab < logits.shape[1] else torch.empty_like(logits)
        g_tok = g_tok.to(dtype)
        g_sig = g_sig.to(dtype) if ctx.has_mask else torch.zeros_like(g_tok)
        # Per row: grad = p·(a + b·1_B) + g_tok·onehot, a = −(g_tok + g_sig), b = g_sig/β.
        # β = 0 (empty boundary set or underflow) gives b = 0, not 0/0.
        a = -(g_tok + g_sig)
        b = torch.where(beta > 0, g_sig / beta.clamp(min=torch.finfo(dtype).tiny), 0.0)
        for s in range(0, logits.shape[0], rows):
            e = s + rows
            z = logits[s:e, :vocab].to(dtype)
            out = (z - lse[s:e, None]).exp_()  # (r, V) softmax, the one exp of the backward
            if ctx.has_mask:
                out.mul_(torch.addcmul(a[s:e, None], b[s:e, None], maskf[None, :]))
            else:
                out.mul_(a[s:e, None])
            out.scatter_add_(1, next_ids[s:e, None], g_tok[s:e, None])
            grad[s:e, :vocab] = out
        return grad, None, None, None, None


def student_path(
    logits: Tensor, ids: Tensor, boundary_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The student's realised-token log-probs ℓ^S and boundary log-mass σ^S (spec/ALM.md §4.1).

    ℓ^S_r = log softmax(z_{r−1})[s_r] for r ≥ 1 (row 0 = 0), and
    σ^S_r = min(0, LSE(z_r[B_S]) − LSE(z_r)), both clamped to ``[LOGPROB_FLOOR, 0]`` and
    differentiable. One pass over the logits in row slabs; the backward pass writes the
    (B, S, V) gradient directly, so no (B, S, V) float32 log-softmax is kept for autograd.

    Args:
        logits: (B, S, V') student logits, any float dtype (computed in float32). Columns at
            and beyond ``len(boundary_mask)`` are vocabulary padding and never enter a softmax.
        ids: (B, S) int student token ids; ids of padding rows may be anything (e.g. −100).
        boundary_mask: (V,) bool, the student's boundary tokens B_S (``ByteTokenizer.
            boundary_mask``); None skips σ^S (it is then all zeros) and uses all V' columns.

    Returns:
        ``(student_logprob, student_sigma)``, each (B, S) float32.

    Raises:
        DataError: ``boundary_mask`` is longer than the vocabulary of ``logits``.
    """
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise DataError(
            f"student_path needs (B, S, V) logits and (B, S) ids, got {tuple(logits.shape)} and {tuple(ids.shape)}"
        )
    bsz, seq, width = logits.shape
    vocab = width if boundary_mask is None else int(boundary_mask.numel())
    if vocab > width:
        raise DataError(
            f"the student's boundary mask covers {vocab} tokens but the logits have only {width} "
            "columns; pass the mask of the model's own tokenizer"
        )
    dtype = _compute_dtype(logits)
    if bsz * seq == 0:
        zero = logits.new_zeros((bsz, seq), dtype=dtype) + 0 * logits.sum().to(dtype)
        return zero, zero.clone()
    next_ids = torch.cat([ids[:, 1:], ids.new_zeros(bsz, 1)], dim=1).clamp(0, vocab - 1)
    bmask = (
        None if boundary_mask is None else boundary_mask.to(device=logits.device, dtype=torch.bool)
    )
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    tok, sig = _StudentPathFn.apply(
        logits.reshape(bsz * seq, width), next_ids.reshape(-1).long(), bmask, vocab, rows
    )
    tok = tok.view(bsz, seq)
    logprob = torch.cat([tok.new_zeros(bsz, 1), tok[:, :-1]], dim=1).clamp(LOGPROB_FLOOR, 0.0)
    sigma = sig.view(bsz, seq).clamp(LOGPROB_FLOOR, 0.0)
    return logprob, sigma


def teacher_sigma(boundary_logmass: Tensor, columns: Tensor | list[int] | None = None) -> Tensor:
    """σ^T per row: min(0, log Σ_k β^T_{r,k}) over the enabled class columns (spec/ALM.md §4.1).

    Args:
        boundary_logmass: (B, T, C) stored log-masses per boundary class (float16 is fine).
        columns: indices of the enabled classes (default: all columns).

    Returns:
        (B, T) float32, −inf-free (clamped to ``LOGPROB_FLOOR``).
    """
    x = boundary_logmass.float()
    if columns is not None:
        x = x[..., torch.as_tensor(columns, dtype=torch.long, device=x.device)]
    return (
        torch.logsumexp(x, dim=-1)
        .nan_to_num(nan=math.nan, neginf=LOGPROB_FLOOR)
        .clamp(LOGPROB_FLOOR, 0.0)
    )


# ---------------------------------------------------------------------------------------
# Chunk structure (data only) and the loss
# ---------------------------------------------------------------------------------------


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
    """Scored rows, chunk status, last rows and merged groups (spec/ALM.md §4.2 steps 1–5).

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
        sig_c = _clamp_logprob(targets.teacher_sigma.reshape(-1), torch.float32)[
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

    Data only (spec/ALM.md §4.2 step 8): sum it over the micro-batches of an optimizer step
    and all-reduce it over ranks *before* the forward passes, then pass the total to
    :func:`alm_loss` as ``normalizer``.
    """
    return int(alm_chunks(targets, merge=merge, merge_threshold=merge_threshold).num_groups)


def _chunk_sum(values: Tensor, weight: Tensor, index: Tensor, size: int) -> Tensor:
    src = torch.where(weight, values, torch.zeros_like(values))
    out = torch.zeros(size + 1, dtype=values.dtype, device=values.device).index_add(0, index, src)
    return out[:size].clamp(max=0.0)


def alm_loss(
    student_logprob: Tensor,
    student_sigma: Tensor,
    targets: ALMTargets,
    *,
    tau: float = 100.0,
    distance: Distance = "binary_ce",
    merge: bool = True,
    merge_threshold: float = 0.1,
    debias: bool = True,
    normalizer: int | float | Tensor | None = None,
    chunks: ALMChunks | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The ALM loss of one micro-batch (spec/ALM.md §4.2), normalised by N_global.

    Args:
        student_logprob: (B, S) ℓ^S from :func:`student_path`.
        student_sigma: (B, S) σ^S from :func:`student_path`.
        targets: teacher data and alignment.
        tau, distance: the distance of :func:`alm_distance`.
        merge: ``merge_by_space_prob`` with γ = ``merge_threshold``; off: every scored chunk
            is its own group.
        debias: ``append_space``: add the boundary log-mass at each group's last scored member.
        normalizer: N_global, the contributing groups of the whole optimizer step over all
            micro-batches and ranks (:func:`count_alm_groups`, summed and all-reduced). None
            uses this batch's own count. With N_global, summing the returned losses (and
            their gradients) over micro-batches and ranks gives the global-batch loss.
        chunks: the result of :func:`alm_chunks` for these targets, to skip recomputing it.

    Returns:
        ``(loss, stats)``: a 0-dim float32 loss (0 with zero gradient when nothing
        contributes) and detached 0-dim logging tensors (spec §4.2 step 9), among them
        ``alm_binary_kl`` (normalised like the loss), ``alm_groups`` (local count),
        ``alm_partial_chunks`` and ``alm_dropped_groups``.

    Raises:
        DataError: ``normalizer`` is 0 while this batch has contributing groups.
    """
    if chunks is None:
        chunks = alm_chunks(targets, merge=merge, merge_threshold=merge_threshold)
    dtype = _compute_dtype(student_logprob, student_sigma)
    size = chunks.contributes.numel()
    lt = _clamp_logprob(targets.teacher_logprob.reshape(-1), dtype)
    ls = _clamp_logprob(student_logprob.reshape(-1), dtype)
    st = _clamp_logprob(targets.teacher_sigma.reshape(-1), dtype)
    ss = _clamp_logprob(student_sigma.reshape(-1), dtype)
    # Step 2: chunk sums over scored rows (clamped ≤ 0).
    lc_t = _chunk_sum(lt, chunks.teacher_weight, chunks.teacher_index, size)
    lc_s = _chunk_sum(ls, chunks.student_weight, chunks.student_index, size)
    # Step 5: group sums over scored members.
    zero = torch.zeros(size, dtype=dtype, device=lt.device)
    lg_t = zero.index_add(0, chunks.group, torch.where(chunks.scored, lc_t, 0.0))
    lg_s = zero.index_add(0, chunks.group, torch.where(chunks.scored, lc_s, 0.0))
    # Steps 4 and 6: σ at λ of each group's last scored member.
    last = chunks.group_last.clamp(min=0)
    sg_t = st[chunks.teacher_last.clamp(min=0)][last]
    sg_s = ss[chunks.student_last.clamp(min=0)][last]
    lt_tilde = lg_t + sg_t if debias else lg_t
    ls_tilde = lg_s + sg_s if debias else lg_s
    # Steps 7–8.
    dist = alm_distance(lt_tilde, ls_tilde, tau=tau, kind=distance)
    contrib = chunks.contributes
    local = contrib.sum()
    if normalizer is None:
        denom = local.clamp(min=1).to(dtype)
    else:
        denom = torch.as_tensor(normalizer, dtype=dtype, device=lt.device)
        if float(denom) <= 0:
            if int(local):
                raise DataError(
                    f"alm_loss got normalizer={normalizer!r} but this batch has {int(local)} contributing "
                    "groups; pass the all-reduced count_alm_groups total of the optimizer step"
                )
            denom = torch.ones((), dtype=dtype, device=lt.device)
    loss = torch.where(contrib, dist, 0.0).sum() / denom
    with torch.no_grad():
        stats = _alm_stats(chunks, lt_tilde, ls_tilde, lg_t, lg_s, sg_t, tau, denom, local)
    return loss, stats


def _masked_stat(x: Tensor, mask: Tensor, how: str) -> Tensor:
    if how == "mean":
        return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)
    if x.numel() == 0:
        return x.new_zeros(())
    fill = math.inf if how == "min" else -math.inf
    y = torch.where(mask, x, fill)
    y = y.amin() if how == "min" else y.amax()
    return torch.where(mask.any(), y, torch.zeros_like(y))


def _alm_stats(
    chunks: ALMChunks,
    lt_tilde: Tensor,
    ls_tilde: Tensor,
    lg_t: Tensor,
    lg_s: Tensor,
    sg_t: Tensor,
    tau: float,
    denom: Tensor,
    local: Tensor,
) -> dict[str, Tensor]:
    """Logging quantities of spec/ALM.md §4.2 step 9 (detached, 0-dim float32)."""
    contrib = chunks.contributes
    scored = chunks.scored
    size = contrib.numel()
    ng_t = torch.zeros(size, dtype=torch.long, device=contrib.device).index_add_(
        0, chunks.group, torch.where(scored, chunks.teacher_count, 0)
    )
    ng_s = torch.zeros_like(ng_t).index_add_(
        0, chunks.group, torch.where(scored, chunks.student_count, 0)
    )
    bkl = alm_distance(lt_tilde, ls_tilde, tau=tau, kind="binary_kl")
    out = {
        "alm_groups": local.float(),
        "alm_normalizer": denom.float(),
        "alm_binary_kl": (torch.where(contrib, bkl, 0.0).sum() / denom).float(),
        "alm_chunk_len_teacher": _masked_stat(chunks.teacher_count.float(), scored, "mean"),
        "alm_chunk_len_student": _masked_stat(chunks.student_count.float(), scored, "mean"),
        "alm_group_len_teacher": _masked_stat(ng_t.float(), contrib, "mean"),
        "alm_group_len_student": _masked_stat(ng_s.float(), contrib, "mean"),
        "alm_abs_dlogprob": _masked_stat((lg_t - lg_s).abs().float(), contrib, "mean"),
        "alm_sigma_teacher_min": _masked_stat(sg_t.float(), contrib, "min"),
        "alm_partial_chunks": chunks.partial.sum().float(),
        "alm_dropped_groups": chunks.dropped.sum().float(),
    }
    for side, val in (("teacher", lt_tilde), ("student", ls_tilde)):
        for how in ("min", "mean", "max"):
            out[f"alm_logprob_{side}_{how}"] = _masked_stat(val.float(), contrib, how)
    return out
