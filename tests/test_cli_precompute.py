"""``xtd precompute`` on the command line: defaults, help, one-line errors, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _stores import tree_digest
from typer.testing import CliRunner

from xtd.cli import app
from xtd.storage import open_store

runner = CliRunner()


def _run(*args: str):  # noqa: ANN202
    return runner.invoke(app, ["precompute", *args])


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _one_error_line(result, phrase: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert phrase in " ".join(result.output.split()), result.output
    assert result.output.count("error:") == 1


def test_help_explains_windows_and_has_examples() -> None:
    result = runner.invoke(app, ["precompute", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "scored exactly once" in text and "nothing is truncated" in text
    assert text.count("xtd precompute") >= 3 and "torchrun" in text


def test_cli_writes_a_store_and_resumes(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    data = _jsonl(tmp_path / "d.jsonl", ["first text", "", "second text\twith tab"])
    out = tmp_path / "store"
    args = ["--teacher", str(tiny_lm), "--data", str(data), "--out", str(out), "--top-k", "3"]
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["documents_written"] == 2 and summary["empty_documents"] == 1 and summary["complete"]
    again = _run(*args)
    assert again.exit_code == 0 and "2 already committed" in " ".join(again.output.split())
    assert len(open_store(str(out))) == 2


def test_bad_input_is_one_line_and_leaves_committed_data(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    data = _jsonl(tmp_path / "d.jsonl", ["some text", "more text"])
    out = tmp_path / "store"
    base = ["--teacher", str(tiny_lm), "--out", str(out)]
    assert _run(*base, "--data", str(data), "--top-k", "2").exit_code == 0
    before = tree_digest(out)

    _one_error_line(_run("--teacher", "no-org/no-model-xtd", "--data", str(data), "--out", str(out)), "not in the Hugging Face cache")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    _one_error_line(_run(*base, "--data", str(nofield)), "'body', 'id'")
    _one_error_line(_run(*base, "--data", str(data), "--text-field", "body"), "no field 'body'")
    _one_error_line(_run(*base, "--data", str(_jsonl(tmp_path / "empty.jsonl", [])), "--top-k", "2"), "is empty")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\n\xc3(")
    _one_error_line(_run(*base, "--data", str(bad)), "byte 4")
    _one_error_line(_run(*base, "--data", str(data), "--top-k", "100000"), "larger than the teacher vocabulary")
    _one_error_line(_run(*base, "--data", str(data), "--top-k", "5"), "other settings")
    _one_error_line(_run(*base, "--data", str(data), "--stride", "4096"), "--stride (4096)")
    _one_error_line(_run(*base, "--data", str(data), "--rank", "1"), "--world-size")
    assert tree_digest(out) == before
    assert _run(*base, "--data", str(data), "--top-k", "5", "--overwrite").exit_code == 0


def _committed(out: Path) -> int:
    meta = out / "part-00000" / "zarr.json"
    if not meta.exists():
        candidates = sorted(out.glob("part-*/zarr.json"))
        if not candidates:
            return 0
        meta = candidates[0]
    try:
        attrs = json.loads(meta.read_text())["attributes"]
    except (json.JSONDecodeError, KeyError):
        return 0
    return int(attrs.get("xtd_part", {}).get("documents_committed", 0))


@pytest.mark.slow
def test_sigkill_then_same_command_equals_uninterrupted_run(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    words = "the quick brown fox jumps over lazy dogs while kings and queens sleep".split()
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) for _ in range(120)]
    data = _jsonl(tmp_path / "d.jsonl", texts)
    common = ["--teacher", str(tiny_lm), "--data", str(data), "--top-k", "4", "--batch-tokens", "128", "--shard-tokens", "300"]
    ref = tmp_path / "ref"
    assert _run(*common, "--out", str(ref)).exit_code == 0
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xtd", "-q", "precompute", *common, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while _committed(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed; give it more data"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = _committed(out)
    assert 0 < killed_at < len(texts)
    result = _run(*common, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["documents_resumed"] == killed_at and summary["complete"]
    a, b = open_store(str(ref)), open_store(str(out))
    assert len(a) == len(b) == len(texts)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.text == y.text and x.doc_index == y.doc_index
        for name in ("token_ids", "token_spans", "token_logprob", "boundary_logmass", "topk_ids", "topk_logprobs", "tail_logmass"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)


@pytest.mark.slow
def test_sigint_exits_130_with_message(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    # Far more text than the run gets through before the signal, which is sent once the
    # teacher has loaded and a shard is committed (or 5 s have passed; the whole run takes
    # ~25 s here): it lands mid-run whatever the machine's load.
    texts = ["lorem ipsum dolor sit amet " * 8] * 2000
    data = _jsonl(tmp_path / "d.jsonl", texts)
    out = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # A shell that starts jobs in the background (nohup …&, some CI runners) passes SIGINT
    # on as ignored, and Python keeps it ignored: restore Ctrl-C's KeyboardInterrupt in
    # the child, as a terminal would have it.
    ctrl_c = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from xtd.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", ctrl_c, "precompute", "--teacher", str(tiny_lm), "--data", str(data),
         "--out", str(out), "--batch-tokens", "128", "--shard-tokens", "300"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    pump = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    pump.start()
    deadline = time.monotonic() + 240
    while not any("loaded in" in line for line in lines) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    loaded = time.monotonic()
    while _committed(out) == 0 and proc.poll() is None and time.monotonic() - loaded < 5.0:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the test could interrupt it: " + "".join(lines)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    pump.join(timeout=10)
    proc.stderr.close()
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    reader = open_store(str(out))
    assert not reader.complete and len(reader) > 0
