"""The ``xtd`` application itself: --version, -h, -q/-v on either side of the verb, usage
errors as one line with exit 1, and progress lines where stderr is no terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xtd import __version__
from xtd.cli import app

runner = CliRunner()


def test_version_and_short_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"xtd {__version__}"
    for verb in ("precompute", "train", "inspect", "verify", "align", "eval"):
        result = runner.invoke(app, [verb, "-h"])
        assert result.exit_code == 0 and "Usage: xtd " + verb in " ".join(result.output.split()), verb
        assert "--quiet" in result.output and "--verbose" in result.output, verb


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["train", "--store", "s", "--out", "o", "--max-steps", "two"], "'--max-steps'"),
        (["train", "--out", "o"], "--store is required"),
        (["precompute", "--out", "o", "--bogus"], "No such option: --bogus"),
        (["no-such-verb"], "No such command 'no-such-verb'"),
        (["inspect"], "Missing argument"),
    ],
)
def test_usage_errors_are_one_line_with_exit_1(args: list[str], phrase: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "╭" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], result.output
    assert "--help" in lines[0]


def _store_args(tiny_lm: Path, tmp_path: Path) -> list[str]:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i} " * 20}) + "\n" for i in range(6)))
    return ["precompute", "--teacher", str(tiny_lm), "--data", str(data), "--top-k", "0", "--batch-tokens", "64"]


def test_progress_lines_on_a_non_terminal_and_quiet_after_the_verb(
    tiny_lm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xtd.console

    monkeypatch.setattr(xtd.console, "PROGRESS_LINE_SECONDS", 0.0)  # a line at every update
    result = runner.invoke(app, [*_store_args(tiny_lm, tmp_path), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("documents ")]
    assert len(lines) >= 3, result.output  # per forward batch, not only per document
    assert all("tokens" in line and "tok/s" in line and "elapsed" in line for line in lines), lines
    assert any("ETA" in line for line in lines) and "documents 6/6 (100%)" in lines[-1], lines
    quiet = runner.invoke(app, [*_store_args(tiny_lm, tmp_path), "--out", str(tmp_path / "b"), "-q"])
    assert quiet.exit_code == 0 and not [ln for ln in quiet.output.splitlines() if ln.startswith("documents ")]
    assert "INFO" not in quiet.output  # -q after the verb: warnings and results only
    verbose = runner.invoke(app, [*_store_args(tiny_lm, tmp_path), "--out", str(tmp_path / "b"), "-v"])
    assert verbose.exit_code == 0 and "nothing to do" in verbose.output
