"""``xtd precompute``: run the teacher once over a dataset and write the shard store.

Thin: the options are generated from :class:`~xtd.config.PrecomputeConfig`; it draws a
rich progress bar, calls :func:`xtd.precompute.precompute` and prints a summary table on
stdout. ``--json`` prints :func:`xtd.precompute.result_dict` as one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.progress import TextColumn
from rich.table import Table

from xtd.cli._options import config_command
from xtd.config import PrecomputeConfig
from xtd.console import results as _out  # stdout carries results only
from xtd.errors import ConfigError

EXAMPLES = """
[bold]Examples[/]

  # the embedded SmolLM2 over the embedded corpus
  xtd precompute --out runs/teacher.zarr

  # your teacher over your files, with top-64 and hidden states; after an interruption, --resume
  xtd precompute --teacher ./my-model --data 'corpus/*.jsonl' --out runs/t.zarr --top-k 64 --hidden
  xtd precompute --resume --out runs/t.zarr

  # four GPUs, one part each
  torchrun --nproc-per-node 4 -m xtd precompute --data my/dataset --split train --out s3://bucket/t.zarr
"""

def _saved_settings(typed: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """With ``--resume``, the settings the store at ``--out`` was written with."""
    if not typed.get("resume"):
        return None
    if typed.get("out") is None:
        raise ConfigError("--resume needs --out: the store to finish or extend")
    from xtd.precompute import saved_settings

    return saved_settings(typed["out"])


@config_command("precompute", PrecomputeConfig, epilog=EXAMPLES, resume_from=_saved_settings)
def precompute_command(
    config: PrecomputeConfig,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the summary as one line of JSON.")] = False,
) -> None:
    """Run a teacher once over a dataset and store, per teacher token, what distillation needs.

    Stores token ids and byte spans, the realised-token log-prob, the next-token mass of
    each boundary class (space, newline, tab, special; full softmax), top-k log-probs and
    optionally hidden states. Rerun the same command (or --resume --out STORE) to resume
    after an interruption.
    """
    from xtd.console import progress_bar
    from xtd.precompute import PrecomputeProgress, precompute, result_dict

    with progress_bar(TextColumn("{task.fields[tokens]} tokens"), TextColumn("{task.fields[rate]} tok/s")) as bar:
        task: list[Any] = []

        def on_progress(p: PrecomputeProgress) -> None:
            if not task:
                task.append(bar.add_task("documents", total=p.documents_total, completed=0, tokens="0", rate="-"))
            rate = p.forward_tokens / p.elapsed_s if p.elapsed_s > 0 else 0.0
            bar.update(
                task[0],
                completed=p.documents_done,
                tokens=f"{p.forward_tokens:,}",
                rate=f"{rate:,.0f}",
                eta_s=p.eta_s,
            )

        result = precompute(config, progress=on_progress)
    if as_json:
        typer.echo(json.dumps(result_dict(result), default=str))
        return
    table = Table(title="xtd precompute", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("store", f"{result.out} (part {result.rank} of {result.world_size})")
    table.add_row("teacher", f"{result.teacher.get('name')} ({result.teacher.get('dtype')}, vocab {result.teacher.get('vocab_size')})")
    table.add_row("documents", f"{result.documents_written:,} written, {result.documents_resumed:,} already committed, {result.documents_total:,} in this part")
    table.add_row("empty records skipped", f"{result.empty_documents:,}")
    table.add_row("tokens", f"{result.tokens:,}")
    table.add_row("speed", f"{result.tokens_per_s:,.0f} tokens/s over {result.seconds:.1f} s")
    if result.inexact_loss_spans:
        table.add_row("inexact loss spans", f"{result.inexact_loss_spans:,} conversations trained on in full")
    table.add_row("complete", "yes" if result.complete else "no")
    _out.print(table)
