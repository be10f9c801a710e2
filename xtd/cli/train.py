"""``xtd train``: train a student of any tokenizer from teacher shards (logic in :mod:`xtd.train`).

The options are generated from :class:`xtd.config.TrainConfig`. ``--resume --out DIR``
starts from the settings saved in the run folder (``train_config.json``); flags given again
override them and must agree with the checkpoint, as any resumed run must.

``--json`` prints one line: ``{"out", "steps", "tokens", "losses": {name: value},
"nothing_to_do"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import TextColumn

from xtd.cli._options import config_command
from xtd.config import TrainConfig
from xtd.console import console, progress_bar, results

if TYPE_CHECKING:
    from xtd.hypernet.train import HypernetTrainResult
    from xtd.train import TrainResult

EXAMPLES = """
[bold]Examples[/]

  # SmolLM2 moved to the GPT-2 tokenizer, ALM+SFT with GradMag (the defaults)
  xtd train --store runs/teacher.zarr --tokenizer embedded:gpt2 --out runs/gpt2-student --max-steps 2000

  # a byte-level student, full fine-tuning; after an interruption, resume with no other flag
  xtd train --store runs/teacher.zarr --tokenizer bytes --lora-rank 0 --out runs/bytes
  xtd train --resume --out runs/bytes

  # the settings of an earlier run, for 50 more steps in a new folder
  xtd train --config runs/bytes/train_config.json --max-steps 50 --out runs/bytes-50

  # learning curves: bits per byte on two held-out files every 50 steps, into metrics.jsonl
  xtd train --store runs/teacher.zarr --tokenizer embedded:gpt2 --out runs/s --eval-text kjv=heldout.txt --eval-every 50

  # two GPUs, two stores mixed
  torchrun --nproc-per-node 2 -m xtd train --store a.zarr --store b.zarr --out runs/s --batch-size 64 --micro-batch-size 8
"""


def saved_run_settings(typed: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """With ``--resume``, the settings saved in ``--out`` (the flags typed then override them);
    ``xtd train`` and ``xtd hypernet train`` read their run folders this way."""
    if not typed.get("resume") or typed.get("out") is None:
        return None
    from xtd.checkpoint import read_run_marker, saved_config

    out = Path(typed["out"])
    if out.is_dir() and any(out.iterdir()) and read_run_marker(out) is None:
        return None  # a folder xtd did not write: training refuses it, naming what it holds
    saved = dict(saved_config(out))
    saved.pop("overwrite", None)
    return saved


@config_command("train", TrainConfig, epilog=EXAMPLES, resume_from=saved_run_settings)
def train_command(
    config: TrainConfig,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the summary as one line of JSON.")] = False,
) -> None:
    """Train a student of any tokenizer from teacher shards (no teacher in memory).

    Losses default to the recommended ALM configuration (unconstrained chunks merged by
    boundary probability, debiased, plus SFT, GradMag). The result is a Hugging Face
    folder (LoRA merged) with the student tokenizer and a model card.
    """
    from xtd.train import MetricsRecord, train

    names = config.loss_names()
    with progress_bar(TextColumn("{task.fields[info]}")) as progress:
        task = progress.add_task("train", total=config.max_steps, info="")

        def report(record: MetricsRecord) -> None:
            terms = " ".join(f"{n} {record[n]:.3f}" for n in names)
            rate = record["tokens_per_s"]
            progress.update(
                task,
                completed=record["step"],
                info=f"loss {record['loss']:.3f} ({terms}) | {rate:,.0f} tok/s",
                eta_s=record["eta_s"],
            )

        result = train(config, progress=report)
    print_run_result(result, as_json=as_json)


def print_run_result(result: TrainResult | HypernetTrainResult, *, as_json: bool) -> None:
    """A finished run on stdout (``xtd train`` and ``xtd hypernet train``): one JSON line, or a sentence."""
    summary = {
        "out": str(result.out), "steps": result.steps, "tokens": result.tokens, "losses": result.losses,
        "nothing_to_do": result.nothing_to_do,
    }  # fmt: skip
    if as_json:
        typer.echo(json.dumps(summary))
    elif result.nothing_to_do:
        console.print(f"{result.out} already holds this finished run; nothing to do", highlight=False)
    else:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
        results.print(f"trained {result.steps} steps ({result.tokens:,} tokens) → {result.out}" + (f" | {losses}" if losses else ""), highlight=False)
