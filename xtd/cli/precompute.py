"""``xtd precompute``: run the teacher once over a dataset and write the shard store.

Thin: builds a :class:`~xtd.config.PrecomputeConfig` from the options (whose defaults
come from that class), draws a rich progress bar, calls :func:`xtd.precompute.precompute`
and prints a summary table on stdout.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.progress import TextColumn
from rich.table import Table

from xtd.cli._app import command
from xtd.config import PrecomputeConfig
from xtd.console import results as _out  # stdout: results only (STYLE.md §5)

EXAMPLES = """\
Examples:

  xtd precompute --out runs/teacher                       # embedded SmolLM2 over the embedded corpus

  xtd precompute --teacher ./my-model --data 'corpus/*.jsonl' --out runs/t --top-k 64 --hidden

  torchrun --nproc-per-node 4 -m xtd precompute --data my/dataset --split train --out s3://bucket/t
"""

_D = PrecomputeConfig  # defaults come from the config class (one source of truth)


@command("precompute", epilog=EXAMPLES)
def precompute_command(
    out: Annotated[str, typer.Option("--out", "-o", help="Store folder or fsspec URL to write (resumed if it exists).")],
    teacher: Annotated[
        str, typer.Option(help="Teacher: HF model folder or cached hub id; default: the embedded SmolLM2-135M-Instruct.")
    ] = _D.teacher,
    data: Annotated[
        str | None,
        typer.Option(help="Data: .txt/.jsonl/.parquet file or glob, datasets folder or name; default: embedded corpus."),
    ] = _D.data,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the teacher.")] = _D.revision,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.")] = _D.dtype,
    top_k: Annotated[int, typer.Option(help="Top-k next-token log-probs per token (0: none).")] = _D.top_k,
    max_length: Annotated[
        int,
        typer.Option(
            help="Window length in tokens. Longer documents are scored in windows: each later window "
            "repeats the last --stride tokens of the previous one as context and scores only its new "
            "tokens, so every token is scored exactly once, with context; nothing is truncated."
        ),
    ] = _D.max_length,
    stride: Annotated[int, typer.Option(help="Context tokens carried into each later window.")] = _D.stride,
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward batch.")] = _D.batch_tokens,
    hidden: Annotated[bool, typer.Option("--hidden", help="Also store the last hidden state (fp16).")] = _D.hidden,
    chat_template: Annotated[
        str, typer.Option(help="Conversations: auto = teacher's chat template; never = plain 'role: content' lines.")
    ] = _D.chat_template,
    rank: Annotated[int | None, typer.Option(help="This rank (default: $RANK from torchrun, else 0).")] = _D.rank,
    world_size: Annotated[
        int | None, typer.Option(help="Number of ranks (default: $WORLD_SIZE, else 1); document d goes to rank d % N.")
    ] = _D.world_size,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Read at most this many records, empty ones included: one .jsonl line, one dataset row, one "
            ".txt file, or one scene/chapter of the embedded corpus (up to ~22 KB each). Raising it on a "
            "finished store adds the new records."
        ),
    ] = _D.limit,
    split: Annotated[str, typer.Option(help="Split of a datasets dataset.")] = _D.split,
    text_field: Annotated[
        str | None, typer.Option(help="Field with the text or messages (default: text, messages or conversations).")
    ] = _D.text_field,
    errors: Annotated[
        str, typer.Option(help="Invalid UTF-8: strict (error naming file and byte offset) or replace.")
    ] = _D.errors,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a store written with other settings.")
    ] = _D.overwrite,
    shard_tokens: Annotated[
        int | None, typer.Option(help="Token rows per committed shard (default: the storage default).")
    ] = _D.shard_tokens,
    topk_codec: Annotated[str, typer.Option(help="Top-k log-prob codec on disk: q8 or fp16.")] = _D.topk_codec,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Run a teacher once over a dataset and store, per teacher token, what distillation needs.

    Stores token ids and byte spans, the realised-token log-prob, the next-token mass of
    each boundary class (space, newline, tab, special; full softmax), top-k log-probs and
    optionally hidden states. Rerun the same command to resume after an interruption.
    """
    from xtd.console import progress_bar
    from xtd.precompute import PrecomputeProgress, precompute, result_dict

    config = PrecomputeConfig(
        out=out,
        teacher=teacher,
        data=data,
        revision=revision,
        dtype=dtype,
        top_k=top_k,
        max_length=max_length,
        stride=stride,
        batch_tokens=batch_tokens,
        hidden=hidden,
        chat_template=chat_template,
        rank=rank,
        world_size=world_size,
        limit=limit,
        split=split,
        text_field=text_field,
        errors=errors,
        overwrite=overwrite,
        shard_tokens=shard_tokens,
        topk_codec=topk_codec,
    )
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
