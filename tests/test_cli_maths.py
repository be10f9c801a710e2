"""`xtd maths` on the command line: the files it writes, their use by precompute and eval, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xtd.cli import app
from xtd.data import DataSource
from xtd.maths import generate

runner = CliRunner()


def test_writes_splits_and_a_task_file(tmp_path: Path, tiny_lm: Path) -> None:
    out = tmp_path / "maths"
    result = runner.invoke(app, ["maths", "--out", str(out), "--train", "12", "--validation", "3", "--test", "4",
                                 "--seed", "5", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert set(written) == {"train", "validation", "test", "tasks"}
    train = list(DataSource(str(out / "train.jsonl")))
    assert len(train) == 12 and train[0].messages is not None
    assert train[0].messages[-1]["content"] == generate("train", 1, seed=5)[0].solution
    tasks = [json.loads(line) for line in (out / "test-tasks.jsonl").read_text().splitlines()]
    assert [t["answer"] for t in tasks] == [p.answer for p in generate("test", 4, seed=5)]
    assert all(t["answer_format"] == "final-number" and t["prompt"].endswith("assistant\n") for t in tasks)
    # The task file is an `xtd eval --task` file as it stands.
    evaluated = runner.invoke(app, ["eval", "--model", str(tiny_lm), "--task", str(out / "test-tasks.jsonl"),
                                    "--max-new-tokens", "4", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    (row,) = json.loads(evaluated.stdout)["results"]
    assert row["task_examples"] == 4 and row["exact_match"] == 0.0  # a random model answers nothing
    again = runner.invoke(app, ["maths", "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output and "Traceback" not in again.output
    plain = runner.invoke(app, ["maths", "--out", str(out), "--chat-tokenizer", "none", "--overwrite", "--test", "2"])
    assert plain.exit_code == 0, plain.output
    assert json.loads((out / "test-tasks.jsonl").read_text().splitlines()[0])["prompt"].startswith("system: ")


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--out", "x", "--train", "-1"], "--train (-1) must be >= 0"),
        (["--out", "x", "--chat-tokenizer", "embedded:nope"], "unknown embedded tokenizer"),
    ],
)
def test_errors_are_one_line(args: list[str], phrase: str, tmp_path: Path) -> None:
    result = runner.invoke(app, ["maths", *[a.replace("x", str(tmp_path / "o")) if a == "x" else a for a in args]])
    assert result.exit_code == 1, result.output
    assert phrase in result.output and "Traceback" not in result.output


def test_help_has_examples() -> None:
    result = runner.invoke(app, ["maths", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert " ".join(result.output.split()).count("xtd maths") >= 2
