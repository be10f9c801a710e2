"""``xtd hypernet``: zero-shot tokenizer transfer with a hypernetwork (logic in :mod:`xtd.hypernet`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from xtd.cli._app import app, command
from xtd.hypernet.config import HypernetApplyConfig

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

_D = HypernetApplyConfig


def _default(name: str) -> object:
    return _D.__dataclass_fields__[name].default


@command("apply", group=group, epilog=APPLY_EXAMPLES)
def apply_command(
    hypernet: Annotated[str, typer.Option(help="Hypernetwork folder (hypernet.json + hypernet.safetensors).")],
    tokenizer: Annotated[
        str, typer.Option(help="Target tokenizer: HF id, folder, tokenizer.json, bytes, embedded:NAME.")
    ],
    out: Annotated[str, typer.Option(help="Output folder: a Hugging Face model with the target tokenizer.")],
    batch_tokens: Annotated[int, typer.Option(help="Target tokens per hypernetwork forward pass.")] = _default(
        "batch_tokens"
    ),
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = _default("overwrite"),
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: CUDA when present).")] = _default(
        "device"
    ),
) -> None:
    """Move the hypernetwork's base model to any tokenizer, zero-shot.

    Every token of the target tokenizer is decomposed into the base model's tokens and
    its input (and output) embedding is predicted by the hypernetwork; the rest of the
    base model is unchanged. The result loads with AutoModelForCausalLM and
    AutoTokenizer, like the output of xtd train.
    """
    from xtd.console import progress_bar
    from xtd.hypernet.apply import apply_hypernet

    config = HypernetApplyConfig(
        hypernet=hypernet, tokenizer=tokenizer, out=out, batch_tokens=batch_tokens, overwrite=overwrite, device=device
    )
    with progress_bar() as progress:
        task = progress.add_task("embed tokens", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = apply_hypernet(config, progress=report)
    typer.echo(json.dumps({"out": str(result.out), "vocab_size": result.vocab_size, "counts": result.counts}))
