"""xtd.hypernet.sampler: sampled tokenizers are real ByteTokenizers (exact byte spans on
adversarial text), keep the base's specials at fixed ids and every byte, are seeded and
diverse, and their substring statistics match a slow reference over the window."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from xtd.config import SamplerConfig
from xtd.embedded_tokenizers import bytes_to_unicode
from xtd.errors import ConfigError, TokenizerError
from xtd.hypernet.sampler import TokenizerSampler, pretokenize
from xtd.tokenization import load_tokenizer


def _corpus_batches(n: int, size: int = 8) -> list[list[str]]:
    from xtd.assets import iter_embedded_corpus

    texts = []
    for record in iter_embedded_corpus():
        texts.append(record["text"][:600])
        if len(texts) == n * size:
            break
    return [texts[i * size : (i + 1) * size] for i in range(n)]


@pytest.fixture(scope="module")
def base(tok_a_path: Path):
    return load_tokenizer(str(tok_a_path))


def _small(**overrides) -> SamplerConfig:
    values = dict(vocab_size_mean=900, vocab_size_std=200, vocab_size_min=400, vocab_size_max=1500)
    return SamplerConfig(**{**values, **overrides})


def _naive_frequencies(batches: list[list[str]], longest: int) -> dict[str, float]:
    """Slow reference: every substring occurrence of every pretoken occurrence, counted."""
    freq: collections.Counter[str] = collections.Counter()
    for batch in batches:
        for text in batch:
            for piece in pretokenize([text]).elements():
                for i in range(len(piece)):
                    for j in range(i + 1, min(len(piece), i + longest) + 1):
                        freq[piece[i:j]] += 1
    return {k: float(v) for k, v in freq.items()}


def test_sampled_tokenizer_is_an_exact_byte_tokenizer(base, corpus: list[str]) -> None:
    sampler = TokenizerSampler(base, _small())
    for batch in _corpus_batches(3):
        sampler.observe(batch)
    drawn = sampler.sample(np.random.default_rng(0))
    tok = drawn.tokenizer
    assert tok.kind == "byte_level"
    texts = [t for t in corpus if t] + ["🏳️‍🌈 \x00\x7f\u2028 ́é"]
    for text, enc in zip(texts, tok.encode_batch(texts), strict=True):  # raises ByteIdentityError otherwise
        assert b"".join(tok.token_bytes[i] for i in enc.ids) == text.encode("utf-8")
        assert enc.spans[0, 0] == 0 and enc.spans[-1, 1] == len(text.encode("utf-8"))
        assert np.array_equal(enc.spans[1:, 0], enc.spans[:-1, 1])
    # Saved and reloaded through transformers, it is the same tokenizer.
    assert load_tokenizer(tok.hf).digest == tok.digest
    # Alignment takes it unchanged: chunks tile each text, and every chunk ends where
    # both tokenizations have a token end.
    from xtd.align import align_many

    base_encs = base.encode_batch(texts)
    encs = tok.encode_batch(texts)
    alignments = align_many([(a.spans, b.spans) for a, b in zip(base_encs, encs, strict=True)])
    for text, a, b, al in zip(texts, base_encs, encs, alignments, strict=True):
        assert al.chunk_bytes[0, 0] == 0 and al.chunk_bytes[-1, 1] == len(text.encode("utf-8"))
        assert np.array_equal(al.chunk_bytes[1:, 0], al.chunk_bytes[:-1, 1])
        assert set(al.chunk_bytes[:, 1]) <= set(a.spans[:, 1]) & set(b.spans[:, 1])


def test_specials_bytes_and_whitespace_runs_are_always_there(base) -> None:
    config = _small(max_whitespace_run=6)
    sampler = TokenizerSampler(base, config)
    sampler.observe(_corpus_batches(1)[0])
    tok = sampler.sample(np.random.default_rng(1)).tokenizer
    k = base.special_ids.shape[0]
    names = [base.hf.convert_ids_to_tokens(int(i)) for i in base.special_ids]
    assert tok.special_ids.tolist() == list(range(k))
    assert [tok.hf.convert_ids_to_tokens(i) for i in range(k)] == names
    for role in ("bos_id", "eos_id", "pad_id"):
        want = getattr(base, role)
        got = getattr(tok, role)
        assert (got is None) == (want is None)
        if want is not None:
            assert tok.hf.convert_ids_to_tokens(got) == base.hf.convert_ids_to_tokens(want)
    views = set(tok.token_bytes)
    assert all(bytes([b]) in views for b in range(256))
    for char in (b" ", b"\t", b"\n"):
        assert all(char * n in views for n in range(1, 7))
    assert b"\r\n" in views
    # Special strings in the text stay text: no special id is ever produced by encoding.
    ids = tok.encode("".join(names) + " plain text").ids
    assert not np.isin(ids, tok.special_ids).any()


def test_same_observations_and_seed_give_the_same_tokenizer(base) -> None:
    batches = _corpus_batches(4)
    digests = []
    for _ in range(2):
        sampler = TokenizerSampler(base, _small())
        for batch in batches:
            sampler.observe(batch)
        digests.append([sampler.sample(np.random.default_rng([7, i])).tokenizer.digest for i in range(3)])
    assert digests[0] == digests[1]
    assert len(set(digests[0])) == 3


def test_draws_are_diverse_in_size_and_pieces(base) -> None:
    sampler = TokenizerSampler(base, _small())
    for batch in _corpus_batches(6):
        sampler.observe(batch)
    rng = np.random.default_rng(3)
    drawn = [sampler.sample(rng) for _ in range(8)]
    sizes = [d.tokenizer.vocab_size for d in drawn]
    assert all(400 <= s <= 1500 for s in sizes)
    assert len(set(sizes)) >= 6
    learned = [set(d.tokenizer.token_bytes[-d.num_learned :]) for d in drawn]
    for a, b in zip(learned, learned[1:], strict=False):
        overlap = len(a & b) / min(len(a), len(b))
        assert overlap < 0.999  # different vocabularies, not one ranking cut at different sizes
    texts = _corpus_batches(7)[-1]
    tokens = [sum(len(e) for e in d.tokenizer.encode_batch(texts)) for d in drawn]
    assert len(set(tokens)) >= 6  # ... which segment the same text differently
    assert {round(d.noise_std, 6) for d in drawn}.__len__() == 8


def test_without_noise_the_learned_pieces_are_the_best_by_frequency_times_length(base) -> None:
    config = _small(vocab_size_std=0, noise_median=0.0)
    sampler = TokenizerSampler(base, config)
    batches = _corpus_batches(2)
    for batch in batches:
        sampler.observe(batch)
    drawn = sampler.sample(np.random.default_rng(0))
    assert drawn.tokenizer.vocab_size == config.vocab_size_mean
    b2u = bytes_to_unicode()
    fixed = {b2u[b] for b in range(256)}
    fixed |= {"".join(b2u[x] for x in (c * n).encode()) for c in " \t\n" for n in range(2, config.max_whitespace_run + 1)}
    fixed |= {"".join(b2u[x] for x in b"\r\n")}
    ranked = sorted(
        ((f * len(p), p) for p, f in _naive_frequencies(batches, config.max_piece_bytes).items() if p not in fixed),
        reverse=True,
    )
    n = drawn.num_learned
    threshold = ranked[n - 1][0]
    got = {"".join(b2u[b] for b in v) for v in drawn.tokenizer.token_bytes[-n:]}
    assert {p for s, p in ranked if s > threshold} <= got
    assert all(dict((p, s) for s, p in ranked)[p] >= threshold for p in got)


@pytest.mark.parametrize("window", [1, 2, 5])
def test_frequencies_match_a_slow_reference_over_the_window(base, window: int) -> None:
    batches = _corpus_batches(6, size=3)
    sampler = TokenizerSampler(base, _small(window_batches=window, max_piece_bytes=6))
    for i, batch in enumerate(batches):
        sampler.observe(batch)
        want = _naive_frequencies(batches[max(0, i + 1 - window) : i + 1], 6)
        got = sampler.frequencies()
        assert got == pytest.approx(want)
        assert set(got) == set(want)


def test_compaction_forgets_old_pretokens_and_keeps_the_statistics(base) -> None:
    batches = _corpus_batches(5, size=3)
    sampler = TokenizerSampler(base, _small(window_batches=2))
    for batch in batches:
        sampler.observe(batch)
    before = sampler.frequencies()
    known = len(sampler._pretokens)
    sampler._compact()
    assert len(sampler._pretokens) == sampler.num_pretokens < known
    assert sampler.frequencies() == pytest.approx(before)
    sampler.observe(_corpus_batches(6, size=3)[-1])  # the window still drops the right batch
    assert sampler.frequencies() == pytest.approx(_naive_frequencies([batches[-1], _corpus_batches(6, size=3)[-1]], 16))


def test_an_empty_window_still_gives_a_byte_tokenizer(base) -> None:
    tok = TokenizerSampler(base, _small()).sample(np.random.default_rng(0)).tokenizer
    assert tok.encode("héllo  world").ids.shape[0] == len("héllo  world".encode())


def test_bad_settings_name_the_flag(base) -> None:
    with pytest.raises(ConfigError, match="--vocab-size-mean"):
        SamplerConfig(vocab_size_mean=10, vocab_size_min=100)
    with pytest.raises(ConfigError, match="--max-piece-bytes"):
        SamplerConfig(max_piece_bytes=1)
    with pytest.raises(ConfigError, match="--noise-median"):
        SamplerConfig(noise_median=-1.0)
    with pytest.raises(TokenizerError, match="--vocab-size-min"):
        TokenizerSampler(base, SamplerConfig(vocab_size_min=300, vocab_size_mean=300))
