"""``xtd maths``: write generated grade-school word problems as xtd data and task files.

A thin wrapper: options generated from :class:`xtd.config.MathsConfig` → :func:`xtd.maths.write_dataset`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from xtd.cli._options import config_command
from xtd.config import MathsConfig
from xtd.console import results
from xtd.maths import write_dataset

EXAMPLES = """
[bold]Examples[/]

  Write the default splits, then distil on them and score exact match:
    [cyan]xtd maths --out maths[/]
    [cyan]xtd precompute --data maths/train.jsonl --out runs/maths/teacher.zarr --top-k 0[/]
    [cyan]xtd eval --model runs/maths/student --task maths/test-tasks.jsonl --max-new-tokens 128[/]

  More problems, another seed, prompts for a plain-text store (precompute --chat-template never):
    [cyan]xtd maths --out maths-big --train 20000 --test 500 --seed 1 --chat-tokenizer none[/]
"""


@config_command("maths", MathsConfig, epilog=EXAMPLES)
def maths_command(
    config: MathsConfig,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the written files as one line of JSON.")] = False,
) -> None:
    """Write maths word problems with worked solutions: chat records for --data, a task file for xtd eval.

    Every solution ends with the line '#### <answer>'; exact match reads the number after
    the first '####' (xtd eval --task scores test-tasks.jsonl that way). No test question
    is a training or validation question; half of the test problems use wordings that no
    training or validation problem uses.
    """
    written = write_dataset(config)
    if as_json:
        typer.echo(json.dumps({name: str(path) for name, path in written.items()}))
        return
    for name, path in written.items():
        results.print(f"{name}: {path}", highlight=False)
