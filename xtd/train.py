"""Train a student of any tokenizer from teacher shards: ``xtd train`` and :func:`train`.

Read top to bottom, :func:`_run` is the whole recipe (in the spirit of nanoGPT's
``train.py``): checks → run folder → student → optimizer → resume → data → loop →
save. Everything the loop needs per step sits in small functions above it.

Dimension letters: ``B`` texts, ``S`` student tokens, ``T`` teacher rows, ``V`` vocab.

Normalisation (spec/ALM.md §4.2 step 8, §4.4): the ALM group count and the SFT token
count are data-only, so each step first sums them over its micro-batches and
all-reduces them across ranks; every micro-batch loss is then a *sum* divided by
those global counts, and the step's gradient is the sum of the micro-batch
gradients (accumulated locally, then all-reduced once per step). The step's loss is
therefore the same for any split into ranks and micro-batches.

Data parallelism: under ``torchrun`` (``WORLD_SIZE`` > 1) each rank reads its own
share of every step's texts; gradients are summed with one ``all_reduce`` per step
rather than through a ``DistributedDataParallel`` wrapper, because GradMag calls
``torch.autograd.grad`` on the last block inside the step, which DDP's bucket hooks
do not expect. The maths is that of DDP with ``no_sync`` accumulation.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from xtd.batching import DataSpec, Pieces, StepDataset, StepPlan, estimate_piece_rows
from xtd.checkpoint import (
    METRICS_FILE,
    append_metrics,
    apply_checkpoint,
    finish_run_folder,
    inspect_run_folder,
    latest_checkpoint,
    load_checkpoint,
    prepare_run_folder,
    prune_checkpoints,
    save_checkpoint,
    save_model_into,
    trainable_parameters,
    truncate_metrics,
)
from xtd.config import TrainConfig, flag
from xtd.errors import ConfigError, StoreFormatError, TokenizerMismatchError
from xtd.model_parts import last_block_parameters
from xtd.objective import (
    TOPK_LOSSES,
    LossSetup,
    combine_terms,
    compute_losses,
    latents_projection,
    mined_setup,
)
from xtd.outputs import read_run_marker
from xtd.runtime import resolve_device

logger = logging.getLogger(__name__)

__all__ = ["train", "TrainResult", "lr_at", "check_inputs"]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        out: the saved Hugging Face folder.
        steps: optimizer steps taken in total (including those before a resume).
        tokens: student tokens trained on (all ranks, padding excluded).
        losses: the last step's loss terms (``loss`` = weighted sum), empty if no step ran.
        history: one metrics record per logged step of this process's run.
        nothing_to_do: ``--out`` already held this finished run; nothing was trained.
    """

    out: Path
    steps: int
    tokens: int
    losses: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    nothing_to_do: bool = False


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, schedule: str = "linear") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then decay to 0.

    Steps ``0 .. warmup_steps − 1`` ramp linearly to ``lr`` (reached at the last
    warm-up step); the remaining steps decay linearly or by a half cosine towards 0
    at ``max_steps`` (spec/ALM.md §4.6).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)


# --------------------------------------------------------------------------------------
# Checks before training (one clear line each)
# --------------------------------------------------------------------------------------


def check_inputs(config: TrainConfig, readers: list[Any], student_tokenizer: Any) -> None:
    """Raise before any training if the stores cannot serve the chosen losses.

    Raises:
        StoreFormatError: an unfinished store; a loss that needs top-k or hidden states
            from a store without them; a boundary class the store does not hold.
        TokenizerMismatchError: ``kd`` with a student tokenizer other than the store's,
            or an ``xtd align --cache`` made for another student tokenizer.
    """
    losses = config.loss_names()
    for url, reader in zip(config.store, readers, strict=True):
        if not reader.complete:
            raise StoreFormatError(
                f"store {url!r} is unfinished ({len(reader)} documents committed); rerun the same "
                "xtd precompute command to finish it, then train"
            )
        missing = [c for c in config.boundary_classes if c not in tuple(reader.boundary_classes)]
        if missing and "alm" in losses:
            raise StoreFormatError(
                f"store {url!r} holds no boundary mass for {', '.join(missing)} (it has "
                f"{', '.join(reader.boundary_classes)}); drop them from {flag('boundary_classes')}"
            )
        topk_losses = [n for n in losses if n in TOPK_LOSSES]
        if topk_losses and not reader.top_k:
            raise StoreFormatError(
                f"{flag('losses')} {'+'.join(topk_losses)} needs teacher top-k log-probs, but store "
                f"{url!r} has none; re-run xtd precompute with --top-k 64 or drop {'+'.join(topk_losses)}"
            )
        if "latents" in losses and not reader.hidden_size:
            raise StoreFormatError(
                f"{flag('losses')} latents needs teacher hidden states, but store {url!r} has none; "
                "re-run xtd precompute with --hidden or drop latents"
            )
        if "kd" in losses:
            from xtd.tokenization import tokenizer_from_json

            teacher_digest = tokenizer_from_json(reader.tokenizer_json).digest
            if teacher_digest != student_tokenizer.digest:
                raise TokenizerMismatchError(
                    f"{flag('losses')} kd needs the student to use the teacher's tokenizer, but store "
                    f"{url!r} has tokenizer {teacher_digest} and the student {student_tokenizer.digest}; "
                    "use alm (any tokenizer) instead of kd"
                )
        _check_alignment_cache(url, reader, student_tokenizer)


def _check_alignment_cache(url: str, reader: Any, student_tokenizer: Any) -> None:
    caches = _alignment_cache_digests(url)
    if caches and student_tokenizer.digest not in caches:
        raise TokenizerMismatchError(
            f"store {url!r} holds cached alignments only for student tokenizer(s) "
            f"{', '.join(sorted(caches))}, not for this student's {student_tokenizer.digest}; run "
            f"`xtd align --cache {url}` with this student's tokenizer, or use the tokenizer the cache was made for"
        )


def _alignment_cache_digests(url: str) -> list[str]:
    from xtd.storage import list_alignments

    return list_alignments(url)


def _usable_cache(url: str, reader: Any, digest: str, config: TrainConfig) -> str | None:
    """The cache digest to read for ``url``, when it fits this run (unconstrained chunks)."""
    if config.alm_chunks != "unconstrained" or digest not in _alignment_cache_digests(url):
        return None
    from xtd.storage import read_alignment

    cache = read_alignment(url, digest)
    needed = {"student_ids", "student_spans", "student_chunk", "teacher_chunk"}
    if not needed <= set(cache.names):
        logger.warning("alignment cache %s of %s lacks %s; aligning on the fly", digest, url, sorted(needed - set(cache.names)))
        return None
    if len(cache) != len(reader):  # the store was extended after `xtd align --cache`
        logger.warning(
            "alignment cache %s of %s covers %d of the store's %d documents; aligning on the fly "
            "(rerun xtd align --cache to refresh it)", digest, url, len(cache), len(reader),
        )
        return None
    return digest


# --------------------------------------------------------------------------------------
# Distributed context, metrics (checkpoints: xtd.checkpoint)
# --------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: str) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        owns = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
            owns = True
        if dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank=rank, world_size=world, device=dev, owns_group=owns)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (float64, so counts stay exact)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _format_line(record: dict[str, Any], terms: tuple[str, ...]) -> str:
    parts = ", ".join(f"{n} {record[n]:.3f}" for n in terms if n in record)
    rate = record["tokens_per_s"]
    rate_s = f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"
    return (
        f"step {record['step']}/{record['max_steps']} | loss {record['loss']:.3f}"
        + (f" ({parts})" if len(terms) > 1 else "")
        + f" | lr {record['lr']:.1e} | {rate_s} tok/s"
    )


# --------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------


def train(config: TrainConfig, *, progress: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a student from teacher shards and save it as a Hugging Face folder.

    Args:
        config: every setting (see :class:`xtd.config.TrainConfig`).
        progress: called on the main rank after every step with the metrics record
            (``step``, ``loss`` and each term, ``lr``, ``tokens_per_s``, ``eta_s``, ``eval_*``).

    Returns:
        A :class:`TrainResult`.

    Raises:
        XtdError: bad input, found before the first step (missing or unfinished store,
            tokenizer mismatch, missing top-k or hidden states, run folder in use).
    """
    ctx = _Dist.from_env(config.device)
    try:
        return _run(config, ctx, progress)
    finally:
        ctx.close()


def _run(config: TrainConfig, ctx: _Dist, progress: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    from xtd.eval_sets import TrainEvaluator
    from xtd.storage import open_store
    from xtd.student import load_student, model_tokenizer
    from xtd.tokenization import load_tokenizer

    out = Path(config.out)
    names = config.loss_names()
    weights = config.loss_weight_map()

    # 1. Checks that need no model: the run folder, stores, losses, tokenizers.
    if inspect_run_folder(out, config) == "done":
        logger.info("%s %r already holds this finished run; nothing to do", flag("out"), str(out))
        marker = read_run_marker(out) or {}
        return TrainResult(out=out, steps=config.max_steps, tokens=int(marker.get("tokens") or 0), nothing_to_do=True)
    readers = [open_store(url) for url in config.store]
    student_tokenizer = (
        load_tokenizer(config.tokenizer) if config.tokenizer else model_tokenizer(config.model_config or config.student)
    )
    check_inputs(config, readers, student_tokenizer)
    evaluator = TrainEvaluator.from_config(config, student_tokenizer) if ctx.main else None  # learning curves

    # 2. The run folder: fresh, resumed or overwritten (every rank has inspected it first;
    # a checkpoint is read and checked before anything in the folder changes).
    checkpoint = latest_checkpoint(out) if config.resume else None
    loaded = load_checkpoint(checkpoint, config) if checkpoint is not None else None
    ctx.barrier()
    if ctx.main:
        prepare_run_folder(out, config)
    ctx.barrier()

    # 3. The student (seeded, so a resumed run rebuilds the same frozen weights).
    _seed_everything(config.seed)
    student = load_student(
        None if config.model_config else config.student,
        tokenizer=student_tokenizer,
        model_config=config.model_config,
        lora_rank=config.lora_rank,
        lora_alpha=float(config.lora_rank),  # spec §4.6: r = α
        untie=config.untie,
        seed=config.seed,
    )
    if student.tokenizer.digest != student_tokenizer.digest:  # pragma: no cover - a load_student bug
        raise TokenizerMismatchError("the loaded student's tokenizer differs from the one checked against the store")
    model = student.model.to(ctx.device)
    model.train()
    # Everything trained: the student, plus a hidden-size map for latents when H_S ≠ H_T.
    root = torch.nn.ModuleDict({"student": model})
    projection = latents_projection(names, readers, model)
    if projection is not None:
        root["latents_projection"] = projection.to(ctx.device)
    params = list(trainable_parameters(root).values())
    if not params and config.max_steps > 0:
        raise ConfigError("the student has no trainable parameters; check --lora-rank")

    # 4. Optimizer (AdamW; the lr is set every step from the pure schedule lr_at).
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay
    )

    # 5. Resume: weights, optimizer, RNG and data position.
    start_step, counters = 0, {"tokens": 0, "documents": 0, "elapsed_s": 0.0}
    if loaded is not None:
        apply_checkpoint(loaded, root, optimizer)
        start_step, counters = loaded.step, loaded.counters
        logger.info("resuming from %s (step %d)", checkpoint, start_step)
        if ctx.main:
            truncate_metrics(out / METRICS_FILE, start_step)
    elif config.resume:
        logger.info("no checkpoint in %s; starting from step 0", out)
        if ctx.main:  # records of a run killed before its first checkpoint are replayed
            truncate_metrics(out / METRICS_FILE, 0)

    # 6. Data: this rank's micro-batches of each step, prepared in DataLoader workers.
    pieces = _pieces(config, readers, student.tokenizer)
    plan = StepPlan(
        tuple(len(p) for p in pieces) if pieces else tuple(len(r) for r in readers),
        config.batch_size,
        seed=config.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    local_texts = config.batch_size // ctx.world_size
    spec = DataSpec(
        stores=tuple(config.store),
        student_tokenizer=student.tokenizer,
        plan=plan,
        micro_batch_size=min(config.micro_batch_size or local_texts, local_texts),
        micro_batch_tokens=config.micro_batch_tokens,
        max_student_length=config.max_student_length,
        max_teacher_length=config.max_teacher_length,
        boundary_classes=tuple(config.boundary_classes),
        alm_chunks=config.alm_chunks,
        merge=config.merge,
        merge_threshold=config.merge_threshold,
        losses=names,
        alignment_cache=tuple(
            _usable_cache(url, r, student.tokenizer.digest, config) for url, r in zip(config.store, readers, strict=True)
        ),
        pieces=pieces,
    )
    loader = torch.utils.data.DataLoader(
        StepDataset(spec),
        batch_size=None,
        sampler=range(start_step, config.max_steps),
        num_workers=config.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if config.num_workers > 0 else None,
    )
    setup = LossSetup(
        names=names,
        student_boundary_mask=torch.as_tensor(
            student.tokenizer.boundary_mask(tuple(config.boundary_classes)), dtype=torch.bool, device=ctx.device
        ),
        tau=config.tau,
        distance=config.distance,
        merge=config.merge,
        merge_threshold=config.merge_threshold,
        debias=config.debias,
        amp=config.amp,
        latents_projection=projection,
        **mined_setup(names, readers, student.tokenizer, ctx.device),
    )
    last_block = last_block_parameters(model) if config.gradmag and len(names) > 1 else []
    if config.gradmag and len(names) > 1 and any(w != 1.0 for w in weights.values()):
        logger.info("%s is on: fixed %s cancel out and are ignored", flag("gradmag"), flag("loss_weights"))

    # 7. The loop.
    history: list[dict[str, Any]] = []
    last: dict[str, float] = {}
    run_start, run_steps = time.perf_counter(), 0
    for step, data in zip(range(start_step, config.max_steps), loader, strict=False):
        t0 = time.perf_counter()
        lr = lr_at(
            step, lr=config.lr, warmup_steps=config.resolved_warmup_steps(), max_steps=config.max_steps,
            schedule=config.schedule,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Global counts before any forward pass (spec §4.2 step 8): one all-reduce per step.
        local = [sum(c[n] for c in data["counts"]) for n in names]
        *global_counts, tokens, documents = ctx.sum([*local, data["student_tokens"], len(data["documents"])])
        normalizers = dict(zip(names, global_counts, strict=True))

        totals = dict.fromkeys(names, 0.0)
        stats_list: list[dict[str, float]] = []
        gradmag_list: list[dict[str, float]] = []
        for mb_index, batch in enumerate(data["micro_batches"]):
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            terms, stats = compute_losses(model, batch, setup, normalizers)
            stats_list.append(stats)
            objective, gm = combine_terms(terms, weights, last_block, data["counts"][mb_index])
            gradmag_list.append(gm)
            if objective.requires_grad:
                objective.backward()
            for name, value in terms.items():
                totals[name] += float(value.detach())

        ctx.sum_grads(params)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            if config.max_grad_norm > 0
            else float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Logging: global loss terms, throughput and ETA.
        totals = dict(zip(names, ctx.sum([totals[n] for n in names]), strict=True))
        extra = _reduce_stats(stats_list, ctx)
        extra.update({f"gradmag_{k}": v for k, v in _reduce_stats(gradmag_list, None).items()})
        step_time = time.perf_counter() - t0  # evaluation below is not part of the step
        extra.update(evaluator(step + 1, model) if evaluator is not None else {})
        run_steps += 1
        counters["tokens"] += int(tokens)
        counters["documents"] += int(documents)
        counters["elapsed_s"] += step_time
        mean_step = (time.perf_counter() - run_start) / run_steps
        record: dict[str, Any] = {
            "step": step + 1,
            "max_steps": config.max_steps,
            "loss": sum(weights[n] * totals[n] for n in names),
            **totals,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "tokens_per_s": tokens / max(step_time, 1e-9),
            **{f"count_{n}": int(normalizers[n]) for n in names},
            "epoch": plan.epoch_of(step + 1),
            "step_time_s": step_time,
            "eta_s": mean_step * (config.max_steps - step - 1),
            **extra,
        }
        last = {k: float(record[k]) for k in ("loss", *names)}
        if ctx.main:
            history.append(record)
            if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
                logger.info(_format_line(record, names))
                append_metrics(out, record)
            if progress is not None:
                progress(record)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.max_steps:
                save_checkpoint(out, step + 1, root, optimizer, config, counters)
                prune_checkpoints(out, config.keep_checkpoints)
        _after_step(step + 1)
        ctx.barrier()

    # 8. Save the student (LoRA merged) with a card naming the store and every setting.
    if ctx.main:
        if config.max_steps > start_step:
            save_checkpoint(out, config.max_steps, root, optimizer, config, counters)
            prune_checkpoints(out, config.keep_checkpoints)
        card = {
            **config.to_dict(),  # every setting, one row each in the model card
            "store": ", ".join(config.store),
            "teacher": [r.attrs.get("teacher") for r in readers],
            "steps_done": config.max_steps,
            "tokens_trained": counters["tokens"],
            "final_losses": last,
        }
        student.model = model
        from xtd.student import save_student

        save_model_into(lambda staging: save_student(student, staging, card=card, overwrite=True), out)
        finish_run_folder(out, config.max_steps, int(counters["tokens"]))
    ctx.barrier()
    return TrainResult(out=out, steps=config.max_steps, tokens=int(counters["tokens"]), losses=last, history=history)


_SUMMED_STATS = ("alm_groups", "alm_binary_kl", "alm_partial_chunks", "alm_dropped_groups")


def _reduce_stats(per_batch: list[dict[str, float]], ctx: _Dist | None) -> dict[str, float]:
    """One value per statistic for the step's log.

    Counts and normalised sums (``alm_binary_kl``) add up over micro-batches and ranks
    (the global value); ``*_min``/``*_max`` take the extreme; anything else (means,
    GradMag weights) is averaged over this rank's micro-batches.
    """
    keys = sorted({k for stats in per_batch for k in stats})
    out: dict[str, float] = {}
    for key in keys:
        values = [stats[key] for stats in per_batch if key in stats]
        if key in _SUMMED_STATS:
            out[key] = sum(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    summed = [k for k in keys if k in _SUMMED_STATS]
    if ctx is not None and summed:
        out.update(zip(summed, ctx.sum([out[k] for k in summed]), strict=True))
    return out


def _after_step(step: int) -> None:
    """Hook point after every optimizer step (tests slow a run down here to kill it mid-way)."""


def _pieces(config: TrainConfig, readers: list[Any], student_tokenizer: Any) -> tuple[Pieces, ...] | None:
    """Each store's documents as training texts: long ones cut into pieces (``split``)."""
    if config.long_documents != "split":
        return None
    max_rows = estimate_piece_rows(readers, student_tokenizer, config.max_student_length)
    if config.max_teacher_length is not None:
        max_rows = min(max_rows, config.max_teacher_length)
    pieces = tuple(Pieces.of(r.doc_num_tokens(), max_rows) for r in readers)
    documents, texts = sum(len(r) for r in readers), sum(len(p) for p in pieces)
    if texts > documents:
        logger.info(
            "%d documents longer than %d teacher rows (≈ %d student tokens) are split: %d documents → %d texts",
            sum(int((p.num_rows > max_rows).sum()) for p in pieces),
            max_rows,
            config.max_student_length,
            documents,
            texts,
        )
    return pieces


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
