"""Approximate Likelihood Matching: chunk log-likelihoods, merging, debiasing, distances.

Dimension letters: ``B`` batch, ``T`` teacher tokens, ``S`` student tokens, ``C`` chunks
per example (padded), ``V`` vocabulary. Chunk membership is given by index arrays
(token → chunk id, −1 for none, docs/method.md, "Chunks"); chunk sums use ``index_add`` over
flattened (example, chunk) slots and last rows use ``scatter_reduce(amax)``, so no dense
[B, L, C] matrix is ever built. All arithmetic runs in float32 (float64 inputs stay
float64, for ``gradcheck``); log-probabilities are clamped to ``[LOGPROB_FLOOR, 0]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from xtd.config.train import ALM_DISTANCES
from xtd.errors import ConfigError, DataError
from xtd.losses._chunks import (
    LOGPROB_FLOOR,
    ALMChunks,
    ALMTargets,
    alm_chunks,
    clamp_logprob,
    count_alm_groups,
)

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

Distance = str
"""One of :data:`ALM_DISTANCES` (listed with the settings, :mod:`xtd.config.train`)."""

_LN2 = math.log(2.0)
_CHUNK_ELEMENTS = 1 << 23  # rows × vocab per slab in student_path: 32 MB of fp32 temporaries


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32 (bf16/fp16 are cast up)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, stable at both ends (docs/method.md, "The distance").

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

    With a = clamp(L̃^T), b = clamp(L̃^S), u = a/τ − ε and v = b/τ − ε (docs/method.md, "The distance"):

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
    a = clamp_logprob(teacher_logp, dtype)
    b = clamp_logprob(student_logp, dtype)
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
    """The student's realised-token log-probs ℓ^S and boundary log-mass σ^S (docs/method.md, "Debiasing").

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


def teacher_sigma(boundary_logmass: np.ndarray, columns: Sequence[int] | None = None) -> np.ndarray:
    """σ^T per row: min(0, log Σ_k β^T_{r,k}) over the enabled class columns (docs/method.md,
    "Debiasing").

    Computed on the stored arrays in the data path (numpy, in the loader's workers), once
    per example; the loss reads the result from the batch as ``teacher_sigma``.

    Args:
        boundary_logmass: (..., C) stored log-masses per boundary class (float16 is fine),
            −inf where a class has no mass.
        columns: indices of the enabled classes (default: all columns).

    Returns:
        (...,) float32 in ``[LOGPROB_FLOOR, 0]``: ``LOGPROB_FLOOR`` where every enabled class
        has zero mass (or none is enabled).
    """
    x = np.asarray(boundary_logmass, dtype=np.float32)
    if columns is not None:
        x = x[..., list(columns)]
    if x.shape[-1] == 0:
        return np.full(x.shape[:-1], LOGPROB_FLOOR, dtype=np.float32)
    peak = np.max(x, axis=-1)
    safe = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        out = safe + np.log(np.sum(np.exp(x - safe[..., None]), axis=-1))
    out = np.where(np.isfinite(peak), out, LOGPROB_FLOOR)  # every class empty: the floor, not NaN
    return np.clip(out, LOGPROB_FLOOR, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------


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
    """The ALM loss of one micro-batch (docs/method.md, "Normalisation"), normalised by N_global.

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
        contributes) and detached 0-dim logging tensors (docs/method.md, "Scoring a chunk"), among them
        ``alm_binary_kl`` (normalised like the loss), ``alm_groups`` (local count),
        ``alm_partial_chunks`` and ``alm_dropped_groups``.

    Raises:
        DataError: ``normalizer`` is 0 while this batch has contributing groups.
    """
    if chunks is None:
        chunks = alm_chunks(targets, merge=merge, merge_threshold=merge_threshold)
    dtype = _compute_dtype(student_logprob, student_sigma)
    size = chunks.contributes.numel()
    lt = clamp_logprob(targets.teacher_logprob.reshape(-1), dtype)
    ls = clamp_logprob(student_logprob.reshape(-1), dtype)
    st = clamp_logprob(targets.teacher_sigma.reshape(-1), dtype)
    ss = clamp_logprob(student_sigma.reshape(-1), dtype)
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
    """Logging quantities of docs/method.md, "Scoring a chunk" (detached, 0-dim float32)."""
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
