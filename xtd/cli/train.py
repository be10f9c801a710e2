"""``xtd train``: train a student of any tokenizer from teacher shards (logic in :mod:`xtd.train`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.progress import TextColumn

from xtd.cli._app import command
from xtd.config import TrainConfig

EXAMPLES = """
[bold]Examples[/]

  # SmolLM2 moved to the GPT-2 tokenizer, ALM+SFT with GradMag (the defaults)
  xtd train --store runs/teacher --student embedded:smollm2 --tokenizer embedded:gpt2 --out runs/gpt2-student --max-steps 2000

  # a byte-level student, full fine-tuning, resumed after an interruption
  xtd train --store runs/teacher --tokenizer bytes --lora-rank 0 --losses alm+sft --out runs/bytes --resume

  # learning curves: bits per byte on two held-out files every 50 steps, into metrics.jsonl
  xtd train --store runs/teacher --tokenizer embedded:gpt2 --out runs/s --eval-text kjv=heldout.txt --eval-text samples=samples.jsonl --eval-every 50

  # two GPUs, two stores mixed
  torchrun --nproc-per-node 2 -m xtd train --store a.zarr --store b.zarr --out runs/s --batch-size 64 --micro-batch-size 8
"""

_D = TrainConfig  # defaults come from the dataclass (one source of truth)


def _default(name: str) -> Any:
    return _D.__dataclass_fields__[name].default


@command("train", epilog=EXAMPLES)
def train_command(
    store: Annotated[list[str], typer.Option(help="Teacher store (repeat to mix several).")],
    out: Annotated[str, typer.Option(help="Run folder: the final HF model, metrics.jsonl and checkpoints/.")],
    student: Annotated[str, typer.Option(help="Student model: HF id, folder or embedded:smollm2.")] = _default("student"),
    tokenizer: Annotated[
        str | None, typer.Option(help="Move the student to this tokenizer (HF id, folder, tokenizer.json, bytes, embedded:NAME).")
    ] = _default("tokenizer"),
    model_config: Annotated[
        str | None, typer.Option(help="Train a fresh model from this HF config.json or folder.")
    ] = _default("model_config"),
    losses: Annotated[str, typer.Option(help="Losses joined by '+': alm, sft, kd, uld, mined, latents.")] = _default("losses"),
    loss_weights: Annotated[str, typer.Option(help="Fixed weights, e.g. alm=1,sft=0.5 (cancel out under GradMag).")] = _default(
        "loss_weights"
    ),
    gradmag: Annotated[bool, typer.Option(help="GradMag loss weighting (spec §4.5).")] = _default("gradmag"),
    alm_chunks: Annotated[str, typer.Option(help="ALM chunks: unconstrained or space.")] = _default("alm_chunks"),
    merge: Annotated[bool, typer.Option(help="Merge chunks by teacher boundary probability.")] = _default("merge"),
    merge_threshold: Annotated[float, typer.Option(help="γ of the merge.")] = _default("merge_threshold"),
    debias: Annotated[bool, typer.Option(help="Append the boundary log-mass to chunk log-likelihoods.")] = _default("debias"),
    tau: Annotated[float, typer.Option(help="Binarisation temperature τ.")] = _default("tau"),
    distance: Annotated[str, typer.Option(help="ALM distance, e.g. binary_ce, binary_kl, abs.")] = _default("distance"),
    boundary_classes: Annotated[
        str, typer.Option(help="Comma-separated boundary classes: space, newline, tab, special.")
    ] = ",".join(_default("boundary_classes")),
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (alpha = rank); 0 = full fine-tuning.")] = _default("lora_rank"),
    untie: Annotated[bool, typer.Option(help="Untie input and output embeddings.")] = _default("untie"),
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = _default("lr"),
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = _default("weight_decay"),
    adam_beta1: Annotated[float, typer.Option(help="AdamW β1.")] = _default("adam_beta1"),
    adam_beta2: Annotated[float, typer.Option(help="AdamW β2.")] = _default("adam_beta2"),
    warmup_steps: Annotated[int | None, typer.Option(help="Warm-up steps (default: max-steps / 10).")] = _default(
        "warmup_steps"
    ),
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (0: save the untrained student).")] = _default("max_steps"),
    schedule: Annotated[str, typer.Option(help="Decay after warm-up: linear or cosine.")] = _default("schedule"),
    batch_size: Annotated[int, typer.Option(help="Texts per optimizer step (all ranks).")] = _default("batch_size"),
    micro_batch_size: Annotated[
        int | None, typer.Option(help="Texts per forward pass (accumulation); default: all at once.")
    ] = _default("micro_batch_size"),
    micro_batch_tokens: Annotated[
        int | None,
        typer.Option(help="Padded student tokens per forward pass: texts packed longest first (bounds memory)."),
    ] = _default("micro_batch_tokens"),
    max_student_length: Annotated[int, typer.Option(help="Student tokens per text (longer: truncated).")] = _default(
        "max_student_length"
    ),
    long_documents: Annotated[
        str, typer.Option(help="Documents longer than --max-student-length: split (into pieces) or truncate.")
    ] = _default("long_documents"),
    max_teacher_length: Annotated[int | None, typer.Option(help="Teacher rows per text.")] = _default("max_teacher_length"),
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm; 0 = off.")] = _default("max_grad_norm"),
    seed: Annotated[int, typer.Option(help="Seed of data order and initialisation.")] = _default("seed"),
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end).")] = _default(
        "checkpoint_every"
    ),
    keep_checkpoints: Annotated[int, typer.Option(help="Most recent checkpoints to keep.")] = _default("keep_checkpoints"),
    log_every: Annotated[int, typer.Option(help="Log a line every N steps.")] = _default("log_every"),
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --out.")] = _default("resume"),
    overwrite: Annotated[bool, typer.Option(help="Start afresh in a used --out.")] = _default("overwrite"),
    amp: Annotated[bool, typer.Option(help="bf16 autocast on CUDA.")] = _default("amp"),
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: CUDA when present).")] = _default(
        "device"
    ),
    num_workers: Annotated[int, typer.Option(help="DataLoader workers for tokenisation and alignment.")] = _default(
        "num_workers"
    ),
    eval_text: Annotated[
        list[str] | None,
        typer.Option(help="Evaluation set NAME=FILE (.txt/.jsonl), repeatable: bits/byte in metrics.jsonl."),
    ] = None,
    eval_every: Annotated[
        int, typer.Option(help="Score the --eval-text sets every N steps (0: after the last step only).")
    ] = _default("eval_every"),
    eval_max_length: Annotated[
        int | None, typer.Option(help="Tokens per scoring window (default: --max-student-length).")
    ] = _default("eval_max_length"),
) -> None:
    """Train a student of any tokenizer from teacher shards (no teacher in memory).

    Losses default to the recommended ALM configuration (unconstrained chunks merged by
    boundary probability, debiased, plus SFT, GradMag). The result is a Hugging Face
    folder (LoRA merged) with the student tokenizer and a model card.
    """
    from xtd.console import progress_bar
    from xtd.train import train

    config = TrainConfig(
        store=tuple(store),
        out=out,
        student=student,
        tokenizer=tokenizer,
        model_config=model_config,
        losses=losses,
        loss_weights=loss_weights,
        gradmag=gradmag,
        alm_chunks=alm_chunks,
        merge=merge,
        merge_threshold=merge_threshold,
        debias=debias,
        tau=tau,
        distance=distance,
        boundary_classes=tuple(c.strip() for c in boundary_classes.split(",") if c.strip()),
        lora_rank=lora_rank,
        untie=untie,
        lr=lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        schedule=schedule,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        micro_batch_tokens=micro_batch_tokens,
        max_student_length=max_student_length,
        long_documents=long_documents,
        max_teacher_length=max_teacher_length,
        max_grad_norm=max_grad_norm,
        seed=seed,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        log_every=log_every,
        resume=resume,
        overwrite=overwrite,
        amp=amp,
        device=device,
        num_workers=num_workers,
        eval_text=tuple(eval_text or ()),
        eval_every=eval_every,
        eval_max_length=eval_max_length,
    )
    names = config.loss_names()
    with progress_bar(TextColumn("{task.fields[info]}")) as progress:
        task = progress.add_task("train", total=config.max_steps, info="")

        def report(record: dict[str, Any]) -> None:
            terms = " ".join(f"{n} {record[n]:.3f}" for n in names)
            rate = record["tokens_per_s"]
            progress.update(
                task,
                completed=record["step"],
                info=f"loss {record['loss']:.3f} ({terms}) | {rate:,.0f} tok/s",
                eta_s=record["eta_s"],
            )

        result = train(config, progress=report)
    summary = {"out": str(result.out), "steps": result.steps, "tokens": result.tokens, "losses": result.losses}
    if result.nothing_to_do:
        summary["nothing_to_do"] = True
    typer.echo(json.dumps(summary))
