"""Pipeline-friendly reruns: every command twice in a row, as a Makefile reruns it.

The second run of each command exits 0; the commands that write (precompute,
``align --cache``, train) say there is nothing to do and change no file. Settings are
compared canonically: a relative and an absolute path to one store are the same, and a
moved run folder resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _stores import tree_digest
from test_faults import TEXTS
from typer.testing import CliRunner

from xtd.cli import app

runner = CliRunner()

TRAIN = ["--lora-rank", "0", "--max-steps", "2", "--warmup-steps", "0", "--batch-size", "2", "--max-student-length", "32",
         "--json"]


def _invoke(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_every_command_twice_in_a_row(tiny_lm: Path, tiny_lm_b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    Path("held.txt").write_text(TEXTS[0])
    pipeline = {
        "precompute": ["precompute", "--teacher", str(tiny_lm), "--data", "data.jsonl", "--out", "store", "--top-k", "2"],
        "verify": ["verify", "store"],
        "inspect": ["inspect", "store", "--rows", "3"],
        "align": ["align", "--cache", "store", "--student-tokenizer", str(tiny_lm_b)],
        "train": ["train", "--store", "store", "--student", str(tiny_lm_b), "--out", "run", *TRAIN],
        "eval": ["eval", "--model", "run", "--text", "held.txt"],
    }
    for verb, args in pipeline.items():
        _invoke(args)
        before = tree_digest(tmp_path)
        second = _invoke(args)
        if verb in ("precompute", "align", "train"):
            assert "nothing to do" in second or '"nothing_to_do": true' in second, (verb, second)
        assert tree_digest(tmp_path) == before, f"the second {verb} changed files"
    # The same settings spelled differently: absolute paths to the same store and data.
    before = tree_digest(tmp_path)
    absolute = {"store": str(tmp_path / "store"), "data.jsonl": str(tmp_path / "data.jsonl")}
    assert "nothing to do" in _invoke([absolute.get(a, a) for a in pipeline["precompute"]])
    assert '"nothing_to_do": true' in _invoke([absolute.get(a, a) for a in pipeline["train"]])
    assert tree_digest(tmp_path) == before


def test_a_moved_run_folder_resumes(tiny_lm: Path, tiny_lm_b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    _invoke(["precompute", "--teacher", str(tiny_lm), "--data", "data.jsonl", "--out", "store", "--top-k", "0"])
    args = ["train", "--student", str(tiny_lm_b), *TRAIN, "--checkpoint-every", "1"]
    _invoke([*args, "--store", "store", "--out", "first"])
    shutil.move("first", "moved")
    more = list(args)
    more[more.index("--max-steps") + 1] = "3"
    # Elsewhere now, and the store named by its absolute path: the same run, resumed.
    out = _invoke([*more, "--store", str(tmp_path / "store"), "--out", str(tmp_path / "moved"), "--resume"])
    assert '"steps": 3' in out
    steps = [json.loads(line)["step"] for line in Path("moved/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
