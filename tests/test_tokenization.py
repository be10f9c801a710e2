"""Byte view of tokenizers (docs/method.md, "Byte view of a tokenizer"): exact spans on adversarial text for real
tokenizers, byte views per pipeline type, normaliser checks, the `bytes` tokenizer, and
clear errors for bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from xtd.errors import ByteIdentityError, TokenizerError, XtdWarning
from xtd.tokenization import (
    BOUNDARY_CLASSES,
    ByteTokenizer,
    Encoding,
    load_tokenizer,
    tokenizer_from_json,
)

FAST = ["bytes", "embedded:gpt2", "embedded:llama3", "embedded:qwen3", "embedded:mistral-v1"]


def _slow_spans(tok: ByteTokenizer, enc: Encoding, text: str) -> list[tuple[int, int]]:
    """Reference: walk the tokens one by one, consuming their byte views from the text."""
    raw = text.encode("utf-8")
    total = sum(len(tok.token_bytes[i]) for i in enc.ids.tolist())
    dummy = tok.kind == "sentencepiece" and total == len(raw) + 1  # dummy prefix (docs/method.md, "Chunks")
    pos, out = 0, []
    for i in enc.ids.tolist():
        view = tok.token_bytes[i]
        if dummy and view:
            assert view[:1] == b" "
            view, dummy = view[1:], False
        assert raw[pos : pos + len(view)] == view
        out.append((pos, pos + len(view)))
        pos += len(view)
    assert pos == len(raw)
    return out


def _random_text(rng: np.random.Generator) -> str:
    pools = [
        " \t\n\r", "abcXYZ ", "0123456789", "éüñ\u0301\u0308", "你好世界日本語", "مرحبا שלום",
        "👩\u200d👧🏽👍🏳️\u200d🌈", "(){}[];:'\"", "<|endoftext|>",
    ]
    parts = [rng.choice(list(pools[int(rng.integers(len(pools)))])) for _ in range(int(rng.integers(0, 60)))]
    return "".join(parts)


@pytest.mark.parametrize("spec", FAST)
def test_spans_tile_adversarial_text_and_match_transformers(spec, corpus):
    tok = load_tokenizer(spec)
    encs = tok.encode_batch(corpus)
    for text, enc in zip(corpus, encs, strict=True):
        raw = text.encode("utf-8")
        assert enc.ids.dtype == np.int32 and enc.spans.dtype == np.int32 and enc.spans.shape == (len(enc), 2)
        assert b"".join(raw[a:b] for a, b in enc.spans.tolist()) == raw
        assert enc.spans.tolist() == [list(x) for x in _slow_spans(tok, enc, text)]
        assert enc.ids.tolist() == tok.hf(text, add_special_tokens=False)["input_ids"]
    assert [e.ids.tolist() for e in encs] == [tok.encode(t).ids.tolist() for t in corpus]


@pytest.mark.parametrize("spec", ["bytes", "embedded:gpt2", "embedded:mistral-v1"])
def test_vectorised_spans_equal_slow_reference_on_random_text(spec):
    tok = load_tokenizer(spec)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        texts = [_random_text(rng) for _ in range(8)]
        for text, enc in zip(texts, tok.encode_batch(texts), strict=True):
            assert enc.spans.tolist() == [list(x) for x in _slow_spans(tok, enc, text)]


def test_fixture_tokenizers_and_objects(tok_a, tok_a_path, corpus):
    from_obj = load_tokenizer(tok_a)
    from_path = load_tokenizer(tok_a_path)
    assert from_obj.digest == from_path.digest
    for text in corpus:
        assert from_obj.encode(text).ids.tolist() == from_path.encode(text).ids.tolist()
    assert from_obj.eos_id == tok_a.eos_token_id and from_obj.pad_id == tok_a.pad_token_id


def test_byte_views_per_pipeline_type():
    gpt2 = load_tokenizer("embedded:gpt2")
    assert gpt2.kind == "byte_level" and gpt2.vocab_size == 50257
    assert gpt2.token_bytes[gpt2.hf.convert_tokens_to_ids("Ġworld")] == b" world"
    assert gpt2.token_bytes[gpt2.hf.convert_tokens_to_ids("Ċ")] == b"\n"
    assert gpt2.token_bytes[gpt2.eos_id] == b""
    mistral = load_tokenizer("embedded:mistral-v1")
    assert mistral.kind == "sentencepiece" and mistral.vocab_size == 32000
    assert mistral.token_bytes[mistral.hf.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert mistral.token_bytes[mistral.hf.convert_tokens_to_ids("▁Hello")] == b" Hello"
    assert mistral.token_bytes[mistral.hf.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
    enc = mistral.encode("Hello")  # dummy prefix absorbed into the first span
    assert enc.spans.tolist() == [[0, 5]]
    llama = load_tokenizer("embedded:llama3")
    assert llama.vocab_size == 128256 and len(llama.special_ids) == 256
    assert llama.bos_id == 128000 and llama.eos_id == 128001
    assert load_tokenizer("embedded:qwen3").eos_id == 151643


def test_boundary_classes():
    gpt2 = load_tokenizer("embedded:gpt2")
    cls = gpt2.boundary_class
    assert cls.shape == (gpt2.vocab_size,) and cls.dtype == np.int8
    first = np.array([b[0] if b else -1 for b in gpt2.token_bytes])
    assert np.array_equal(cls == 0, first == 0x20)
    assert np.array_equal(cls == 1, first == 0x0A)
    assert np.array_equal(cls == 2, first == 0x09)
    assert cls[gpt2.eos_id] == BOUNDARY_CLASSES.index("special")
    assert np.array_equal(gpt2.boundary_mask(), cls >= 0)
    assert np.array_equal(gpt2.boundary_mask(["space"]), cls == 0)
    with pytest.raises(TokenizerError, match="unknown boundary classes"):
        gpt2.boundary_mask(["spaces"])


def test_bytes_tokenizer_roundtrip_through_transformers(tmp_path, corpus):
    from transformers import AutoTokenizer

    tok = load_tokenizer("bytes")
    assert tok.vocab_size == 258 and tok.token_bytes[:256] == [bytes([b]) for b in range(256)]
    assert tok.special_ids.tolist() == [256, 257] and (tok.eos_id, tok.pad_id) == (256, 257)
    tok.save(tmp_path / "bytes")
    hf = AutoTokenizer.from_pretrained(tmp_path / "bytes")
    for text in corpus:
        raw = list(text.encode("utf-8"))
        assert tok.encode(text).ids.tolist() == raw
        assert hf(text, add_special_tokens=False)["input_ids"] == raw
    reloaded = load_tokenizer(tmp_path / "bytes")
    assert reloaded.digest == tok.digest and reloaded.pad_id == 257
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("hé").ids.tolist() == [104, 195, 169]


def test_bytes_with_specials_of_another_tokenizer():
    tok = load_tokenizer("bytes:embedded:llama3")
    assert tok.vocab_size == 256 + 256
    assert tok.hf.convert_ids_to_tokens(256) == "<|begin_of_text|>"
    assert (tok.bos_id, tok.eos_id) == (256, 257)
    assert tok.encode("ab").ids.tolist() == [97, 98]


def test_tokenizer_from_json_roundtrip(corpus):
    gpt2 = load_tokenizer("embedded:gpt2")
    again = tokenizer_from_json(gpt2.to_json())
    assert again.digest == gpt2.digest and again.eos_id == gpt2.eos_id
    assert [e.ids.tolist() for e in again.encode_batch(corpus)] == [e.ids.tolist() for e in gpt2.encode_batch(corpus)]
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        tokenizer_from_json("{not json")


def test_special_token_text_is_plain_text_and_add_special_tokens():
    gpt2 = load_tokenizer("embedded:gpt2")
    enc = gpt2.encode("a<|endoftext|>b")  # text never contains slots (docs/method.md, "Byte view of a tokenizer")
    assert gpt2.eos_id not in enc.ids.tolist() and enc.spans[-1, 1] == 15
    llama = load_tokenizer("embedded:llama3")
    enc = llama.encode("Hi", add_special_tokens=True)
    assert enc.ids[0] == llama.bos_id and enc.spans.tolist()[0] == [0, 0]
    assert llama.special_mask(enc.ids).tolist() == [True, False]


def test_edge_texts():
    for spec in ["bytes", "embedded:gpt2", "embedded:mistral-v1"]:
        tok = load_tokenizer(spec)
        assert len(tok.encode("")) == 0 and tok.encode("").spans.shape == (0, 2)
        assert tok.encode("a").spans.tolist() == [[0, 1]]
        assert tok.encode_batch([]) == []
    mistral = load_tokenizer("embedded:mistral-v1")
    import sentencepiece as spm

    from xtd.assets import mistral_sentencepiece_path

    sp = spm.SentencePieceProcessor(model_file=str(mistral_sentencepiece_path("v1")))
    # equals the sentencepiece library itself (except runs of spaces before a word, where
    # HF-style BPE and sentencepiece legitimately differ)
    for text in ["Hello world!", "  leading", " ", "\n", "tabs\tand\n\nnew", "CJK: 你好", "👍🏽 ok", "a"]:
        assert mistral.encode(text).ids.tolist() == sp.encode(text)


def _bpe_json(normalizer=None, pre_tokenizer="ByteLevel") -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from xtd.tokenization import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({"[UNK]": 256})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    if pre_tokenizer == "ByteLevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if normalizer is not None:
        tok.normalizer = normalizer
    return tok.to_str()


def test_normaliser_checks(tmp_path):
    from tokenizers import normalizers

    nfc = tmp_path / "nfc.json"
    nfc.write_text(_bpe_json(normalizers.NFC()))
    with pytest.raises(ByteIdentityError, match="NFC Unicode normaliser.*allow_strip_unicode_normalizer"):
        load_tokenizer(nfc)
    with pytest.warns(XtdWarning, match="removed the Unicode normaliser"):
        tok = load_tokenizer(str(nfc), allow_strip_unicode_normalizer=True)
    text = "e\u0301"  # not NFC: bytes must survive
    assert tok.encode(text).spans[-1, 1] == len(text.encode())
    assert tok.hf.backend_tokenizer.normalizer is None
    nested = tmp_path / "nested.json"
    nested.write_text(_bpe_json(normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_tokenizer(str(nested), allow_strip_unicode_normalizer=True)
    assert any(issubclass(w.category, XtdWarning) for w in caught)
    for bad in (normalizers.Lowercase(), normalizers.StripAccents(), normalizers.Strip(), normalizers.Replace("a", "b")):
        path = tmp_path / f"{type(bad).__name__}.json"
        path.write_text(_bpe_json(bad))
        with pytest.raises(ByteIdentityError, match="normaliser"):
            load_tokenizer(str(path), allow_strip_unicode_normalizer=True)


def test_byte_identity_error_names_tokenizer_and_offset(tmp_path):
    path = tmp_path / "ws.json"
    path.write_text(_bpe_json(pre_tokenizer="Whitespace"))  # drops the spaces
    tok = load_tokenizer(path)
    with pytest.raises(ByteIdentityError, match=r"ws\.json.*first bad byte offset 5"):
        tok.encode("Hello world")
    with pytest.raises(ByteIdentityError, match="text 1 of the batch"):
        tok.encode_batch(["ok", "a b"])
    with pytest.raises(TokenizerError, match="not a str"):
        tok.encode_batch(["ok", b"bytes"])  # type: ignore[list-item]


def test_wordpiece_per_occurrence_views():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[CLS]"], show_progress=False)
    tok.train_from_iterator(["hello world, hello there!\n\tcafé"] * 20, trainer=trainer)
    wp = tokenizer_from_json(tok.to_str(), name="wordpiece")
    assert wp.kind == "wordpiece"
    for text in ["hello world", "  hello\n\tthere!  ", "café, world", ""]:
        enc = wp.encode(text)
        raw = text.encode("utf-8")
        assert b"".join(raw[a:b] for a, b in enc.spans.tolist()) == raw
    with pytest.raises(TokenizerError, match="WordPiece"):
        wp.boundary_mask()
    assert wp.boundary_mask(["special"]).sum() == 2


def test_unknown_tokenizers_fail_fast_with_clear_errors(tmp_path):
    with pytest.raises(TokenizerError, match="cannot load tokenizer 'no-such-org/no-such-model'"):
        load_tokenizer("no-such-org/no-such-model")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="unknown embedded tokenizer 'nope'"):
        load_tokenizer("embedded:nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TokenizerError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path / "x.txt")
    (tmp_path / "bad.json").write_text(json.dumps({"model": 1}))
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="cannot load a tokenizer from a int"):
        load_tokenizer(3)


def test_load_is_cached():
    assert load_tokenizer("embedded:gpt2") is load_tokenizer("embedded:gpt2")
    assert load_tokenizer(load_tokenizer("bytes")) is load_tokenizer("bytes")


@pytest.mark.slow
def test_smollm2(corpus):
    tok = load_tokenizer("embedded:smollm2")
    assert tok.vocab_size == 49152 and tok.kind == "byte_level"
    for text, enc in zip(corpus, tok.encode_batch(corpus), strict=True):
        raw = text.encode("utf-8")
        assert b"".join(raw[a:b] for a, b in enc.spans.tolist()) == raw
        assert enc.ids.tolist() == tok.hf(text, add_special_tokens=False)["input_ids"]
