"""xtd.evaluate: bits per byte (whole vs windowed, against a naive reference), ensembles,
exact match, input checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from xtd.errors import ConfigError, DataError, TokenizerMismatchError
from xtd.evaluate import (
    _prepare,
    _windows,
    bits_per_byte,
    check_shared_tokenizer,
    ensemble_bits_per_byte,
    exact_match,
    score_windows,
)
from xtd.student import load_causal_lm
from xtd.texts import held_out_texts, read_tasks, read_texts
from xtd.tokenization import load_tokenizer

TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "Emoji: 👩‍👩‍👧‍👦 family — CJK: 你好，世界。",
    "a",
    "",
    "def f(x):\n    return [i for i in range(x)]\n" * 3,
]


@pytest.fixture(scope="module")
def lm_a(tiny_lm: Path):
    return load_causal_lm(tiny_lm)


@pytest.fixture(scope="module")
def tok_a_bt(tiny_lm: Path):
    return load_tokenizer(str(tiny_lm))


def _naive_nll(model, seq: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:
    """Slow, obvious reference: score each target position with its own forward pass over
    the context that its window gives it (each later window starts ``stride`` tokens before
    the previous one ended)."""
    total, count = 0.0, 0
    for pos in range(1, len(seq)):
        # The window that scores `pos` is the first one whose end passes it.
        begin, end = 0, min(max_length, len(seq))
        while end <= pos:
            begin = end - stride
            end = min(begin + max_length, len(seq))
        context = torch.from_numpy(seq[begin : pos + 1])[None]
        with torch.no_grad():
            logits = model(input_ids=context).logits[0, -2].double()
        total -= float(logits.log_softmax(-1)[int(seq[pos])])
        count += 1
    return total, count


def test_windows_score_each_position_once_with_enough_context():
    for length in range(0, 40):
        for max_length in (2, 3, 5, 8, 64):
            for stride in range(1, max_length):
                scored = []
                for begin, end, first in _windows(length, max_length, stride):
                    assert end - begin <= max_length
                    assert begin < first <= end
                    for pos in range(first, end):
                        scored.append(pos)
                        # context of every scored position: all earlier tokens of its window
                        assert pos - begin >= min(pos, stride)
                assert scored == list(range(1, length)), (length, max_length, stride)


def test_whole_equals_windowed_with_full_context(lm_a, tok_a_bt):
    """Must show: identical bits per byte whether a text is scored whole or in windows
    that cover its full context."""
    longest = max(len(s) for s in _prepare(tok_a_bt, TEXTS).seqs)
    whole = bits_per_byte(lm_a, tok_a_bt, TEXTS, max_length=4096, stride=1)
    for max_length, stride in ((longest, 1), (longest, longest // 2), (longest + 5, 3)):
        windowed = bits_per_byte(lm_a, tok_a_bt, TEXTS, max_length=max_length, stride=stride)
        assert windowed.num_tokens == whole.num_tokens
        assert windowed.bits_per_byte == pytest.approx(whole.bits_per_byte, rel=1e-6, abs=1e-9)
    # Batching pads windows to a common length; the result must not move.
    batched = bits_per_byte(lm_a, tok_a_bt, TEXTS, max_length=4096, stride=1, batch_size=4)
    assert batched.bits_per_byte == pytest.approx(whole.bits_per_byte, rel=1e-6)


def test_bits_per_byte_definition(lm_a, tok_a_bt):
    result = bits_per_byte(lm_a, tok_a_bt, TEXTS, max_length=64, stride=16)
    assert result.num_bytes == sum(len(t.encode("utf-8")) for t in TEXTS)  # BOS: every byte scored
    assert result.num_tokens == sum(len(tok_a_bt.encode(t)) for t in TEXTS)
    assert result.bits_per_byte == pytest.approx(result.nll_nats / math.log(2) / result.num_bytes)
    assert result.token_perplexity == pytest.approx(math.exp(result.nll_nats / result.num_tokens))
    # A random model is near-uniform over its vocabulary.
    assert result.token_perplexity == pytest.approx(tok_a_bt.vocab_size, rel=0.5)


@pytest.mark.parametrize("seed", range(6))
def test_score_windows_matches_naive_reference(lm_a, tok_a_bt, seed: int):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, tok_a_bt.vocab_size, size=int(n)) for n in rng.integers(0, 30, size=3)]
    max_length = int(rng.integers(2, 12))
    stride = int(rng.integers(1, max_length))
    batch_size = int(rng.integers(1, 5))
    got = score_windows([lm_a], seqs, max_length=max_length, stride=stride, batch_size=batch_size)["single"]
    want_nll, want_count = 0.0, 0
    for seq in seqs:
        nll, count = _naive_nll(lm_a, seq, max_length, stride)
        want_nll += nll
        want_count += count
    assert got[1] == want_count
    assert got[0] == pytest.approx(want_nll, rel=1e-5, abs=1e-4)


def test_no_bos_leaves_first_token_out(lm_a, tok_a_bt, monkeypatch):
    prepared = _prepare(tok_a_bt, ["Hello world"])
    monkeypatch.setattr(tok_a_bt, "bos_id", None)
    monkeypatch.setattr(tok_a_bt, "eos_id", None)
    bare = _prepare(tok_a_bt, ["Hello world"])
    first = tok_a_bt.encode("Hello world").spans[0]
    assert bare.num_tokens == prepared.num_tokens - 1
    assert bare.num_bytes == prepared.num_bytes - int(first[1] - first[0])
    assert bare.seqs[0].tolist() == prepared.seqs[0][1:].tolist()


def test_progress_reports_every_scored_token(lm_a, tok_a_bt):
    calls: list[tuple[str, int, int]] = []
    result = bits_per_byte(
        lm_a, tok_a_bt, TEXTS, max_length=8, stride=4, batch_size=3, name="m", progress=lambda *a: calls.append(a)
    )
    assert calls[0] == ("scoring m", 0, result.num_tokens)
    assert sum(advance for _, advance, _ in calls) == result.num_tokens
    assert {total for _, _, total in calls} == {result.num_tokens}


def test_single_token_and_empty(lm_a, tok_a_bt):
    one = bits_per_byte(lm_a, tok_a_bt, ["a"], max_length=8, stride=4)
    assert (one.num_tokens, one.num_bytes) == (1, 1)
    with pytest.raises(DataError, match="no text to score"):
        bits_per_byte(lm_a, tok_a_bt, ["", ""], max_length=8, stride=4)


def test_tokenizer_larger_than_embeddings_is_refused(lm_a, tok_b_path):
    tok_b = load_tokenizer(str(tok_b_path))
    with pytest.raises(TokenizerMismatchError, match="embedding rows"):
        bits_per_byte(lm_a, tok_b, TEXTS, max_length=8, stride=4)


def test_bad_window_settings(lm_a, tok_a_bt):
    with pytest.raises(ConfigError, match="--stride"):
        bits_per_byte(lm_a, tok_a_bt, TEXTS, max_length=8, stride=9)
    with pytest.raises(ConfigError, match="--max-length"):
        bits_per_byte(lm_a, tok_a_bt, TEXTS, max_length=1, stride=1)


def _naive_ensemble(models, seq: np.ndarray, rule: str) -> float:
    with torch.no_grad():
        ids = torch.from_numpy(seq)[None]
        probs = [m(input_ids=ids).logits[0, :-1].double().softmax(-1) for m in models]
    nll = 0.0
    for pos in range(1, len(seq)):
        target = int(seq[pos])
        if rule == "p":
            nll -= math.log(sum(float(p[pos - 1, target]) for p in probs) / len(probs))
        else:
            mean_logp = sum(p[pos - 1].log() for p in probs) / len(probs)
            nll -= float(mean_logp[target] - torch.logsumexp(mean_logp, 0))
    return nll


def test_ensemble_matches_naive_reference(tok_a, tok_a_bt, tmp_path):
    from conftest import make_tiny_llama

    from xtd.student import load_causal_lm as load

    members = [load(make_tiny_llama(tok_a, tmp_path / f"m{i}", seed=10 + i)) for i in range(3)]
    texts = TEXTS[:2]
    results = ensemble_bits_per_byte(members, tok_a_bt, texts, max_length=512, stride=256, batch_size=2)
    seqs = _prepare(tok_a_bt, texts).seqs
    for result, rule in zip(results, ("p", "logp"), strict=True):
        want = sum(_naive_ensemble(members, s, rule) for s in seqs)
        assert result.nll_nats == pytest.approx(want, rel=1e-5)
        assert result.model.endswith(f"({rule})")
    # p-averaging a model with itself changes nothing
    single = bits_per_byte(members[0], tok_a_bt, texts, max_length=512, stride=256)
    same = ensemble_bits_per_byte([members[0], members[0]], tok_a_bt, texts, max_length=512, stride=256)
    for r in same:
        assert r.bits_per_byte == pytest.approx(single.bits_per_byte, rel=1e-6)


def test_ensemble_needs_shared_tokenizer(tok_a_bt, tok_b_path):
    tok_b = load_tokenizer(str(tok_b_path))
    check_shared_tokenizer([("a", tok_a_bt), ("a2", tok_a_bt)])
    with pytest.raises(TokenizerMismatchError, match="do not share a tokenizer"):
        check_shared_tokenizer([("a", tok_a_bt), ("b", tok_b)])


def test_exact_match_against_own_greedy_output(lm_a, tok_a_bt, tmp_path):
    # The answers are what the model itself produces greedily, so all must match; a
    # wrong answer must not.
    prompts = ["Hello", "To be, or not"]
    first = exact_match(lm_a, tok_a_bt, [{"prompt": p, "answer": "?"} for p in prompts], max_new_tokens=4)
    assert first.num_correct == 0 and first.num_examples == 2
    tasks = [{"prompt": p, "answer": f"  {pred}\n"} for p, pred in zip(prompts, first.predictions, strict=True)]
    second = exact_match(lm_a, tok_a_bt, tasks, max_new_tokens=4)
    assert second.accuracy == 1.0


def test_read_texts_and_tasks(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    assert read_texts(tmp_path / "a.txt") == ["hello\nworld\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert read_texts(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="line 1 has no string field 'text'"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_texts(tmp_path / "bin.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "2+2=", "answer": "4"}) + "\n")
    assert read_tasks(tmp_path / "t.jsonl") == [{"prompt": "2+2=", "answer": "4"}]
    (tmp_path / "t2.jsonl").write_text(json.dumps({"prompt": "2+2="}) + "\n")
    with pytest.raises(DataError, match="'prompt' and 'answer'"):
        read_tasks(tmp_path / "t2.jsonl")


def test_held_out_is_the_corpus_tail():
    from xtd.assets import iter_embedded_corpus

    texts = held_out_texts(3)
    records = list(iter_embedded_corpus())
    assert texts == [r["text"] for r in records[-3:]]
    with pytest.raises(ConfigError):
        held_out_texts(0)


@pytest.mark.slow
def test_smollm2_bits_per_byte_and_fvt_student():
    """The real teacher scores plausibly, and its FVT move to GPT-2 stays close to it while a
    random-embedding student is far worse (the FVT init carries the model over)."""
    from xtd.student import load_student

    text = held_out_texts(1)[0][:800]
    teacher = load_student("embedded:smollm2")
    base = bits_per_byte(teacher.model, teacher.tokenizer, [text], max_length=512, stride=256)
    assert 0.5 < base.bits_per_byte < 2.0
    moved = load_student("embedded:smollm2", tokenizer="embedded:gpt2")
    fvt = bits_per_byte(moved.model, moved.tokenizer, [text], max_length=512, stride=256)
    assert base.num_bytes == fvt.num_bytes
    assert fvt.bits_per_byte < base.bits_per_byte + 1.5
    with torch.no_grad():
        emb = moved.model.get_input_embeddings().weight
        emb.copy_(torch.randn_like(emb) * emb.std())
    scrambled = bits_per_byte(moved.model, moved.tokenizer, [text], max_length=512, stride=256)
    assert scrambled.bits_per_byte > fvt.bits_per_byte + 1.0
