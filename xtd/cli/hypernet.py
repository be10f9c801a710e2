"""``xtd hypernet``: zero-shot tokenizer transfer with a hypernetwork (logic in :mod:`xtd.hypernet`).

``xtd hypernet apply --json`` prints one line: ``{"out", "vocab_size", "counts"}``.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from xtd.cli._app import app
from xtd.cli._options import config_command
from xtd.config import HypernetApplyConfig
from xtd.console import progress_bar, results

group = typer.Typer(
    name="hypernet",
    help="Embedding-prediction hypernetworks (ZeTT): move a model to any tokenizer zero-shot.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(group, name="hypernet")

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
