"""``xtd hypernet``: zero-shot tokenizer transfer with a hypernetwork (logic in :mod:`xtd.hypernet`).

``xtd hypernet train --json`` prints one line: ``{"out", "steps", "tokens", "losses",
"nothing_to_do"}``; ``xtd hypernet apply --json``: ``{"out", "vocab_size", "counts"}``.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import TextColumn

from xtd.cli._app import app
from xtd.cli._options import config_command
from xtd.cli.train import print_run_result, saved_run_settings
from xtd.config import HypernetApplyConfig, HypernetTrainConfig
from xtd.console import progress_bar, results

group = typer.Typer(
    name="hypernet",
    help="Embedding-prediction hypernetworks (ZeTT): move a model to any tokenizer zero-shot.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(group, name="hypernet")

TRAIN_EXAMPLES = """
[bold]Examples[/]

  # a hypernetwork for SmolLM2 trained with ALM against a store it never reads a teacher for
  xtd hypernet train --store runs/teacher.zarr --model embedded:smollm2 --out runs/hypernet --max-steps 2000 --lr 1e-4

  # the ZeTT baseline (SFT on the sampled tokenizers' own next tokens), smaller sampled vocabularies
  xtd hypernet train --store runs/teacher.zarr --model embedded:smollm2 --out runs/hn-sft --losses sft --vocab-size-mean 8192

  # after an interruption, resume with no other flag
  xtd hypernet train --resume --out runs/hypernet

  # then move the base model to an unseen tokenizer
  xtd hypernet apply --hypernet runs/hypernet --tokenizer embedded:gpt2 --out runs/zero-shot-gpt2
"""


@config_command("train", HypernetTrainConfig, group=group, epilog=TRAIN_EXAMPLES, resume_from=saved_run_settings)
def train_command(
    config: HypernetTrainConfig,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the summary as one line of JSON.")] = False,
) -> None:
    """Train an embedding-prediction hypernetwork from teacher shards (no teacher in memory).

    Every step samples a tokenizer, tokenizes the step's texts with it, predicts the
    embeddings of the tokens it needs, runs the frozen base model with them and trains
    the hypernetwork with ALM against the store (aligned on the fly), or with SFT. The
    run folder then holds the hypernetwork, which xtd hypernet apply and xtd train
    --init hypernet:DIR read.
    """
    from xtd.hypernet.train import train_hypernet
    from xtd.train import MetricsRecord

    with progress_bar(TextColumn("{task.fields[info]}")) as progress:
        task = progress.add_task("train", total=config.max_steps, info="")

        def report(record: MetricsRecord) -> None:
            progress.update(
                task,
                completed=record["step"],
                info=f"loss {record['loss']:.3f} | V {int(record.get('vocab_size', 0)):,} | "
                f"{record['tokens_per_s']:,.0f} tok/s",
                eta_s=record["eta_s"],
            )

        result = train_hypernet(config, progress=report)
    print_run_result(result, as_json=as_json)


APPLY_EXAMPLES = """
[bold]Examples[/]

  # the hypernetwork's base model moved to the GPT-2 tokenizer, no training
  xtd hypernet apply --hypernet runs/hypernet --tokenizer embedded:gpt2 --out runs/zero-shot-gpt2

  # to a tokenizer folder, replacing an earlier result, on a GPU
  xtd hypernet apply --hypernet runs/hypernet --tokenizer ./my-tokenizer --out runs/zs --overwrite --device cuda

  # then compare it with the base model in bits per byte
  xtd eval --model embedded:smollm2 --model runs/zero-shot-gpt2 --held-out 4
"""

@config_command("apply", HypernetApplyConfig, group=group, epilog=APPLY_EXAMPLES)
def apply_command(
    config: HypernetApplyConfig,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the summary as one line of JSON.")] = False,
) -> None:
    """Move the hypernetwork's base model to any tokenizer, zero-shot.

    Every token of the target tokenizer is decomposed into the base model's tokens and
    its input (and output) embedding is predicted by the hypernetwork; the rest of the
    base model is unchanged. The result loads with AutoModelForCausalLM and
    AutoTokenizer, like the output of xtd train.
    """
    from xtd.hypernet.apply import apply_hypernet

    with progress_bar() as progress:
        task = progress.add_task("embed tokens", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = apply_hypernet(config, progress=report)
    summary = {"out": str(result.out), "vocab_size": result.vocab_size, "counts": result.counts}
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        results.print(
            f"{result.out}: {result.vocab_size:,} tokens, " + ", ".join(f"{k} {v:,}" for k, v in result.counts.items()),
            highlight=False,
        )
