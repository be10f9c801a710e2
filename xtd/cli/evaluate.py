"""``xtd eval``: bits per byte, ensembles and exact match, as a table or JSON.

A thin wrapper: options → :class:`xtd.config.EvalConfig` → :func:`xtd.evaluate.evaluate`.
Progress goes to stderr; the table (or ``--json``) is the only thing on stdout.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer
from rich.table import Table

from xtd.cli._app import command
from xtd.config import EvalConfig

EXAMPLES = """
[bold]Examples[/]

  Compare a teacher with students of other tokenizers on held-out text (bits per byte):
    [cyan]xtd eval --model embedded:smollm2 --model runs/demo --held-out 8[/]

  Score a file in 512-token windows and print JSON:
    [cyan]xtd eval --model runs/student --text notes.jsonl --max-length 512 --stride 256 --json[/]

  How close is a student to its teacher? Score both on 64 seeded teacher samples;
  the student's excess bits/byte over the teacher's is KL(teacher ‖ student) per byte:
    [cyan]xtd eval --sample-from embedded:smollm2 --num-samples 64 --samples-out s.jsonl -m embedded:smollm2 -m runs/demo[/]
    [cyan]xtd eval --model runs/other-student --text s.jsonl[/]

  Ensemble two students that share a tokenizer, plus exact match on a task file:
    [cyan]xtd eval --ensemble runs/a,runs/b --held-out 4[/]
    [cyan]xtd eval --model runs/a --task qa.jsonl --max-new-tokens 16[/]
"""


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _finite(value: Any) -> Any:
    """NaN/inf are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="xtd eval", title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("tokenizer", overflow="fold")
    likelihood = any("bits_per_byte" in r for r in rows)
    task = any("exact_match" in r for r in rows)
    if likelihood:
        for name in ("bytes", "tokens", "bits/byte", "token ppl"):
            table.add_column(name, justify="right")
    if task:
        table.add_column("exact match", justify="right")
    for r in rows:
        cells = [r["model"], r["tokenizer"]]
        if likelihood:
            cells += [
                _fmt(r.get("num_bytes"), ","),
                _fmt(r.get("num_tokens"), ","),
                _fmt(r.get("bits_per_byte"), ".4f"),
                _fmt(r.get("token_perplexity"), ".3f"),
            ]
        if task:
            em = r.get("exact_match")
            cells.append("–" if em is None else f"{em:.3f} ({r['task_correct']}/{r['task_examples']})")
        table.add_row(*cells)
    return table


@command("eval", epilog=EXAMPLES)
def eval_command(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model to score (HF id, folder, embedded:smollm2); repeat for one row each."),
    ] = None,
    tokenizer: Annotated[
        list[str] | None,
        typer.Option(help="Tokenizer override: once for all models, or once per --model (default: each model's own)."),
    ] = None,
    text: Annotated[
        str | None, typer.Option(help="Text to score: .txt (one text) or .jsonl (field 'text' per line).")
    ] = EvalConfig.text,
    held_out: Annotated[
        int | None,
        typer.Option(help="Score the last N documents of the embedded corpus (default 8 without --text/--task)."),
    ] = EvalConfig.held_out,
    ensemble: Annotated[
        list[str] | None,
        typer.Option(help="Comma-separated models sharing one tokenizer, scored as an ensemble; repeatable."),
    ] = None,
    combine: Annotated[
        str, typer.Option(help="Ensemble rules, comma-separated: p (mean probability), logp (mean log-prob).")
    ] = ",".join(EvalConfig.combine),
    task: Annotated[
        str | None, typer.Option(help='JSON-lines {"prompt", "answer"} file: exact match of greedy generation.')
    ] = EvalConfig.task,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget per task prompt.")] = EvalConfig.max_new_tokens,
    max_length: Annotated[int, typer.Option(help="Tokens per scoring window.")] = EvalConfig.max_length,
    stride: Annotated[
        int, typer.Option(help="Context tokens each later window carries over from the previous one.")
    ] = EvalConfig.stride,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = EvalConfig.batch_size,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")] = EvalConfig.dtype,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = EvalConfig.device,
    sample_from: Annotated[
        str | None,
        typer.Option(help="Teacher to sample from (temperature 1, seeded); its samples are the text to score."),
    ] = EvalConfig.sample_from,
    num_samples: Annotated[int, typer.Option(help="Teacher samples to draw.")] = EvalConfig.num_samples,
    sample_tokens: Annotated[int, typer.Option(help="Token budget per teacher sample.")] = EvalConfig.sample_tokens,
    sample_seed: Annotated[
        int, typer.Option(help="Seed: same teacher, prompts and seed give the same samples.")
    ] = EvalConfig.sample_seed,
    prompts: Annotated[
        str | None, typer.Option(help="Prompts the samples continue: .txt (one per line) or .jsonl.")
    ] = EvalConfig.prompts,
    samples_out: Annotated[
        str | None, typer.Option(help="Write the teacher samples here (JSON lines; --text scores it later).")
    ] = EvalConfig.samples_out,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")] = False,
) -> None:
    """Bits per byte (tokenizer-independent) and token perplexity of models on held-out text."""
    from transformers.utils import logging as hf_logging

    from xtd.console import console, progress_bar, results
    from xtd.evaluate import evaluate

    hf_logging.disable_progress_bar()  # our own bar is the one progress display

    config = EvalConfig(
        model=tuple(model or ()),
        tokenizer=tuple(tokenizer or ()),
        text=text,
        held_out=held_out,
        ensemble=tuple(ensemble or ()),
        combine=tuple(c.strip() for c in combine.split(",") if c.strip()),
        task=task,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        sample_from=sample_from,
        num_samples=num_samples,
        sample_tokens=sample_tokens,
        sample_seed=sample_seed,
        prompts=prompts,
        samples_out=samples_out,
    )
    with progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def progress(description: str, advance: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = bar.add_task(description, total=total)
            bar.update(tasks[description], advance=advance)

        rows = [row.to_dict() for row in evaluate(config, progress=progress)]
    if config.samples_out is not None:
        console.print(f"wrote {config.num_samples} teacher samples of {config.sample_from} to {config.samples_out}")
    if not rows:
        return
    if as_json:
        clean = [{k: _finite(v) for k, v in row.items()} for row in rows]
        typer.echo(json.dumps({"results": clean, "config": config.to_dict()}, indent=2))
    else:
        results.print(_table(rows))
