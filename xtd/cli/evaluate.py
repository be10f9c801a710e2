"""``xtd eval``: bits per byte, ensembles and exact match, as a table or JSON.

A thin wrapper: options generated from :class:`xtd.config.EvalConfig` →
:func:`xtd.evaluate.evaluate`. Progress goes to stderr; the table (or ``--json``) is the
only thing on stdout. ``--json`` prints one line, the same shape whatever the text:
``{"results": [row, ...], "config": {...}}``, a row holding ``model``, ``tokenizer`` and,
when text was scored, ``num_texts``, ``num_bytes``, ``num_tokens``, ``nll_nats``,
``bits_per_byte``, ``token_perplexity`` (null for NaN), with ``--task`` ``exact_match``,
``task_examples``, ``task_correct``.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer
from rich.table import Table

from xtd.cli._options import config_command
from xtd.config import EvalConfig
from xtd.console import console, progress_bar, results

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

  Benchmarks through lm-evaluation-harness (offline: xtd's held-out next-verse/next-line tasks):
    [cyan]xtd eval --model runs/student --model runs/byte --ensemble runs/a,runs/b --tasks xtd_next_verse,xtd_next_line[/]
    [cyan]xtd eval --model runs/student --tasks arc_easy,piqa --task-limit 200[/]   # lm-eval's own tasks (needs the hub)
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
    benchmarks = list(dict.fromkeys(name for r in rows for name in (r.get("tasks") or {})))
    for name in benchmarks:
        table.add_column(f"{name}\nacc/byte (acc)", justify="right")
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
        for name in benchmarks:
            m = (r.get("tasks") or {}).get(name, {})
            main = m.get("acc_bytes", m.get("acc_norm", m.get("acc")))
            cells.append(f"{_fmt(main, '.3f')} ({_fmt(m.get('acc'), '.3f')}, n={m.get('num_examples', 0)})" if m else "–")
        table.add_row(*cells)
    return table


@config_command("eval", EvalConfig, epilog=EXAMPLES)
def eval_command(
    config: EvalConfig,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the results as one line of JSON.")] = False,
) -> None:
    """Bits per byte (tokenizer-independent) and token perplexity of models on held-out text."""
    from transformers.utils import logging as hf_logging

    from xtd.evaluate import evaluate

    hf_logging.disable_progress_bar()  # our own bar is the one progress display

    with progress_bar() as bar:
        bars: dict[str, Any] = {}

        def progress(description: str, advance: int, total: int) -> None:
            if description not in bars:
                bars[description] = bar.add_task(description, total=total)
            bar.update(bars[description], advance=advance)

        rows = [row.to_dict() for row in evaluate(config, progress=progress)]
    if config.samples_out is not None:
        console.print(f"wrote {config.num_samples} teacher samples of {config.sample_from} to {config.samples_out}")
    if as_json:
        clean = [{k: _finite(v) for k, v in row.items()} for row in rows]
        typer.echo(json.dumps({"results": clean, "config": config.to_dict()}))
    elif rows:
        results.print(_table(rows))
