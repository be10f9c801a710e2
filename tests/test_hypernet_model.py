"""xtd.hypernet.decomposition and xtd.hypernet.model: decompositions follow the FVT rules and
spell each token's bytes; a new hypernetwork reproduces the base embeddings exactly on the
base tokenizer (tied and untied); the ``mean`` residual starts at FVT; save/load round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xtd.config import HypernetConfig, SamplerConfig
from xtd.errors import ConfigError, ModelLoadError, TokenizerError, TokenizerMismatchError
from xtd.fvt import embedding_table, fvt_init, fvt_matrix
from xtd.hypernet.decomposition import Decomposer, decompose
from xtd.hypernet.model import Hypernet, build_hypernet, load_hypernet, save_hypernet
from xtd.hypernet.sampler import TokenizerSampler
from xtd.student import load_causal_lm
from xtd.tokenization import load_tokenizer

SMALL = HypernetConfig(num_heads=4, num_layers=2)


@pytest.fixture(scope="module")
def toks(tok_a_path: Path, tok_b_path: Path):
    return {"a": load_tokenizer(str(tok_a_path)), "b": load_tokenizer(str(tok_b_path)), "bytes": load_tokenizer("bytes")}


@pytest.fixture(scope="module")
def untied_lm(tok_a, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 32) with tok_a and separate input/output matrices."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=len(tok_a), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=tok_a.bos_token_id,
        eos_token_id=tok_a.eos_token_id, pad_token_id=tok_a.pad_token_id,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("untied_lm")
    LlamaForCausalLM(config).save_pretrained(folder)
    tok_a.save_pretrained(folder)
    return folder


def _sampled(base, seed: int = 0):
    from xtd.assets import iter_embedded_corpus

    sampler = TokenizerSampler(base, SamplerConfig(vocab_size_mean=800, vocab_size_std=100, vocab_size_min=400))
    texts = [r["text"][:400] for _, r in zip(range(24), iter_embedded_corpus(), strict=False)]
    sampler.observe(texts)
    return sampler.sample(np.random.default_rng(seed)).tokenizer


# --------------------------------------------------------------------------- decomposition


def test_the_base_tokenizer_decomposes_into_itself(toks) -> None:
    dec = decompose(toks["a"], toks["a"])
    assert dec.pieces.shape == (toks["a"].vocab_size, 1)
    assert np.array_equal(dec.pieces[:, 0], np.arange(toks["a"].vocab_size))
    assert dec.counts["exact"] + dec.counts["special"] == toks["a"].vocab_size


@pytest.mark.parametrize("pair", [("a", "b"), ("b", "a"), ("a", "bytes"), ("b", "sampled")])
def test_decompositions_are_the_fvt_rows_and_spell_the_token(toks, pair) -> None:
    base = toks[pair[0]]
    target = _sampled(base) if pair[1] == "sampled" else toks[pair[1]]
    dec = decompose(base, target, max_pieces=64)
    assert dec.counts["truncated"] == 0
    matrix, is_random, _ = fvt_matrix(base, target)
    dense = matrix.to_dense()
    specials = set(target.special_ids.tolist())
    for j in range(target.vocab_size):
        row = dec.pieces[j, : dec.num_pieces[j]]
        assert (dec.pieces[j, dec.num_pieces[j] :] == -1).all() and (row >= 0).all()
        if not is_random[j]:  # FVT averages exactly these pieces
            want = torch.zeros(base.vocab_size)
            np.add.at(want.numpy(), row, 1.0 / row.shape[0])
            torch.testing.assert_close(dense[j], want)
        if j not in specials:
            assert b"".join(base.token_bytes[i] for i in row) == target.token_bytes[j]


def test_the_cache_gives_what_a_fresh_decomposition_gives(toks) -> None:
    decomposer = Decomposer(toks["a"], max_pieces=4)
    for seed in range(3):
        target = _sampled(toks["a"], seed)
        ids = np.random.default_rng(seed).permutation(target.vocab_size)[:300]
        got = decomposer(target, ids)
        want = decompose(toks["a"], target, ids, max_pieces=4)
        assert np.array_equal(got.pieces, want.pieces) and got.counts == want.counts
    assert len(decomposer._cache) > 300  # later draws were served from it
    small = Decomposer(toks["a"], max_entries=50)
    assert np.array_equal(small(toks["b"]).pieces, decompose(toks["a"], toks["b"]).pieces)
    assert len(small._cache) <= 50 + toks["b"].vocab_size


def test_long_decompositions_keep_their_first_pieces(toks) -> None:
    full = decompose(toks["a"], toks["b"], max_pieces=64)
    cut = decompose(toks["a"], toks["b"], max_pieces=2)
    assert cut.pieces.shape[1] == 2 and (cut.num_pieces <= 2).all()
    assert cut.counts["truncated"] == int((full.num_pieces > 2).sum()) > 0
    assert np.array_equal(cut.pieces, full.pieces[:, :2])


def test_ids_subset_and_order(toks) -> None:
    ids = [5, 3, 399, 0]
    sub = decompose(toks["a"], toks["b"], ids)
    full = decompose(toks["a"], toks["b"])
    assert np.array_equal(sub.pieces, full.pieces[ids, : sub.pieces.shape[1]])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        decompose(toks["a"], toks["b"], [toks["b"].vocab_size])


def test_a_special_without_counterpart_is_spelled_as_text(toks) -> None:
    from tokenizers import AddedToken

    from xtd.embedded_tokenizers import bytes_hf
    from xtd.tokenization import ByteTokenizer

    hf = bytes_hf()
    hf.backend_tokenizer.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False)])
    target = ByteTokenizer(hf, "bytes+im_start")
    j = target.vocab_size - 1
    dec = decompose(toks["a"], target, [j], max_pieces=64)
    assert dec.counts["special_text"] == 1
    spelled = b"".join(toks["a"].token_bytes[i] for i in dec.pieces[0, : dec.num_pieces[0]])
    assert spelled == b"<|im_start|>"


def test_bytes_the_base_lacks_become_byte_rows(tmp_path: Path, toks) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["plain ascii text only"] * 10, trainers.BpeTrainer(vocab_size=60, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    ascii_base = load_tokenizer(str(tmp_path / "tokenizer.json"))
    have = {view[0] for view in ascii_base.token_bytes if len(view) == 1}
    dec = decompose(ascii_base, toks["bytes"], range(256))
    for b in range(256):
        want = ascii_base.token_bytes.index(bytes([b])) if b in have else ascii_base.vocab_size + b
        assert dec.pieces[b, : dec.num_pieces[b]].tolist() == [want]
    assert dec.counts["byte_rows"] == 256 - len(have) == dec.counts["spelled"]
    # A token mixing known text and unknown bytes: the text through the base, the rest byte rows.
    target = _sampled(ascii_base)
    mixed = decompose(ascii_base, target, max_pieces=64)
    with_rows = np.flatnonzero((mixed.pieces >= ascii_base.vocab_size).any(axis=1))
    both = [j for j in with_rows if (mixed.pieces[j, : mixed.num_pieces[j]] < ascii_base.vocab_size).any()]
    assert len(both) > 0
    for j in with_rows:
        row = mixed.pieces[j, : mixed.num_pieces[j]]
        spelled = b"".join(
            bytes([i - ascii_base.vocab_size]) if i >= ascii_base.vocab_size else ascii_base.token_bytes[i] for i in row
        )
        assert spelled == target.token_bytes[j]


# --------------------------------------------------------------------------- the hypernetwork


@pytest.mark.parametrize("residual", ["first", "mean"])
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_a_new_hypernetwork_reproduces_the_base_embeddings_exactly(tiny_lm, untied_lm, toks, which, residual) -> None:
    folder = tiny_lm if which == "tied" else untied_lm
    bundle = build_hypernet(folder, HypernetConfig(num_heads=4, residual=residual), seed=3)
    rows, dec = bundle.predict(toks["a"], batch_tokens=128)
    model = load_causal_lm(folder)
    want = model.get_input_embeddings().weight[: toks["a"].vocab_size]
    if which == "untied":
        want = torch.cat([want, model.get_output_embeddings().weight[: toks["a"].vocab_size]], dim=1)
    assert bundle.layout.separate_output == (which == "untied")
    assert rows.shape == want.shape
    assert torch.equal(rows, want)  # bit for bit
    assert dec.counts["truncated"] == 0


def test_the_mean_residual_starts_at_fvt(tiny_lm, toks) -> None:
    bundle = build_hypernet(tiny_lm, HypernetConfig(num_heads=4, residual="mean", max_pieces=64))
    rows, dec = bundle.predict(toks["b"])
    model = load_causal_lm(tiny_lm)
    fvt_init(model, toks["a"], toks["b"])
    _, is_random, _ = fvt_matrix(toks["a"], toks["b"])
    want = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(rows[~is_random], want[~is_random], rtol=1e-5, atol=1e-6)


def test_byte_rows_are_read_and_learned(tiny_lm) -> None:
    bundle = build_hypernet(tiny_lm, SMALL)
    hn = bundle.hypernet
    v = hn.num_base
    pieces = torch.tensor([[v + 4, -1], [v + 255, 7], [7, v + 4]])
    rows = hn(pieces)
    assert torch.equal(rows[0], hn.byte_rows[4]) and torch.equal(rows[1], hn.byte_rows[255])
    assert torch.equal(rows[2], hn.source[7])
    _trained_looking(bundle)
    hn(pieces).sum().backward()
    assert hn.byte_rows.grad[[4, 255]].abs().sum() > 0 and hn.byte_rows.grad[5].abs().sum() == 0
    assert "byte_rows" in hn.state_dict()


def _trained_looking(bundle, seed: int = 0) -> None:
    """Give the zero-initialised output projection weights, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bundle.hypernet.out_proj.weight.copy_(torch.randn(bundle.hypernet.out_proj.weight.shape, generator=gen) * 0.1)


def test_training_moves_only_the_hypernetwork(tiny_lm, toks) -> None:
    bundle = build_hypernet(tiny_lm, SMALL)
    _trained_looking(bundle)
    dec = bundle.decompose(toks["b"], list(range(50)))
    bundle.hypernet.train()
    rows = bundle.hypernet(torch.from_numpy(dec.pieces))  # (50, W)
    rows.square().sum().backward()
    grads = {n: p.grad for n, p in bundle.hypernet.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["in_proj.weight"].abs().sum() > 0 and grads["position"].abs().sum() > 0
    assert not bundle.hypernet.source.requires_grad
    assert not any(p.requires_grad for p in bundle.model.parameters())
    assert "source" not in bundle.hypernet.state_dict()  # the base table is rebuilt, not saved


def test_batching_does_not_change_predictions(tiny_lm, toks) -> None:
    bundle = build_hypernet(tiny_lm, SMALL)
    _trained_looking(bundle)
    seen = []
    small, _ = bundle.predict(toks["b"], batch_tokens=37, progress=lambda done, total: seen.append((done, total)))
    large, _ = bundle.predict(toks["b"], batch_tokens=10_000)
    torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-6)
    assert seen[-1] == (toks["b"].vocab_size, toks["b"].vocab_size) and len(seen) > 10
    identity = build_hypernet(tiny_lm, SMALL).predict(toks["b"])[0]
    assert (large - identity).abs().max() > 1e-3  # the perturbation is visible


def test_save_and_load_round_trip(tiny_lm, tiny_lm_b, toks, tmp_path: Path) -> None:
    bundle = build_hypernet(tiny_lm, SMALL, seed=1)
    _trained_looking(bundle)
    want, _ = bundle.predict(toks["b"])
    out = save_hypernet(bundle, tmp_path / "hn", metadata={"note": "test"})
    record = json.loads((out / "hypernet.json").read_text())
    assert record["format"] == "xtd-hypernet" and record["format_version"] == 1
    assert HypernetConfig.from_dict(record["config"]) == SMALL
    assert record["base"]["model"] == str(Path(tiny_lm).resolve())
    assert record["metadata"] == {"note": "test"}
    loaded = load_hypernet(out)
    assert loaded.hypernet.config == SMALL
    got, _ = loaded.predict(toks["b"])
    assert torch.equal(got, want)
    assert torch.equal(load_hypernet(out, base_model=str(tiny_lm)).predict(toks["b"])[0], want)

    with pytest.raises(ConfigError, match="not empty"):
        save_hypernet(bundle, out)
    save_hypernet(build_hypernet(tiny_lm, SMALL), out, overwrite=True)
    assert not torch.equal(load_hypernet(out).predict(toks["b"])[0], want)

    with pytest.raises(TokenizerMismatchError, match="tokenizer digest"):
        load_hypernet(out, base_model=str(tiny_lm_b))


def test_broken_folders_are_refused(tiny_lm, tmp_path: Path) -> None:
    out = save_hypernet(build_hypernet(tiny_lm, SMALL), tmp_path / "hn")
    with pytest.raises(ModelLoadError, match="no hypernetwork"):
        load_hypernet(tmp_path / "missing")
    record = json.loads((out / "hypernet.json").read_text())
    (out / "hypernet.json").write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ModelLoadError, match="format_version 99"):
        load_hypernet(out)
    (out / "hypernet.json").write_text(json.dumps({**record, "config": {**record["config"], "num_layers": 3}}))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_hypernet(out)
    (out / "hypernet.json").write_text(json.dumps(record))
    (out / "hypernet.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_hypernet(out)


def test_widths_that_heads_do_not_divide_are_refused(tiny_lm) -> None:
    model = load_causal_lm(tiny_lm)
    table, layout = embedding_table(model)
    with pytest.raises(ConfigError, match="--num-heads"):
        Hypernet(HypernetConfig(num_heads=5), table, layout)
    with pytest.raises(ConfigError, match="--num-heads"):
        HypernetConfig(num_heads=4, model_dim=30)
    with pytest.raises(ConfigError, match="--residual"):
        HypernetConfig(residual="last")


@pytest.mark.slow
def test_smollm2_identity_with_the_default_architecture() -> None:
    bundle = build_hypernet("embedded:smollm2")  # 3 layers, 16 heads, width 576 (tied)
    rows, dec = bundle.predict(bundle.tokenizer)
    want = bundle.model.get_input_embeddings().weight[: bundle.tokenizer.vocab_size]
    assert dec.counts["exact"] + dec.counts["special"] == bundle.tokenizer.vocab_size == 49152
    assert torch.equal(rows, want)
