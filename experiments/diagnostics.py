"""Where does a student miss its teacher? ALM's own quantities on held-out text.

For a trained (or untrained) student and a store of the teacher on held-out text, every
merged group that ALM compares (unconstrained chunks merged where the teacher's
boundary probability is at most γ = 0.1, exactly as the loss merges them) gives

* L^T, L^S: the group's log-likelihood under teacher and student (nats);
* σ^T, σ^S: the log-probability that a boundary token follows (the debiasing term);
* the gap L^S − L^T, raw and debiased ((L^S + σ^S) − (L^T + σ^T)).

Reported: the gap by bucket of the teacher's group log-likelihood L^T (does the student
miss on likely or on unlikely text?), the mean σ^S − σ^T (does the student put its
boundary mass where the teacher does?), and the share of groups the loss drops because a
member chunk is only partly scored. These are reported as measured, not tuned.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xtd.config import ALMSettings, DataSettings
from xtd.data_plan import StepPlan
from xtd.losses import ALMTargets, alm_chunks, student_path
from xtd.losses.registry import loss_specs
from xtd.objective import student_forward
from xtd.storage import open_store
from xtd.tokenization import BOUNDARY_CLASSES
from xtd.train_data import StepDataset, TrainData

__all__ = ["BUCKETS", "group_values", "alm_diagnostics"]

BUCKETS = (0.0, -0.5, -1.0, -2.0, -4.0, -8.0, -float("inf"))
"""Edges of the teacher group log-likelihood buckets (nats): (−0.5, 0], (−1, −0.5], …"""


def _clamp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, torch.nan_to_num(x.float(), nan=0.0).clamp(max=0.0), 0.0)


def group_values(
    student_logprob: torch.Tensor, student_sigma: torch.Tensor, targets: Any, *, merge_threshold: float = 0.1
) -> dict[str, np.ndarray | int]:
    """Per contributing group: L^T, L^S, σ^T, σ^S (float64 arrays), plus group counts.

    The same grouping and sums as :func:`xtd.losses.alm_loss` (merge on, γ = ``merge_threshold``).
    """
    chunks = alm_chunks(targets, merge=True, merge_threshold=merge_threshold)
    size = chunks.contributes.numel()
    lt = _clamp(targets.teacher_logprob.reshape(-1), chunks.teacher_weight)
    ls = _clamp(student_logprob.reshape(-1), chunks.student_weight)
    zeros = torch.zeros(size + 1, dtype=torch.float32)
    lc_t = zeros.index_add(0, chunks.teacher_index, lt)[:size].clamp(max=0.0)
    lc_s = zeros.index_add(0, chunks.student_index, ls)[:size].clamp(max=0.0)
    lg_t = torch.zeros(size).index_add(0, chunks.group, torch.where(chunks.scored, lc_t, 0.0))
    lg_s = torch.zeros(size).index_add(0, chunks.group, torch.where(chunks.scored, lc_s, 0.0))
    last = chunks.group_last.clamp(min=0)
    st = torch.nan_to_num(targets.teacher_sigma.reshape(-1).float(), nan=0.0).clamp(max=0.0)
    ss = student_sigma.reshape(-1).float().clamp(max=0.0)
    sg_t = st[chunks.teacher_last.clamp(min=0)][last]
    sg_s = ss[chunks.student_last.clamp(min=0)][last]
    keep = chunks.contributes
    return {
        "teacher_logprob": lg_t[keep].double().numpy(),
        "student_logprob": lg_s[keep].double().numpy(),
        "teacher_sigma": sg_t[keep].double().numpy(),
        "student_sigma": sg_s[keep].double().numpy(),
        "contributing": int(keep.sum()),
        "dropped": int(chunks.dropped.sum()),
        "partial_chunks": int(chunks.partial.sum()),
        "chunks": int((chunks.scored | chunks.partial).sum()),
    }


@torch.no_grad()
def alm_diagnostics(model_dir: str | Path, store: str | Path, *, max_length: int, merge_threshold: float = 0.1) -> dict[str, Any]:
    """ALM's group quantities of the model in ``model_dir`` over every document of ``store``."""
    from xtd.student import load_causal_lm, model_tokenizer

    model = load_causal_lm(str(model_dir)).eval()
    tokenizer = model_tokenizer(str(model_dir))
    reader = open_store(str(store))
    spec = TrainData(
        stores=(str(store),), student_tokenizer=tokenizer, plan=StepPlan((len(reader),), len(reader)),
        data=DataSettings(batch_size=len(reader), max_student_length=max_length, long_documents="truncate"),
        alm=ALMSettings(boundary_classes=tuple(BOUNDARY_CLASSES), merge_threshold=merge_threshold),
        losses=loss_specs(("alm",)), micro_batch_size=16,
    )
    mask = torch.as_tensor(tokenizer.boundary_mask(tuple(BOUNDARY_CLASSES)), dtype=torch.bool)
    parts: list[dict[str, Any]] = []
    for batch in StepDataset(spec)[0]["micro_batches"]:
        logits, _ = student_forward(model, batch)
        logprob, sigma = student_path(logits, batch["input_ids"], mask)
        parts.append(group_values(logprob, sigma, ALMTargets.from_batch(batch), merge_threshold=merge_threshold))
    del model
    gc.collect()
    return summarise_groups(parts)


def summarise_groups(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Gap by bucket of L^T, mean σ^S − σ^T and the dropped share, over all micro-batches."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("teacher_logprob", "student_logprob", "teacher_sigma", "student_sigma")}
    counts = {k: sum(p[k] for p in parts) for k in ("contributing", "dropped", "partial_chunks", "chunks")}
    lt, ls, st, ss = cat["teacher_logprob"], cat["student_logprob"], cat["teacher_sigma"], cat["student_sigma"]
    raw, debiased = ls - lt, (ls + ss) - (lt + st)
    buckets = []
    for hi, lo in zip(BUCKETS[:-1], BUCKETS[1:], strict=True):
        sel = (lt <= hi) & (lt > lo)
        n = int(sel.sum())
        buckets.append({
            "teacher_logprob": f"({lo:g}, {hi:g}]",
            "groups": n,
            "share": n / max(len(lt), 1),
            "mean_gap": float(raw[sel].mean()) if n else None,
            "mean_abs_gap": float(np.abs(raw[sel]).mean()) if n else None,
            "mean_gap_debiased": float(debiased[sel].mean()) if n else None,
        })
    groups = counts["contributing"] + counts["dropped"]
    return {
        "groups": counts["contributing"],
        "dropped_share": counts["dropped"] / groups if groups else None,
        "partial_chunk_share": counts["partial_chunks"] / counts["chunks"] if counts["chunks"] else None,
        "mean_gap": float(raw.mean()),
        "mean_abs_gap": float(np.abs(raw).mean()),
        "mean_gap_debiased": float(debiased.mean()),
        "mean_abs_gap_debiased": float(np.abs(debiased).mean()),
        "mean_sigma_gap": float((ss - st).mean()),
        "mean_abs_sigma_gap": float(np.abs(ss - st).mean()),
        "buckets": buckets,
    }
