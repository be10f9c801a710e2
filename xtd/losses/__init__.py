"""Losses of xtd: ALM (debiased, boundary-merged), hidden states, SFT, KD, ULD, MinED, GradMag.

Pure torch functions over batch-padded tensors and chunk-index arrays (docs/method.md,
"Chunks" to "Baselines"): no file access, no models. Every loss takes a ``normalizer`` (a global count over
the micro-batches and ranks of an optimizer step, from the matching data-only ``count_*``
function), so summed micro-batch losses equal the loss of the whole global batch.

Typical ALM + SFT step (per micro-batch)::

    chunks = alm_chunks(targets)                       # data only, before the forward
    n_alm = all_reduce(sum of chunks.num_groups)       # over micro-batches and ranks
    logprob, sigma = student_path(logits, ids, boundary_mask)
    alm, stats = alm_loss(logprob, sigma, targets, normalizer=n_alm, chunks=chunks)
    sft = sft_loss(logprob, loss_mask, normalizer=n_sft)

Without (B, S, V) logits: the same ℓ^S and σ^S from the final hidden states and the
output layer, in row slabs (``_fused``; ``xtd.model_parts`` reads both from a model)::

    logprob, sigma = fused_student_path(hidden, layer, ids, boundary_mask)
"""

from __future__ import annotations

from xtd.losses._alm import (
    ALM_DISTANCES,
    LOGPROB_FLOOR,
    ALMChunks,
    ALMTargets,
    alm_chunks,
    alm_distance,
    alm_loss,
    count_alm_groups,
    log1mexp,
    student_path,
    teacher_sigma,
)
from xtd.losses._baselines import (
    count_kd_rows,
    count_mined_terms,
    count_sft_tokens,
    kd_topk_loss,
    kd_topk_loss_from_logprob,
    mined_loss,
    one_to_one_chunks,
    sft_loss,
    uld_loss,
    uld_loss_from_topk,
    uld_rows,
)
from xtd.losses._fused import (
    FUSED_CHUNK_ELEMENTS,
    FusedOutputs,
    OutputLayer,
    fused_output,
    fused_student_path,
)
from xtd.losses._gradmag import combine_losses, gradmag_weights
from xtd.losses._latents import (
    LATENT_KINDS,
    count_scored_chunks,
    latents_loss,
    make_latent_projection,
)
from xtd.losses._mined_map import build_mined_map, tokenizer_bytes_digest

__all__ = [
    "ALM_DISTANCES",
    "FUSED_CHUNK_ELEMENTS",
    "LATENT_KINDS",
    "LOGPROB_FLOOR",
    "ALMChunks",
    "ALMTargets",
    "FusedOutputs",
    "OutputLayer",
    "alm_chunks",
    "alm_distance",
    "alm_loss",
    "build_mined_map",
    "combine_losses",
    "count_alm_groups",
    "count_kd_rows",
    "count_mined_terms",
    "count_scored_chunks",
    "count_sft_tokens",
    "fused_output",
    "fused_student_path",
    "gradmag_weights",
    "kd_topk_loss",
    "kd_topk_loss_from_logprob",
    "latents_loss",
    "log1mexp",
    "make_latent_projection",
    "mined_loss",
    "one_to_one_chunks",
    "sft_loss",
    "student_path",
    "teacher_sigma",
    "tokenizer_bytes_digest",
    "uld_loss",
    "uld_loss_from_topk",
    "uld_rows",
]
