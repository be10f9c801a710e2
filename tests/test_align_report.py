"""`xtd align --report`: the number-tokenisation audit, checked against a hand-computed example.

The pair: the built-in ``bytes`` tokenizer (one token per byte) as teacher, and a
hand-made byte-level BPE as student whose four merges are 1+2, 3+4, Ġ+6, Ġ6+7
(Ġ = space), on the text ``"12345 + 678 = 12 7"`` (18 bytes). The student cuts it as

    12 | 34 | 5 | ␠ | + | ␠67 | 8 | ␠ | = | ␠ | 12 | ␠ | 7      (13 tokens)

and, the teacher ending a token at every byte, these 13 tokens are also the chunks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from xtd.align import align
from xtd.align_report import AlignmentSample, report_alignments
from xtd.cli import app
from xtd.tokenization import load_tokenizer

runner = CliRunner()
TEXT = "12345 + 678 = 12 7"


@pytest.fixture(scope="module")
def merges_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json of the hand-made student BPE (module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("1", "2"), ("3", "4"), ("Ġ", "6"), ("Ġ6", "7")]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path_factory.mktemp("merges") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hand_made_student_cuts_as_documented(merges_tokenizer: Path) -> None:
    student = load_tokenizer(merges_tokenizer)
    views = [student.token_bytes[i] for i in student.encode(TEXT).ids]
    assert views == [b"12", b"34", b"5", b" ", b"+", b" 67", b"8", b" ", b"=", b" ", b"12", b" ", b"7"]


def test_cli_json_matches_hand_computed_numbers(merges_tokenizer: Path) -> None:
    result = runner.invoke(
        app, ["align", "--report", "--teacher-tokenizer", "bytes", "--student-tokenizer", str(merges_tokenizer),
              TEXT, "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["texts"] == 1 and report["bytes"] == 18
    assert report["chunks"] == 13 and report["slot_chunks"] == 0
    assert report["bytes_per_chunk"] == pytest.approx(18 / 13)
    t, s = report["teacher"], report["student"]
    assert t["tokens"] == 18 and s["tokens"] == 13
    # Teacher tokens per chunk: 12→2, 34→2, ␠67→3, 12→2, the other nine chunks 1.
    assert t["tokens_per_chunk_histogram"] == {"1": 9, "2": 3, "3": 1, "4+": 0}
    assert t["tokens_per_chunk"] == pytest.approx(18 / 13) and t["max_tokens_per_chunk"] == 3
    assert s["tokens_per_chunk_histogram"] == {"1": 13, "2": 0, "3": 0, "4+": 0}
    assert report["one_to_one_chunks"] == 9
    # 11 digits; those of "12", "34", "67" (in ␠67) and the second "12" lie in multi-token chunks.
    assert report["digit_bytes"] == 11 and report["digit_bytes_in_multi_token_chunks"] == 8
    assert report["digit_share_in_multi_token_chunks"] == pytest.approx(8 / 11)
    # Numbers 12345, 678, 12, 7: teacher 5+3+2+1 tokens; student 3 (12·34·5) + 2 (␠67·8) + 1 + 1.
    assert report["numbers"] == 4
    assert t["tokens_per_number"] == pytest.approx(11 / 4) and s["tokens_per_number"] == pytest.approx(7 / 4)
    # Interior cuts: 12345 {1,2,3,4} vs {2,4}; 678 {9,10} vs {10}; 12 {15} vs {}; 7 none on either side.
    assert report["numbers_split_differently"] == 3
    assert report["merge"] is None


def test_merge_groups_hand_computed(merges_tokenizer: Path) -> None:
    teacher, student = load_tokenizer("bytes"), load_tokenizer(merges_tokenizer)
    a, b = teacher.encode(TEXT), student.encode(TEXT)
    al = align(a.spans, b.spans)
    # σ^T after each teacher row (= byte): 0.5 before a space and at the end, 0.3 after
    # the "2" of 12345, 0.01 elsewhere. Kept chunks (last row's mass > γ = 0.1):
    # 12 | 5 | + | 8 | = | 12 | 7 → groups {12} {34 5} {␠ +} {␠67 8} {␠ =} {␠ 12} {␠ 7}.
    mass = np.full(len(TEXT), 0.01)
    mass[[4, 6, 10, 12, 15, 17]] = 0.5
    mass[1] = 0.3
    sample = AlignmentSample(
        text=TEXT.encode(), teacher_spans=a.spans, student_spans=b.spans, teacher_chunk=al.teacher_chunk,
        student_chunk=al.student_chunk, chunk_bytes=al.chunk_bytes, chunk_slot=al.chunk_slot,
        teacher_sigma=np.log(mass),
    )
    merge = report_alignments([sample], teacher="bytes", student="bpe", merge_threshold=0.1).to_dict()["merge"]
    assert merge["groups"] == 7
    assert merge["chunks_per_group_histogram"] == {"1": 1, "2": 6, "3": 0, "4+": 0}
    assert merge["chunks_per_group"] == pytest.approx(13 / 7)
    assert merge["teacher_tokens_per_group"] == pytest.approx(18 / 7)
    assert merge["student_tokens_per_group"] == pytest.approx(13 / 7)
    # Only the digits of the first "12" sit in a one-chunk group.
    assert merge["digit_bytes_in_merged_groups"] == 9
    # γ above every mass: one group of all 13 chunks.
    none_kept = report_alignments([sample], teacher="t", student="s", merge_threshold=0.6).to_dict()["merge"]
    assert none_kept["groups"] == 1 and none_kept["chunks_per_group_histogram"]["4+"] == 1


def test_same_tokenizer_is_all_one_to_one() -> None:
    text = "Sam buys 7 * 13 = 91 pens.\n#### 91"
    result = runner.invoke(app, ["align", "--report", "--teacher-tokenizer", "embedded:llama3",
                                 "--student-tokenizer", "embedded:llama3", text, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["one_to_one_share"] == 1.0
    assert report["numbers_split_differently"] == 0
    assert report["digit_bytes_in_multi_token_chunks"] == 0


def test_table_and_store_report(tmp_path: Path, tiny_lm: Path, merges_tokenizer: Path) -> None:
    from _stores import make_tiny_store

    from xtd.storage import open_store

    texts = ["Tom has 1234 apples.\n#### 1234", "12345 + 678 = 13023", "no digits here"]
    url = make_tiny_store(tmp_path, tiny_lm, texts, top_k=0)
    result = runner.invoke(app, ["align", "--report", "--store", str(url), "--student-tokenizer", str(merges_tokenizer),
                                 "--json", "--merge-threshold", "0.2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    reader = open_store(url)
    assert report["texts"] == len(reader) == 3
    assert report["bytes"] == sum(len(t.encode()) for t in texts)
    assert report["digit_bytes"] == sum(ch.isdigit() for t in texts for ch in t)
    merge = report["merge"]
    assert merge["merge_threshold"] == 0.2
    assert 1 <= merge["groups"] <= report["chunks"]
    assert sum(merge["chunks_per_group_histogram"].values()) == merge["groups"]
    assert merge["teacher_tokens_per_group"] * merge["groups"] == pytest.approx(report["teacher"]["tokens_in_chunks"])
    # The printed table carries the same numbers.
    table = runner.invoke(app, ["align", "--report", "--store", str(url), "--student-tokenizer", str(merges_tokenizer)])
    assert table.exit_code == 0, table.output
    assert "numbers split at different places" in table.stdout and "γ = 0.1" in table.stdout
    assert f"{report['numbers']:,}" in table.stdout


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--student-tokenizer", "bytes", "1"], "--teacher-tokenizer is required"),
        (["--teacher-tokenizer", "bytes", "--student-tokenizer", "bytes"], "needs exactly one of"),
        (["--student-tokenizer", "bytes", "--cache", "x"], "not --cache"),
        (["--student-tokenizer", "bytes", "--store", "missing-store"], "missing-store"),
        (["--teacher-tokenizer", "bytes", "--student-tokenizer", "bytes", "1", "--merge-threshold", "1.5"],
         "--merge-threshold (1.5) must be in [0, 1)"),
    ],
)
def test_report_errors_are_one_line(args: list[str], phrase: str) -> None:
    result = runner.invoke(app, ["align", "--report", *args])
    assert result.exit_code == 1, result.output
    assert phrase in result.output and "Traceback" not in result.output


def test_store_without_report_is_refused() -> None:
    result = runner.invoke(app, ["align", "--student-tokenizer", "bytes", "--store", "x"])
    assert result.exit_code == 1 and "--store is the corpus of --report" in result.output


def test_empty_corpus_gives_none_not_nan() -> None:
    report = report_alignments([], teacher="a", student="b").to_dict()
    assert report["chunks"] == 0 and report["bytes_per_chunk"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in report.values())
