"""`xtd align` on the command line: --json shape, the table, --text FILE, --cache, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from xtd.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["align", *args])


def _lines(output: str) -> list[dict]:
    """The per-text records of ``--json`` (one line: ``{"texts": [...]}``)."""
    (line,) = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(line)["texts"]


def test_json_shape_and_content(tok_a_path):
    text = "Hello world!  ✓"
    result = _run("--teacher-tokenizer", str(tok_a_path), "--student-tokenizer", "bytes", text, "--json")
    assert result.exit_code == 0, result.output
    (record,) = _lines(result.stdout)
    assert set(record) == {"teacher", "student", "chunks"}
    raw = text.encode("utf-8")
    assert [t["id"] for t in record["student"]] == list(raw)
    assert {"id", "start", "end"} == set(record["teacher"][0])
    for chunk in record["chunks"]:
        assert set(chunk) == {"teacher", "student", "start", "end"}
        t = record["teacher"][chunk["teacher"][0] : chunk["teacher"][1]]
        s = record["student"][chunk["student"][0] : chunk["student"][1]]
        assert t[0]["start"] == s[0]["start"] == chunk["start"]
        assert t[-1]["end"] == s[-1]["end"] == chunk["end"]
    # a byte student: every teacher token end is a chunk end (docs/method.md, "Worked example")
    assert [c["end"] for c in record["chunks"]] == [t["end"] for t in record["teacher"]]
    assert record["chunks"][-1]["end"] == len(raw)


def test_add_special_tokens_and_table(tmp_path):
    result = _run("--teacher-tokenizer", "embedded:llama3", "--student-tokenizer", "embedded:mistral-v1",
                  "Hi there", "--json", "--add-special-tokens")
    assert result.exit_code == 0, result.output
    (record,) = _lines(result.stdout)
    assert record["teacher"][0] == {"id": 128000, "start": 0, "end": 0}
    assert record["student"][0] == {"id": 1, "start": 0, "end": 0}
    assert record["chunks"][0] == {"teacher": [0, 1], "student": [0, 1], "start": 0, "end": 0}
    result = _run("--teacher-tokenizer", "embedded:gpt2", "--student-tokenizer", "bytes", "Hello world!")
    assert result.exit_code == 0, result.output
    assert "3 chunks" in result.stdout and "world" in result.stdout


def test_input_jsonl(tmp_path, corpus):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(corpus)) + "\n")
    result = _run("--teacher-tokenizer", "embedded:gpt2", "--student-tokenizer", "embedded:mistral-v1",
                  "--text", str(path), "--json")
    assert result.exit_code == 0, result.output
    records = _lines(result.stdout)
    assert len(records) == len(corpus)
    for text, record in zip(corpus, records, strict=True):
        raw = text.encode("utf-8")
        covered = b"".join(raw[c["start"] : c["end"]] for c in record["chunks"])
        assert covered == raw


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--teacher-tokenizer", "no-such-org/no-such-model", "--student-tokenizer", "bytes", "x"],
         "cannot load tokenizer 'no-such-org/no-such-model'"),
        (["--teacher-tokenizer", "bytes", "--student-tokenizer", "bytes"], "give exactly one of"),
        (["--teacher-tokenizer", "bytes", "--student-tokenizer", "bytes", "x", "--text", "f"],
         "give exactly one of"),
        (["--student-tokenizer", "bytes", "x"], "--teacher-tokenizer is required"),
        (["--teacher-tokenizer", "bytes", "--student-tokenizer", "bytes", "--text", "missing.jsonl"],
         "does not exist"),
        (["--teacher-tokenizer", "embedded:nope", "--student-tokenizer", "bytes", "x"],
         "unknown embedded tokenizer"),
    ],
)
def test_errors_are_one_line(args, phrase):
    result = _run(*args)
    assert result.exit_code == 1, result.output
    assert phrase in result.output
    assert "Traceback" not in result.output


def test_bad_jsonl_and_byte_identity(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    result = _run("--teacher-tokenizer", "bytes", "--student-tokenizer", "bytes", "--text", str(path))
    assert result.exit_code == 1 and "line 2 has no string field 'text'" in result.output
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"Hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "ws.json").write_text(tok.to_str())
    result = _run("--teacher-tokenizer", str(tmp_path / "ws.json"), "--student-tokenizer", "bytes", "Hello world")
    assert result.exit_code == 1, result.output
    assert "first bad byte offset 5" in result.output and "ws.json" in result.output
    assert "Traceback" not in result.output


def test_cache_store(tmp_path, tiny_lm, corpus):
    from _stores import make_tiny_store

    from xtd.align import align
    from xtd.storage import list_alignments, open_store, read_alignment, verify_store
    from xtd.tokenization import load_tokenizer

    texts = [t for t in corpus if t][:6]
    url = make_tiny_store(tmp_path, tiny_lm, texts, top_k=2)
    result = runner.invoke(app, ["align", "--cache", str(url), "--student-tokenizer", "embedded:gpt2"])
    assert result.exit_code == 0, result.output
    gpt2 = load_tokenizer("embedded:gpt2")
    assert list_alignments(url) == [gpt2.digest]
    cached = read_alignment(url, gpt2.digest)
    reader = open_store(url)
    assert len(cached) == len(reader) == len(texts)
    for d in range(len(reader)):
        doc, rec = reader[d], cached[d]
        enc = gpt2.encode(bytes(doc.text).decode("utf-8"))
        assert rec["student_ids"].tolist() == enc.ids.tolist()
        t_spans = np.asarray(doc.token_spans).reshape(-1, 2)
        t_special = np.where(t_spans[:, 0] == t_spans[:, 1], 0, -1)
        al = align(t_spans, enc.spans, teacher_special=t_special)
        assert rec["teacher_chunk"].tolist() == al.teacher_chunk.tolist()
        assert rec["student_chunk"].tolist() == al.student_chunk.tolist()
    assert verify_store(url) == []
    again = runner.invoke(app, ["align", "--cache", str(url), "--student-tokenizer", "embedded:gpt2"])
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output  # a Makefile rerun
    assert runner.invoke(app, ["align", "--cache", str(url), "--student-tokenizer", "embedded:gpt2", "--overwrite"]).exit_code == 0
    wrong = runner.invoke(app, ["align", "--cache", str(url), "--student-tokenizer", "bytes", "--teacher-tokenizer", "embedded:gpt2"])
    assert wrong.exit_code == 1 and "is not the tokenizer store" in wrong.output
    missing = runner.invoke(app, ["align", "--cache", str(tmp_path / "nope"), "--student-tokenizer", "bytes"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
