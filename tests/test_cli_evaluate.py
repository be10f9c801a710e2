"""`xtd eval` through typer's CliRunner: table and JSON, several models, ensembles, exact
match, and one clear error line for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xtd.cli import app

runner = CliRunner()

TEXT = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune — 你好 👍\n"
)


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "held.txt"
    path.write_text(TEXT * 3)
    return path


def _json(args: list[str]) -> list[dict]:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


def _fails(args: list[str], phrase: str) -> None:
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 1, result.output
    assert phrase in result.output
    assert "Traceback" not in result.output


def test_help_has_examples():
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "--held-out" in result.output


def test_table_with_two_models_of_different_tokenizers(tiny_lm: Path, tiny_lm_b: Path, text_file: Path):
    result = runner.invoke(app, ["eval", "--model", str(tiny_lm), "--model", str(tiny_lm_b), "--text", str(text_file)])
    assert result.exit_code == 0, result.output
    assert "bits/byte" in result.stdout and "token ppl" in result.stdout
    rows = _json(["--model", str(tiny_lm), "--model", str(tiny_lm_b), "--text", str(text_file)])
    assert [r["model"] for r in rows] == [str(tiny_lm), str(tiny_lm_b)]
    # bits per byte divides by the same bytes for both tokenizers
    assert rows[0]["num_bytes"] == rows[1]["num_bytes"] == len((TEXT * 3).encode())
    assert rows[0]["num_tokens"] > rows[1]["num_tokens"]  # 400 vs 700 entries


def test_whole_equals_windowed_through_the_cli(tiny_lm: Path, text_file: Path):
    whole = _json(["--model", str(tiny_lm), "--text", str(text_file), "--max-length", "4096", "--stride", "1"])[0]
    full = whole["num_tokens"] + 1  # the BOS is part of the window
    windowed = _json(
        ["--model", str(tiny_lm), "--text", str(text_file), "--max-length", str(full), "--stride", "7", "--batch-size", "3"]
    )[0]
    assert windowed["bits_per_byte"] == pytest.approx(whole["bits_per_byte"], rel=1e-6)
    short = _json(["--model", str(tiny_lm), "--text", str(text_file), "--max-length", "16", "--stride", "8"])[0]
    assert short["num_tokens"] == whole["num_tokens"] and short["num_bytes"] == whole["num_bytes"]


def test_jsonl_text_and_held_out(tiny_lm: Path, tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ("alpha beta", "gamma\n", "")) + "\n")
    row = _json(["--model", str(tiny_lm), "--text", str(path)])[0]
    assert row["num_texts"] == 3 and row["num_bytes"] == len("alpha betagamma\n")
    held = _json(["--model", str(tiny_lm), "--held-out", "1", "--max-length", "256", "--stride", "128"])[0]
    assert held["num_texts"] == 1 and held["num_bytes"] > 1000


def test_ensemble_rows(tiny_lm: Path, tmp_path: Path, text_file: Path):
    twin = tmp_path / "twin"
    shutil.copytree(tiny_lm, twin)
    rows = _json(["--ensemble", f"{tiny_lm},{twin}", "--text", str(text_file), "--model", str(tiny_lm)])
    assert [r["model"].rsplit(" ", 1)[-1] for r in rows[1:]] == ["(p)", "(logp)"]
    for r in rows[1:]:  # an ensemble of a model with itself is the model
        assert r["bits_per_byte"] == pytest.approx(rows[0]["bits_per_byte"], rel=1e-6)
    only_p = _json(["--ensemble", f"{tiny_lm},{twin}", "--text", str(text_file), "--combine", "p"])
    assert len(only_p) == 1


def test_exact_match_task(tiny_lm: Path, tmp_path: Path):
    task = tmp_path / "qa.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": p, "answer": "zzz"}) for p in ("2+2=", "Hello")) + "\n")
    result = runner.invoke(app, ["eval", "--model", str(tiny_lm), "--task", str(task), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "exact match" in result.stdout
    row = _json(["--model", str(tiny_lm), "--task", str(task), "--max-new-tokens", "3"])[0]
    assert row["task_examples"] == 2 and row["exact_match"] == 0.0
    assert "bits_per_byte" not in row  # --task alone runs no likelihood eval


def test_errors_are_one_line(tiny_lm: Path, tiny_lm_b: Path, tok_b_path: Path, tmp_path: Path, text_file: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _fails(["--model", str(tiny_lm), "--text", str(empty)], "is empty")
    _fails(["--model", str(tiny_lm), "--text", str(tmp_path / "nope.txt")], "does not exist")
    # a tokenizer with more ids than the model's embedding table
    _fails(["--model", str(tiny_lm), "--tokenizer", str(tok_b_path), "--text", str(text_file)], "embedding rows")
    # a model folder without a tokenizer
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_lm / name, bare / name)
    _fails(["--model", str(bare), "--text", str(text_file)], "has no tokenizer")
    _fails(["--model", str(tmp_path / "missing"), "--text", str(text_file)], "cannot load model")
    _fails(["--ensemble", f"{tiny_lm},{tiny_lm_b}", "--text", str(text_file)], "do not share a tokenizer")
    _fails(["--model", str(tiny_lm), "--stride", "9", "--max-length", "8"], "--stride (9)")
    _fails(["--model", str(tiny_lm), "--text", str(text_file), "--held-out", "2"], "not both")
    _fails(["--text", str(text_file)], "nothing to evaluate")
    _fails(["--ensemble", str(tiny_lm), "--text", str(text_file)], "at least two models")
    _fails(["--model", str(tiny_lm), "--combine", "mean"], "--combine")
