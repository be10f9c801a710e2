"""Hidden-state loss at chunk ends (``alm_latents``, docs/method.md, "Hidden-state loss").

Dimension letters: ``B`` batch, ``T`` teacher rows, ``S`` student rows, ``H`` hidden size.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from xtd.errors import ConfigError, DataError
from xtd.losses._alm import ALMChunks, ALMTargets, _compute_dtype, alm_chunks

__all__ = ["LATENT_KINDS", "count_scored_chunks", "latents_loss", "make_latent_projection"]

LATENT_KINDS = ("l2_channelwise", "l2", "l1", "l1_channelwise")
LatentKind = Literal["l2_channelwise", "l2", "l1", "l1_channelwise"]


def count_scored_chunks(targets: ALMTargets) -> int:
    """Scored chunks of a micro-batch: the local share of N_valid for :func:`latents_loss`
    and of the position count of :func:`xtd.losses.uld_loss` (data only; all-reduce it)."""
    return int(alm_chunks(targets, merge=False).scored.sum())


def make_latent_projection(student_hidden_size: int, teacher_hidden_size: int) -> nn.Module:
    """The optional trained map d_S → d_T (``latents_do_project``, off by default, docs/method.md, "Hidden-state loss").

    A bias-free linear layer; identity-initialised when the sizes agree, so turning it on
    for self-distillation starts from the unprojected loss.
    """
    proj = nn.Linear(student_hidden_size, teacher_hidden_size, bias=False)
    if student_hidden_size == teacher_hidden_size:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(teacher_hidden_size))
    return proj


def latents_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    targets: ALMTargets,
    *,
    kind: LatentKind = "l2_channelwise",
    projection: nn.Module | None = None,
    normalizer: int | float | Tensor | None = None,
    chunks: ALMChunks | None = None,
) -> Tensor:
    """Distance of the final hidden states (after the final norm) at each scored chunk's last token.

    Only *scored* chunks count (every token in the loss mask, row ≥ 1 on both sides), so
    the loss mask applies and the row-0 chunk is excluded (the reference does neither,
    docs/method.md, "Deviations from the reference implementation"). ``l2_channelwise``:
    (1/N)·Σ_c (1/H)·Σ_k (h^S_{c,k} − h^T_{c,k})² / (μ_k + 1e-8), μ_k = mean_c (h^T_{c,k})².
    ``l2`` uses the scalar μ = mean over c and k; ``l1`` / ``l1_channelwise`` use |·| and
    the mean |h^T| in place of the square. μ is taken over this micro-batch's chunks.

    Args:
        student_hidden: (B, S, H_S) student hidden states, any float dtype.
        teacher_hidden: (B, T, H_T) stored teacher hidden states (float16 is fine).
        targets: alignment and loss masks (the teacher log-probs are not used).
        kind: one of :data:`LATENT_KINDS`.
        projection: maps H_S → H_T (:func:`make_latent_projection`); required when they differ.
        normalizer: N_valid over the optimizer step (:func:`count_scored_chunks`, all-reduced);
            None uses this batch's count.
        chunks: precomputed :func:`xtd.losses.alm_chunks` of ``targets``.

    Returns:
        0-dim float32 loss (0 with zero gradient when no chunk is scored).

    Raises:
        ConfigError: unknown ``kind``, or hidden sizes differ without a projection.
    """
    if kind not in LATENT_KINDS:
        raise ConfigError(f"unknown latents loss {kind!r}; choose one of {', '.join(LATENT_KINDS)}")
    if chunks is None:
        chunks = alm_chunks(targets, merge=False)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if (
        student_hidden.shape[:2] != targets.student_chunk.shape
        or teacher_hidden.shape[:2] != targets.teacher_chunk.shape
    ):
        raise DataError(
            f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} do not match "
            f"the chunk ids {tuple(targets.student_chunk.shape)} / {tuple(targets.teacher_chunk.shape)}"
        )
    sel = chunks.scored.nonzero().squeeze(1)
    dtype = _compute_dtype(student_hidden)
    hs = h_s[chunks.student_last[sel]].to(dtype)  # (N, H_S)
    if projection is not None:
        weight = next(projection.parameters(), None)
        hs = projection(hs if weight is None else hs.to(weight.dtype)).to(dtype)
    ht = h_t[chunks.teacher_last[sel]].to(dtype)  # (N, H_T)
    if hs.shape[-1] != ht.shape[-1]:
        raise ConfigError(
            f"student hidden size {hs.shape[-1]} differs from the teacher's {ht.shape[-1]}; "
            "pass projection=make_latent_projection(...) (--latents-project)"
        )
    local = sel.numel()
    denom = float(normalizer) if normalizer is not None else float(max(local, 1))
    if local == 0:
        return student_hidden.to(dtype).sum() * 0.0
    diff = hs - ht
    if kind.startswith("l2"):
        err, ref = diff.square(), ht.square()
    else:
        err, ref = diff.abs(), ht.abs()
    scale = ref.mean(dim=0) if kind.endswith("channelwise") else ref.mean()
    per_chunk = (err / (scale.detach() + 1e-8)).mean(dim=-1)  # (N,)
    return per_chunk.sum() / max(denom, 1.0)
