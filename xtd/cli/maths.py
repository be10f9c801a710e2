"""``xtd maths``: write generated grade-school word problems as xtd data and task files.

A thin wrapper: options → :class:`xtd.config.MathsConfig` → :func:`xtd.maths.write_dataset`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from xtd.cli._app import command
from xtd.config import MathsConfig

EXAMPLES = """
[bold]Examples[/]

  Write the default splits, then distil on them and score exact match:
    [cyan]xtd maths --out maths[/]
    [cyan]xtd precompute --data maths/train.jsonl --out runs/maths/teacher.zarr --top-k 0[/]
    [cyan]xtd eval --model runs/maths/student --task maths/test-tasks.jsonl --max-new-tokens 128[/]

  More problems, another seed, prompts for a plain-text store (precompute --chat-template never):
    [cyan]xtd maths --out maths-big --train 20000 --test 500 --seed 1 --chat-tokenizer none[/]
"""


@command("maths", epilog=EXAMPLES)
def maths_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for the .jsonl files.")],
    train: Annotated[int, typer.Option("--train", help="Training problems.")] = MathsConfig.train,
    validation: Annotated[int, typer.Option("--validation", help="Validation problems.")] = MathsConfig.validation,
    test: Annotated[int, typer.Option("--test", help="Test problems (half in held-out wordings).")] = MathsConfig.test,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every split.")] = MathsConfig.seed,
    chat_tokenizer: Annotated[
        str,
        typer.Option("--chat-tokenizer", help="Tokenizer whose chat template renders the records for the teacher "
                     "(defines the task prompts); 'none' = plain 'role: content' lines."),
    ] = MathsConfig.chat_tokenizer,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files.")] = MathsConfig.overwrite,
) -> None:
    """Write maths word problems with worked solutions: chat records for --data, a task file for xtd eval.

    Every solution ends with the line '#### <answer>'; exact match reads the number after
    the first '####' (xtd eval --task scores test-tasks.jsonl that way). No test question
    is a training or validation question; half of the test problems use wordings that no
    training or validation problem uses.
    """
    from xtd.maths import write_dataset

    config = MathsConfig(out=str(out), train=train, validation=validation, test=test, seed=seed,
                         chat_tokenizer=chat_tokenizer, overwrite=overwrite)
    written = write_dataset(config)
    typer.echo(json.dumps({name: str(path) for name, path in written.items()}))
