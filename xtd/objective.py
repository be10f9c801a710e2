"""What one training step optimises: the loss terms of a micro-batch and their combination.

:func:`compute_losses` runs the student's forward pass on one padded micro-batch
(:class:`xtd.batching.StepDataset`) and returns every chosen loss of :mod:`xtd.losses`,
each a sum divided by its global count; :func:`combine_terms` weights them, by GradMag
(spec/ALM.md §4.5) or fixed weights. :func:`mined_setup` and :func:`latents_projection`
build the per-run inputs that two of the losses need. :mod:`xtd.train` drives the loop.

Dimension letters: ``B`` texts, ``S`` student tokens, ``T`` teacher rows, ``V`` vocab.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from xtd.batching import alm_targets
from xtd.config import flag
from xtd.errors import ConfigError, TokenizerMismatchError

__all__ = [
    "LossSetup",
    "compute_losses",
    "combine_terms",
    "trainable_last_block",
    "latents_projection",
    "mined_setup",
    "TOPK_LOSSES",
]

TOPK_LOSSES = ("kd", "uld", "mined")
"""Losses that need the teacher's stored top-k."""


@dataclass(frozen=True)
class LossSetup:
    """Static inputs of :func:`compute_losses` (built once per run).

    Attributes:
        names: the chosen losses.
        student_boundary_mask: (V,) bool, B_S of spec §4.1; its length is the real vocabulary.
        tau, distance, merge, merge_threshold, debias: ALM settings (spec §4.2).
        amp: bf16 autocast on CUDA.
        mined_map: (V,) long student → teacher id map (``mined`` only).
        teacher_vocab_size: V_T (``mined`` only).
        latents_projection: H_S → H_T map when the hidden sizes differ (``latents`` only).
    """

    names: tuple[str, ...]
    student_boundary_mask: torch.Tensor
    tau: float = 100.0
    distance: str = "binary_ce"
    merge: bool = True
    merge_threshold: float = 0.1
    debias: bool = True
    amp: bool = False
    mined_map: torch.Tensor | None = None
    teacher_vocab_size: int | None = None
    latents_projection: torch.nn.Module | None = None


def compute_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], setup: LossSetup, normalizers: dict[str, float]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Forward one micro-batch and return each loss term, divided by its global count.

    Args:
        model: the student (a causal LM returning ``.logits`` (B, S, V')).
        batch: a padded micro-batch from :class:`xtd.batching.StepDataset`, on the model's device.
        setup: which losses and their settings.
        normalizers: global count per loss (:func:`xtd.batching.count_normalizers`, summed
            over the step's micro-batches and all ranks).

    Returns:
        (terms, stats): 0-dim float32 tensors with gradients, and float statistics for the log.
    """
    from xtd import losses as L

    names = setup.names
    device_type = batch["input_ids"].device.type
    autocast = (
        torch.autocast(device_type, dtype=torch.bfloat16) if setup.amp and device_type == "cuda" else nullcontext()
    )
    with autocast:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"].long(),
            output_hidden_states="latents" in names,
        )
    logits = out.logits  # (B, S, V'); the losses compute in fp32 (spec §4.1)
    vocab = int(setup.student_boundary_mask.numel())
    ids = batch["input_ids"]
    terms: dict[str, torch.Tensor] = {}
    stats: dict[str, float] = {}
    targets = alm_targets(batch) if any(n in names for n in ("alm", "uld", "mined", "latents")) else None
    chunks = None
    if any(n in names for n in ("uld", "mined", "latents")):
        chunks = L.alm_chunks(targets, merge=False)
    student_logprob = student_sigma = None
    if any(n in names for n in ("alm", "sft", "mined")):
        student_logprob, student_sigma = L.student_path(logits, ids, setup.student_boundary_mask)
    if "alm" in names:
        terms["alm"], alm_stats = L.alm_loss(
            student_logprob,
            student_sigma,
            targets,
            tau=setup.tau,
            distance=setup.distance,
            merge=setup.merge,
            merge_threshold=setup.merge_threshold,
            debias=setup.debias,
            normalizer=normalizers["alm"],
        )
        stats.update({k: float(v) for k, v in alm_stats.items() if _is_number(v)})
    if "sft" in names:
        terms["sft"] = L.sft_loss(student_logprob, batch["sft_mask"], normalizer=normalizers["sft"])
    if "kd" in names:
        terms["kd"] = L.kd_topk_loss(
            logits,
            batch["teacher_topk_ids"],
            batch["teacher_topk_logprobs"],
            batch["teacher_tail_logmass"],
            batch["sft_mask"],
            normalizer=normalizers["kd"],
            vocab_size=vocab,
        )
    if "uld" in names:
        terms["uld"] = L.uld_loss(
            logits,
            targets,
            batch["teacher_topk_logprobs"],
            batch["teacher_tail_logmass"],
            normalizer=normalizers["uld"],
            chunks=chunks,
            vocab_size=vocab,
        )
    if "mined" in names:
        terms["mined"] = L.mined_loss(
            logits,
            student_logprob,
            targets,
            batch["teacher_topk_ids"],
            batch["teacher_topk_logprobs"],
            batch["teacher_tail_logmass"],
            setup.mined_map,
            teacher_vocab_size=int(setup.teacher_vocab_size or 0),
            normalizer=normalizers["mined"],
            chunks=chunks,
            vocab_size=vocab,
        )
    if "latents" in names:
        terms["latents"] = L.latents_loss(
            out.hidden_states[-1],
            batch["teacher_hidden"],
            targets,
            projection=setup.latents_projection,
            normalizer=normalizers["latents"],
            chunks=chunks,
        )
    return terms, stats


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)


def combine_terms(
    terms: dict[str, torch.Tensor],
    weights: dict[str, float],
    last_block: list[torch.nn.Parameter],
    counts: dict[str, int],
) -> tuple[torch.Tensor, dict[str, float]]:
    """The micro-batch objective: GradMag-weighted (spec §4.5) or fixed-weighted sum of terms.

    A term with nothing to score in this micro-batch (local count 0) is left out: its
    gradient is zero, and GradMag's 1/‖G‖ would otherwise swamp the other terms.
    """
    live = {n: t for n, t in terms.items() if t.requires_grad and counts.get(n, 1) > 0}
    if not live:
        return next(iter(terms.values())) * 0.0, {}
    if last_block and len(live) > 1:
        from xtd.losses import gradmag_weights

        gm = gradmag_weights(live, last_block)
        return sum(gm[n] * live[n] for n in live), {n: float(gm[n]) for n in live}
    return sum(weights[n] * live[n] for n in live), {}


def trainable_last_block(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of the last decoder block (GradMag's gradient norms)."""
    from xtd.losses import last_block_parameters

    return [p for p in last_block_parameters(model) if p.requires_grad]


def latents_projection(names: tuple[str, ...], readers: list[Any], model: torch.nn.Module) -> torch.nn.Module | None:
    """A trained H_S → H_T linear map when ``latents`` compares hidden states of different sizes."""
    if "latents" not in names:
        return None
    teacher_size = int(readers[0].hidden_size)
    student_size = int(model.config.hidden_size)
    if any(int(r.hidden_size) != teacher_size for r in readers):
        raise ConfigError(f"{flag('losses')} latents needs stores of one hidden size; the --store values differ")
    if student_size == teacher_size:
        return None
    from xtd.losses import make_latent_projection

    return make_latent_projection(student_size, teacher_size)


def mined_setup(names: tuple[str, ...], readers: list[Any], student_tokenizer: Any, device: torch.device) -> dict[str, Any]:
    """The MinED student → teacher id map (spec §5), built once per tokenizer pair and cached
    under :func:`xtd.assets.cache_dir` (≈ 30 s for two 50k vocabularies)."""
    if "mined" not in names:
        return {}
    from xtd.assets import cache_dir
    from xtd.losses import build_mined_map
    from xtd.tokenization import tokenizer_from_json

    teachers = {r.tokenizer_json for r in readers}
    if len(teachers) > 1:
        raise TokenizerMismatchError(f"{flag('losses')} mined needs every --store to share one teacher tokenizer")
    teacher = tokenizer_from_json(teachers.pop())
    mined_map = torch.as_tensor(build_mined_map(
        teacher.token_bytes, student_tokenizer.token_bytes, cache_path=cache_dir() / "mined"
    ), dtype=torch.long, device=device)
    return {"mined_map": mined_map, "teacher_vocab_size": teacher.vocab_size}
