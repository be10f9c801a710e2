"""Train a student of any tokenizer from teacher shards: ``xtd train`` and :func:`train`.

Read top to bottom, :func:`_run` is the whole recipe (in the spirit of nanoGPT's
``train.py``): resolve the run's parts once (stores, student tokenizer, losses) → run
folder → student → objective → optimizer → resume → data → loop → save. The loop itself
(:func:`train_steps`) takes a model, an objective, the data and an optimizer, and knows
nothing of the config.

Normalisation (docs/method.md, "Normalisation"): every loss's count is data-only, so each
step first sums the counts over its micro-batches and all-reduces them across ranks;
every micro-batch loss is then a *sum* divided by those global counts, and the step's
gradient is the sum of the micro-batch gradients (accumulated locally, then all-reduced
once per step). The step's loss is therefore the same for any split into ranks and
micro-batches.

Data parallelism: under ``torchrun`` (``WORLD_SIZE`` > 1) each rank reads its own share
of every step's texts; gradients are summed with one ``all_reduce`` per step rather than
through a ``DistributedDataParallel`` wrapper, because GradMag calls
``torch.autograd.grad`` on the last block inside the step, which DDP's bucket hooks do
not expect. The maths is that of DDP with ``no_sync`` accumulation.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xtd.alignment_cache import check_cache
from xtd.checkpoint import (
    METRICS_FILE,
    LoadedCheckpoint,
    RunCounters,
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
from xtd.config import HypernetTrainConfig, OptimSettings, TrainConfig, flag
from xtd.errors import ConfigError, StoreFormatError, TokenizerMismatchError
from xtd.eval_sets import TrainEvaluator
from xtd.losses.registry import LossSpec, RunInfo, check_stores, loss_specs
from xtd.model_parts import last_block_parameters
from xtd.objective import Objective, build_objective, choose_fused, choose_packing
from xtd.outputs import read_run_marker
from xtd.runtime import Distributed
from xtd.storage import StoreReader, open_store
from xtd.student import load_student, model_tokenizer, save_student
from xtd.tokenization import ByteTokenizer, load_tokenizer
from xtd.train_data import StepData, StepDataset, TrainData, build_train_data

logger = logging.getLogger(__name__)

__all__ = ["train", "train_steps", "TrainResult", "MetricsRecord", "lr_at", "resolve_stores"]

MetricsRecord = dict[str, float | int]
"""One step's metrics (``metrics.jsonl`` line): ``step``, ``loss`` and each term, ``lr``,
``grad_norm``, ``tokens``, ``tokens_per_s``, ``padding_share`` (padding positions the
decoder ran on / all it ran on), ``count_*``, ``epoch``, ``step_time_s``,
``eta_s``, ALM statistics, ``gradmag_*`` and ``eval_*``."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        out: the saved Hugging Face folder.
        steps: optimizer steps taken in total (including those before a resume).
        tokens: student tokens trained on (all ranks, padding excluded).
        losses: the last step's loss terms (``loss`` = weighted sum), empty if no step ran.
        history: one metrics record per step of this process's run.
        nothing_to_do: ``--out`` already held this finished run; nothing was trained.
    """

    out: Path
    steps: int
    tokens: int
    losses: dict[str, float] = field(default_factory=dict)
    history: list[MetricsRecord] = field(default_factory=list)
    nothing_to_do: bool = False


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, schedule: str = "linear") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then decay to 0.

    Steps ``0 .. warmup_steps − 1`` ramp linearly to ``lr`` (reached at the last warm-up
    step); the remaining steps decay linearly or by a half cosine towards 0 at
    ``max_steps`` (docs/method.md, "Defaults").
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (1.0 - progress)


def open_finished_stores(urls: Sequence[str]) -> list[tuple[str, StoreReader]]:
    """Open every store; refuse an unfinished one (``xtd train`` and ``xtd hypernet train``).

    Raises:
        StoreFormatError: an unfinished store.
    """
    stores = [(url, open_store(url)) for url in urls]
    for url, reader in stores:
        if not reader.complete:
            raise StoreFormatError(
                f"store {url!r} is unfinished ({len(reader)} documents committed); rerun the same "
                "xtd precompute command to finish it, then train"
            )
    return stores


def resolve_stores(
    urls: Sequence[str], losses: Sequence[LossSpec], student_tokenizer: ByteTokenizer, config: TrainConfig
) -> list[tuple[str, StoreReader]]:
    """Open every store and check, before any model loads, that it can serve the run.

    Raises:
        StoreFormatError: an unfinished store, or one without what a loss needs.
        TokenizerMismatchError: a same-tokenizer loss with another student tokenizer, or an
            ``xtd align --cache`` made only for other student tokenizers.
    """
    stores = open_finished_stores(urls)
    check_stores(losses, stores, student_tokenizer, config.alm)
    for url, _ in stores:
        check_cache(url, student_tokenizer)
    return stores


# --------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------


def train(config: TrainConfig, *, progress: Callable[[MetricsRecord], None] | None = None) -> TrainResult:
    """Train a student from teacher shards and save it as a Hugging Face folder.

    Args:
        config: every setting (see :class:`xtd.config.TrainConfig`).
        progress: called on the main rank after every step with the metrics record.

    Returns:
        A :class:`TrainResult`.

    Raises:
        XtdError: bad input, found before the first step (missing or unfinished store,
            tokenizer mismatch, missing top-k or hidden states, run folder in use).
    """
    ctx = Distributed.from_env(config.device)
    try:
        return _run(config, ctx, progress)
    finally:
        ctx.close()


def _run(config: TrainConfig, ctx: Distributed, progress: Callable[[MetricsRecord], None] | None) -> TrainResult:
    out = Path(config.out)

    # 1. Checks that need no model: the run folder, stores, losses, tokenizers.
    if inspect_run_folder(out, config) == "done":
        logger.info("%s %r already holds this finished run; nothing to do", flag("out"), str(out))
        marker = read_run_marker(out) or {}
        return TrainResult(out=out, steps=config.max_steps, tokens=int(marker.get("tokens") or 0), nothing_to_do=True)
    losses = loss_specs(config.loss_names())
    student_tokenizer = (
        load_tokenizer(config.tokenizer) if config.tokenizer else model_tokenizer(config.model_config or config.student)
    )
    stores = resolve_stores(config.store, losses, student_tokenizer, config)
    evaluator = (
        TrainEvaluator.from_files(
            config.eval_text, student_tokenizer, every=config.eval_every, max_steps=config.max_steps,
            max_length=config.eval_max_length or config.data.max_student_length,
        )
        if ctx.main
        else None
    )  # fmt: skip

    # 2. The run folder: fresh, resumed or overwritten (every rank has inspected it first;
    # a checkpoint is read and checked before anything in the folder changes).
    checkpoint = latest_checkpoint(out) if config.resume else None
    loaded = load_checkpoint(checkpoint, config) if checkpoint is not None else None
    ctx.barrier()
    if ctx.main:
        prepare_run_folder(out, config)
    ctx.barrier()

    # 3. The student (seeded, so a resumed run rebuilds the same frozen weights), and the
    # objective: its losses' per-run setups (e.g. a trained hidden-size projection).
    _seed_everything(config.seed)
    student = load_student(
        None if config.model_config else config.student,
        tokenizer=student_tokenizer,
        model_config=config.model_config,
        lora_rank=config.lora_rank,
        lora_alpha=float(config.lora_rank),  # r = α (docs/method.md, "Defaults")
        untie=config.untie,
        seed=config.seed,
        init=config.init,
    )
    if student.tokenizer.digest != student_tokenizer.digest:  # pragma: no cover - a load_student bug
        raise TokenizerMismatchError("the loaded student's tokenizer differs from the one checked against the store")
    model = student.model.to(ctx.device)
    model.train()
    vocab_size = student.tokenizer.vocab_size
    fused = choose_fused(  # skip the lm_head when no loss needs the full logits
        losses, model, vocab_size=vocab_size,
        sample_ids=(torch.arange(1, 9, device=ctx.device) * 7919 % vocab_size)[None],
    )  # fmt: skip
    packed = fused and choose_packing(model, vocab_size=vocab_size)  # texts side by side, no padding
    objective = build_objective(
        losses,
        alm=config.alm,
        weights=config.loss_weight_map(),
        boundary_mask=torch.as_tensor(
            student.tokenizer.boundary_mask(config.alm.boundary_classes), dtype=torch.bool, device=ctx.device
        ),
        run=RunInfo(tuple(stores), student.tokenizer, int(model.config.hidden_size), ctx.device),
        amp=config.amp,
        fused=fused,
        packed=packed,
    )
    # Everything trained: the student, plus the losses' own parameters.
    root = torch.nn.ModuleDict({"student": model, **objective.modules()})
    params = list(trainable_parameters(root).values())
    if not params and config.max_steps > 0:
        raise ConfigError("the student has no trainable parameters; check --lora-rank")

    # 4. Optimizer (AdamW; the lr is set every step from the pure schedule lr_at).
    optim = config.optim
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2), weight_decay=optim.weight_decay
    )

    # 5. Resume: weights, optimizer, RNG and data position.
    start_step, counters = resume_state(checkpoint, loaded, root, optimizer, resume=config.resume, out=out, ctx=ctx)

    # 6. Data: this rank's micro-batches of each step, prepared in DataLoader workers.
    data = build_train_data(
        stores, student.tokenizer, losses, data=config.data, alm=config.alm, seed=config.seed,
        rank=ctx.rank, world_size=ctx.world_size,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        StepDataset(data),
        batch_size=None,
        sampler=range(start_step, config.max_steps),
        num_workers=config.data.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if config.data.num_workers > 0 else None,
    )
    gradmag = config.gradmag and len(losses) > 1
    if gradmag and any(w != 1.0 for w in objective.weights.values()):
        logger.info("%s is on: fixed %s cancel out and are ignored", flag("gradmag"), flag("loss_weights"))

    after_step = step_bookkeeping(
        config, ctx, root, optimizer, counters, progress, line=lambda record: format_line(record, objective.names)
    )

    # 7. The loop.
    history = train_steps(
        model, objective, zip(range(start_step, config.max_steps), loader, strict=False),
        optimizer=optimizer, params=params, optim=optim, max_steps=config.max_steps, data=data, ctx=ctx,
        counters=counters, last_block=last_block_parameters(model) if gradmag else [],
        evaluator=evaluator, after_step=after_step,
    )  # fmt: skip
    last = {k: float(history[-1][k]) for k in ("loss", *objective.names)} if history else {}

    # 8. Save the student (LoRA merged) with a card naming the store and every setting.
    if ctx.main:
        if config.max_steps > start_step:
            save_final_checkpoint(config, root, optimizer, counters)
        card = {
            **config.flat_dict(),  # every setting, one row each in the model card
            "store": ", ".join(config.store),
            "teacher": [reader.attrs.get("teacher") for _, reader in stores],
            "steps_done": config.max_steps,
            "tokens_trained": counters.tokens,
            "final_losses": last,
        }
        student.model = model
        save_model_into(lambda staging: save_student(student, staging, card=card, overwrite=True), out)
        finish_run_folder(out, config.max_steps, counters.tokens)
    ctx.barrier()
    history = history if ctx.main else []
    return TrainResult(out=out, steps=config.max_steps, tokens=counters.tokens, losses=last, history=history)


# --------------------------------------------------------------------------------------
# Run-folder bookkeeping shared by xtd train and xtd hypernet train
# --------------------------------------------------------------------------------------

RunConfig = TrainConfig | HypernetTrainConfig


def resume_state(
    checkpoint: Path | None, loaded: LoadedCheckpoint | None, root: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
    resume: bool, out: Path, ctx: Distributed,
) -> tuple[int, RunCounters]:
    """Apply a loaded checkpoint (weights, optimizer, RNG) and cut ``metrics.jsonl`` back to it.

    Returns:
        ``(start_step, counters)``: 0 and fresh counters without a checkpoint.
    """
    if loaded is not None:
        apply_checkpoint(loaded, root, optimizer)
        logger.info("resuming from %s (step %d)", checkpoint, loaded.step)
        if ctx.main:
            truncate_metrics(out / METRICS_FILE, loaded.step)
        return loaded.step, loaded.counters
    if resume:
        logger.info("no checkpoint in %s; starting from step 0", out)
        if ctx.main:  # records of a run killed before its first checkpoint are replayed
            truncate_metrics(out / METRICS_FILE, 0)
    return 0, RunCounters()


def step_bookkeeping(
    config: RunConfig,
    ctx: Distributed,
    root: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    counters: RunCounters,
    progress: Callable[[MetricsRecord], None] | None,
    *,
    line: Callable[[MetricsRecord], str],
) -> Callable[[int, MetricsRecord], None]:
    """The main rank's bookkeeping after every step: log ``line(record)``, metrics, checkpoint."""
    out = Path(config.out)

    def after_step(step: int, record: MetricsRecord) -> None:
        if not ctx.main:
            return
        if step % config.log_every == 0 or step == config.max_steps:
            logger.info(line(record))
            append_metrics(out, record)
        if progress is not None:
            progress(record)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
            save_checkpoint(out, step, root, optimizer, config, counters)  # type: ignore[arg-type]
            prune_checkpoints(out, config.keep_checkpoints)

    return after_step


def save_final_checkpoint(
    config: RunConfig, root: torch.nn.Module, optimizer: torch.optim.Optimizer, counters: RunCounters
) -> None:
    """The checkpoint of the last step (a finished run resumes as "nothing to do")."""
    save_checkpoint(Path(config.out), config.max_steps, root, optimizer, config, counters)  # type: ignore[arg-type]
    prune_checkpoints(Path(config.out), config.keep_checkpoints)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def train_steps(
    model: torch.nn.Module,
    objective: Objective,
    steps: Iterable[tuple[int, StepData]],
    *,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    optim: OptimSettings,
    max_steps: int,
    data: TrainData,
    ctx: Distributed,
    counters: RunCounters,
    last_block: Sequence[torch.nn.Parameter] = (),
    evaluator: TrainEvaluator | None = None,
    after_step: Callable[[int, MetricsRecord], None] | None = None,
) -> list[MetricsRecord]:
    """Run optimizer steps: global counts → micro-batch terms → backward → one update each.

    Args:
        model: what the objective runs on each micro-batch (a student, or a model whose
            embeddings are predicted for the step).
        objective: the losses and their weighting.
        steps: ``(step, data)`` pairs, 0-based steps (a DataLoader over :class:`StepDataset`).
        optimizer, params: the optimizer and every trained parameter (clipped, all-reduced).
        optim: the learning-rate schedule and clipping.
        max_steps: the run's last step (the schedule's end).
        data: the data plan (epochs in the log).
        ctx: ranks and devices.
        counters: tokens, documents and seconds so far; updated in place.
        last_block: GradMag's parameters, or empty for fixed weights.
        evaluator: learning curves after a step, or None.
        after_step: called with ``(step, record)`` after every step (1-based step).

    Returns:
        The metrics record of every step.
    """
    names = objective.names
    warmup = optim.warmup(max_steps)
    history: list[MetricsRecord] = []
    run_start, run_steps = time.perf_counter(), 0
    for step, batch_data in steps:
        t0 = time.perf_counter()
        lr = lr_at(step, lr=optim.lr, warmup_steps=warmup, max_steps=max_steps, schedule=optim.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Global counts before any forward pass (docs/method.md, "Normalisation"): one all-reduce per step.
        local = [sum(c[n] for c in batch_data["counts"]) for n in names]
        *global_counts, tokens, documents = ctx.sum(
            [*local, batch_data["student_tokens"], len(batch_data["documents"])]
        )
        normalizers = dict(zip(names, global_counts, strict=True))

        totals = dict.fromkeys(names, 0.0)
        forward_tokens = 0
        stats_list: list[dict[str, float]] = []
        gradmag_list: list[dict[str, float]] = []
        for batch, counts in zip(batch_data["micro_batches"], batch_data["counts"], strict=True):
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            forward_tokens += objective.forward_tokens(batch)
            terms, stats = objective(model, batch, normalizers)
            stats_list.append(stats)
            loss, weights = objective.combine(terms, counts, last_block)
            gradmag_list.append(weights)
            if loss.requires_grad:
                loss.backward()
            for name, value in terms.items():
                totals[name] += float(value.detach())

        ctx.sum_grads(params)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm))
            if optim.max_grad_norm > 0
            else float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # Logging: global loss terms, throughput and ETA.
        *summed, forward_tokens = ctx.sum([*(totals[n] for n in names), forward_tokens])
        totals = dict(zip(names, summed, strict=True))
        extra = _reduce_stats(stats_list, ctx)
        extra.update({f"gradmag_{k}": v for k, v in _reduce_stats(gradmag_list, None).items()})
        step_time = time.perf_counter() - t0  # evaluation below is not part of the step
        extra.update(evaluator(step + 1, model) if evaluator is not None else {})
        run_steps += 1
        counters.tokens += int(tokens)
        counters.documents += int(documents)
        counters.elapsed_s += step_time
        mean_step = (time.perf_counter() - run_start) / run_steps
        record: MetricsRecord = {
            "step": step + 1,
            "max_steps": max_steps,
            "loss": sum(objective.weights[n] * totals[n] for n in names),
            **totals,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "tokens_per_s": tokens / max(step_time, 1e-9),
            "padding_share": 1.0 - tokens / max(forward_tokens, 1),
            **{f"count_{n}": int(normalizers[n]) for n in names},
            "epoch": data.plan.epoch_of(step + 1),
            "step_time_s": step_time,
            "eta_s": mean_step * (max_steps - step - 1),
            **extra,
        }
        history.append(record)
        if after_step is not None:
            after_step(step + 1, record)
        ctx.barrier()
    return history


_SUMMED_STATS = ("alm_groups", "alm_binary_kl", "alm_partial_chunks", "alm_dropped_groups")


def _reduce_stats(per_batch: list[dict[str, float]], ctx: Distributed | None) -> dict[str, float]:
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


def format_line(record: MetricsRecord, terms: tuple[str, ...], extra: str = "") -> str:
    """One log line: step, loss (and its terms), ``extra`` (e.g. `` | V 3,140, …``), lr and throughput."""
    parts = ", ".join(f"{n} {record[n]:.3f}" for n in terms if n in record)
    rate = float(record["tokens_per_s"])
    rate_s = f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"
    return (
        f"step {record['step']}/{record['max_steps']} | loss {record['loss']:.3f}"
        + (f" ({parts})" if len(terms) > 1 else "")
        + extra
        + f" | lr {record['lr']:.1e} | {rate_s} tok/s"
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
