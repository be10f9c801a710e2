"""xtd.hypernet.step: the vocabulary a hypernetwork step predicts holds every token the texts
use, its rows index the predictions, and with the base tokenizer and a new hypernetwork the
base model run on predicted embeddings gives the base model's own logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xtd.config import HypernetConfig, SamplerConfig
from xtd.errors import ConfigError
from xtd.hypernet.decomposition import Decomposer, decompose
from xtd.hypernet.model import build_hypernet
from xtd.hypernet.sampler import TokenizerSampler
from xtd.hypernet.step import prepare_step
from xtd.tokenization import load_tokenizer


def _texts(n: int = 6) -> list[str]:
    from xtd.assets import iter_embedded_corpus

    return [r["text"][:300] for _, r in zip(range(n), iter_embedded_corpus(), strict=False)] + ["Tabs\tand  spaces 👍\n"]


@pytest.fixture(scope="module")
def base(tok_a_path: Path):
    return load_tokenizer(str(tok_a_path))


@pytest.fixture(scope="module")
def sampled(base):
    sampler = TokenizerSampler(base, SamplerConfig(vocab_size_mean=900, vocab_size_std=0, vocab_size_min=400))
    sampler.observe(_texts(30))
    return sampler.sample(np.random.default_rng(0)).tokenizer


def _check_rows(step, tokenizer, texts) -> None:
    for text, enc, local in zip(texts, step.encodings, step.local_ids, strict=True):
        assert np.array_equal(step.vocab_ids[local], enc.ids)
        assert b"".join(tokenizer.token_bytes[i] for i in enc.ids) == text.encode("utf-8")
    used = np.unique(np.concatenate([e.ids for e in step.encodings]))
    assert np.array_equal(step.vocab_ids[step.used], used)
    assert np.all(np.diff(step.vocab_ids) > 0)
    assert np.array_equal(step.boundary_class, tokenizer.boundary_class[step.vocab_ids])


def test_the_whole_vocabulary_by_default(sampled, base) -> None:
    texts = _texts()
    step = prepare_step(sampled, Decomposer(base), texts)
    assert np.array_equal(step.vocab_ids, np.arange(sampled.vocab_size))
    _check_rows(step, sampled, texts)
    want = decompose(base, sampled, max_pieces=8)
    assert np.array_equal(step.decomposition.pieces, want.pieces)
    tokens = sum(len(e) for e in step.encodings)
    assert step.stats["tokens"] == tokens and step.stats["vocab_size"] == sampled.vocab_size
    assert step.stats["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in texts) / tokens)


@pytest.mark.parametrize("max_vocab", [10, 500])
def test_a_vocabulary_budget_keeps_every_used_token(sampled, base, max_vocab: int) -> None:
    texts = _texts()
    step = prepare_step(sampled, Decomposer(base), texts, max_vocab=max_vocab, rng=np.random.default_rng(1))
    _check_rows(step, sampled, texts)
    assert np.isin(sampled.special_ids, step.vocab_ids).all()
    must = np.union1d(step.vocab_ids[step.used], sampled.special_ids)
    assert step.vocab_ids.shape[0] == max(max_vocab, must.shape[0])
    want = decompose(base, sampled, step.vocab_ids, max_pieces=8)
    assert np.array_equal(step.decomposition.pieces, want.pieces)
    again = prepare_step(sampled, Decomposer(base), texts, max_vocab=max_vocab, rng=np.random.default_rng(1))
    assert np.array_equal(again.vocab_ids, step.vocab_ids)
    if max_vocab == 500:
        other = prepare_step(sampled, Decomposer(base), texts, max_vocab=max_vocab, rng=np.random.default_rng(2))
        assert not np.array_equal(other.vocab_ids, step.vocab_ids)
    with pytest.raises(ConfigError, match="--max-vocab"):
        prepare_step(sampled, Decomposer(base), texts, max_vocab=0)


@pytest.mark.parametrize("max_vocab", [None, 300])
def test_base_tokenizer_and_new_hypernetwork_give_the_base_logits(tiny_lm, base, max_vocab) -> None:
    from xtd.student import load_causal_lm

    texts = _texts(3)
    bundle = build_hypernet(tiny_lm, HypernetConfig(num_heads=4))
    step = prepare_step(base, bundle.decomposer, texts, max_vocab=max_vocab, rng=np.random.default_rng(0))
    rows = bundle.hypernet(torch.from_numpy(step.decomposition.pieces))  # (U, H): tied, so input = output
    reference = load_causal_lm(tiny_lm)
    for enc, local in zip(step.encodings, step.local_ids, strict=True):
        ids = torch.from_numpy(enc.ids.astype(np.int64))[None]
        local = torch.from_numpy(local)[None]
        with torch.no_grad():
            hidden = bundle.model.model(inputs_embeds=rows[local]).last_hidden_state  # (1, S, H)
            logits = hidden @ rows.T  # (1, S, U): the softmax runs over the step's vocabulary
            want = reference(input_ids=ids).logits[..., step.vocab_ids]
        assert torch.equal(logits, want)
