"""xtd.teacher: stored quantities against independent recomputation with the model.

The references here never use xtd's scoring code: they run the transformers model on
the whole token sequence, take ``log_softmax`` and sum probabilities in plain loops.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from xtd.errors import ConfigError, ModelLoadError
from xtd.packing import pack_longest_first, plan_windows
from xtd.scoring import TeacherInput, score_documents, score_texts
from xtd.teacher import TeacherSource, load_teacher, weights_digest
from xtd.tokenization import load_tokenizer

TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "a",
    "tabs\tand\ttabs\t\tand newlines\n\n\nand \r\n windows line ends\r\n",
    "Emoji: 👩‍👩‍👧‍👦 family, 👍🏽 thumbs. CJK: 你好，世界。",
    "def f(x):\n    if x:\n        return [i for i in range(x)]\n\treturn None\n",
]


# -- reference computations ------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _reference_model(model_dir: str):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _full_logprobs(model_dir: Path | str, ids: np.ndarray, vocab: int) -> torch.Tensor:
    """(N, V) log-softmax of the model's fp32 logits over the whole sequence, first V ids, in fp64."""
    model = _reference_model(str(model_dir))
    with torch.no_grad():
        logits = model(torch.as_tensor(ids[None].astype(np.int64))).logits[0, :, :vocab].float()
    return torch.log_softmax(logits.double(), dim=-1)  # fp64: the reference itself adds no error


def _class_of(token: bytes, special: bool) -> int:
    if special:
        return 3
    if not token:
        return -1
    return {0x20: 0, 0x0A: 1, 0x09: 2}.get(token[0], -1)


def _check_against_reference(doc, model_dir, tok, top_k: int) -> None:  # noqa: ANN001
    logp = _full_logprobs(model_dir, doc.token_ids, tok.vocab_size)  # (N, V)
    n = len(doc.token_ids)
    assert np.isnan(doc.token_logprob[0])
    ref = np.array([float(logp[r - 1, doc.token_ids[r]]) for r in range(1, n)], dtype=np.float32)
    np.testing.assert_allclose(doc.token_logprob[1:], ref, atol=1e-4, rtol=0)
    specials = set(int(i) for i in tok.special_ids)
    classes = np.array([_class_of(tok.token_bytes[v], v in specials) for v in range(tok.vocab_size)])
    probs = logp.exp().double().numpy()
    for c in range(4):
        mass = probs[:, classes == c].sum(axis=1)
        with np.errstate(divide="ignore"):
            expected = np.minimum(np.log(mass), 0.0)
        np.testing.assert_allclose(doc.boundary_logmass[:, c].astype(np.float64), expected, rtol=2e-3, atol=2e-3)
    if top_k:
        vals, idx = torch.topk(logp, top_k, dim=-1)
        np.testing.assert_allclose(doc.topk_logprobs, vals.numpy(), atol=1e-4)
        assert (np.sort(doc.topk_ids, 1) == np.sort(idx.numpy(), 1)).mean() > 0.99  # ties may swap
        tail = 1.0 - np.exp(vals.double().numpy()).sum(1)
        # The tail is a difference of two sums: accurate in mass (≈1e-6), not in log.
        np.testing.assert_allclose(np.exp(doc.tail_logmass.astype(np.float64)), tail, atol=1e-5)


# -- plans -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_windows_score_every_row_once_with_context(seed: int) -> None:
    rng = np.random.default_rng(seed)
    max_length = int(rng.integers(2, 40))
    stride = int(rng.integers(1, max_length))
    n = int(rng.integers(0, 200))
    windows = plan_windows(n, max_length, stride)
    covered = np.zeros(n, dtype=int)
    for i, (start, end, new_from) in enumerate(windows):
        assert 0 <= start <= new_from < end <= n or n == 0
        assert end - start <= max_length
        covered[new_from:end] += 1
        if i:
            assert new_from - start == stride  # every later row has >= stride tokens of context
    assert (covered == 1).all()


def test_windows_edge_cases() -> None:
    assert plan_windows(0, 8, 2) == [(0, 0, 0)]
    assert plan_windows(1, 8, 2) == [(0, 1, 0)]
    assert plan_windows(8, 8, 2) == [(0, 8, 0)]
    assert plan_windows(9, 8, 2) == [(0, 8, 0), (6, 9, 8)]
    with pytest.raises(ConfigError):
        plan_windows(5, 8, 8)
    with pytest.raises(ConfigError):
        plan_windows(5, 8, 0)


@pytest.mark.parametrize("seed", range(30))
def test_batches_respect_budget_and_cover_all(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 50, size=int(rng.integers(0, 60))).tolist()
    budget = int(rng.integers(1, 300))
    batches = pack_longest_first(lengths, max_tokens=budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert width * len(b) <= budget or len(b) == 1
    assert batches == pack_longest_first(lengths, max_tokens=budget)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


# -- exactness ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tiny_lm):  # noqa: ANN001, ANN201
    return load_teacher(str(tiny_lm))


def test_quantities_equal_independent_recomputation(teacher, tiny_lm) -> None:  # noqa: ANN001
    docs = list(score_texts(teacher, TEXTS, top_k=8, batch_tokens=64, hidden=True))
    assert [d.doc_index for d in docs] == list(range(len(TEXTS)))
    for text, doc in zip(TEXTS, docs, strict=True):
        assert doc.text == text.encode("utf-8")
        assert doc.token_logprob.dtype == np.float32 and doc.boundary_logmass.dtype == np.float16
        assert doc.topk_ids.shape == (len(doc.token_ids), 8) and doc.hidden.dtype == np.float16
        assert (doc.token_logprob[1:] <= 0).all() and (doc.boundary_logmass <= 0).all()
        _check_against_reference(doc, tiny_lm, teacher.tokenizer, 8)


def test_hidden_is_final_norm_output(teacher, tiny_lm) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    (doc,) = score_texts(teacher, [TEXTS[0]], top_k=0, hidden=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm)).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(doc.token_ids[None].astype(np.int64)), output_hidden_states=True)
        h = model.model(torch.as_tensor(doc.token_ids[None].astype(np.int64))).last_hidden_state[0]
        logits = model.lm_head(h)
    np.testing.assert_allclose(doc.hidden.astype(np.float32), h.numpy(), atol=2e-3, rtol=2e-3)
    # lm_head(hidden) reproduces the logits: it is the input of the output layer.
    np.testing.assert_allclose(logits.numpy(), out.logits[0].numpy(), atol=1e-4)


def test_top_k_zero_and_too_large(teacher) -> None:  # noqa: ANN001
    (doc,) = score_texts(teacher, ["hello there"], top_k=0)
    assert doc.topk_ids is None and doc.topk_logprobs is None and doc.tail_logmass is None and doc.hidden is None
    with pytest.raises(ConfigError, match=r"--top-k \(401\).*400"):
        list(score_texts(teacher, ["x"], top_k=401))
    (full,) = score_texts(teacher, ["hello"], top_k=400)
    np.testing.assert_allclose(np.exp(full.topk_logprobs.astype(np.float64)).sum(1), 1.0, atol=1e-4)
    assert (full.tail_logmass == -np.inf).all() or (full.tail_logmass < -8).all()


def test_empty_and_single_token_documents(teacher) -> None:  # noqa: ANN001
    empty, single = score_texts(teacher, ["", "a"], top_k=4, hidden=True)
    assert empty.token_ids.shape == (0,) and empty.boundary_logmass.shape == (0, 4) and empty.hidden.shape == (0, 32)
    assert single.token_ids.shape == (1,) and np.isnan(single.token_logprob).all()
    assert np.isfinite(single.boundary_logmass.astype(np.float32)).any()


def test_logit_slicing_and_batching_do_not_change_results(teacher) -> None:  # noqa: ANN001
    a = list(score_texts(teacher, TEXTS, top_k=4, batch_tokens=10_000))
    inputs = [TeacherInput(i, t) for i, t in enumerate(TEXTS)]
    b = list(score_documents(teacher, inputs, top_k=4, batch_tokens=7, logits_budget_bytes=1))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_allclose(x.token_logprob, y.token_logprob, atol=1e-5)
        np.testing.assert_allclose(x.boundary_logmass.astype(np.float32), y.boundary_logmass.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-5)


def test_skip_reproduces_the_tail_bit_for_bit(teacher) -> None:  # noqa: ANN001
    # ~40-80 bytes per document, pools of 300 bytes: several pools of several documents.
    texts = [f"document {i}: " + "lorem ipsum " * (i % 5 + 2) for i in range(24)]
    inputs = [TeacherInput(i, t) for i, t in enumerate(texts)]
    kwargs = {"top_k": 4, "batch_tokens": 128, "pool_bytes": 300}
    full = list(score_documents(teacher, inputs, **kwargs))
    for skip in (0, 7, 15, 23, 24):
        tail = list(score_documents(teacher, inputs, skip=skip, **kwargs))
        assert [d.doc_index for d in tail] == list(range(skip, 24))
        for x, y in zip(full[skip:], tail, strict=True):
            np.testing.assert_array_equal(x.token_logprob, y.token_logprob)
            np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)


# -- windows -----------------------------------------------------------------------------


def test_short_document_same_windowed_and_not(teacher) -> None:  # noqa: ANN001
    (a,) = score_texts(teacher, [TEXTS[0]], top_k=4, max_length=2048, stride=512)
    n = len(a.token_ids)
    (b,) = score_texts(teacher, [TEXTS[0]], top_k=4, max_length=n, stride=n // 2)
    np.testing.assert_allclose(a.token_logprob, b.token_logprob, atol=1e-6)
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-6)


def test_long_document_windowed_matches_full_pass(tok_a, tmp_path: Path) -> None:  # noqa: ANN001
    """A sliding-window model (2 layers × window 8) sees only 16 tokens back, so windows
    with stride >= 16 cover its whole context: windowed rows must equal one full pass."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok_a),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,  # every layer slides
        max_position_embeddings=4096,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    # transformers maps model_type qwen2 to a tokenizer class that adds an NFC normaliser,
    # so the source is assembled by hand with tok_a (what resolve_teacher does for a folder).
    source = TeacherSource(
        name="sliding-qwen2",
        folder=tmp_path,
        revision=None,
        tokenizer=load_tokenizer(tok_a),
        weights_digest=weights_digest(tmp_path),
        config=config,
    )
    teacher = load_teacher(source)
    text = " ".join(TEXTS) * 4
    (full,) = score_texts(teacher, [text], top_k=4, max_length=4096, stride=16, hidden=True)
    n = len(full.token_ids)
    assert n > 300
    (win,) = score_texts(teacher, [text], top_k=4, max_length=48, stride=16, batch_tokens=96, hidden=True)
    np.testing.assert_array_equal(full.token_ids, win.token_ids)
    np.testing.assert_allclose(win.token_logprob, full.token_logprob, atol=1e-3)
    np.testing.assert_allclose(win.topk_logprobs, full.topk_logprobs, atol=1e-3)
    np.testing.assert_allclose(win.boundary_logmass.astype(np.float32), full.boundary_logmass.astype(np.float32), atol=5e-3)
    np.testing.assert_allclose(win.hidden.astype(np.float32), full.hidden.astype(np.float32), atol=5e-3)
    _check_against_reference(win, tmp_path, teacher.tokenizer, 4)


def test_long_document_first_window_exact_for_full_attention(teacher) -> None:  # noqa: ANN001
    text = " ".join(TEXTS) * 2
    (full,) = score_texts(teacher, [text], top_k=0, max_length=2048)
    (win,) = score_texts(teacher, [text], top_k=0, max_length=32, stride=8)
    np.testing.assert_allclose(win.token_logprob[:32], full.token_logprob[:32], atol=1e-5)
    assert np.isfinite(win.token_logprob[1:]).all()  # every later row scored, with context


# -- vocabulary and tokenizers -------------------------------------------------------------


def test_padded_vocabulary_is_excluded(tok_a, tmp_path: Path) -> None:  # noqa: ANN001
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tok_a) + 24,  # padded embedding matrix
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[len(tok_a) :] += 5.0  # padded rows would dominate the softmax
    model.save_pretrained(tmp_path)
    tok_a.save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path))
    assert teacher.vocab_size == len(tok_a)
    (doc,) = score_texts(teacher, [TEXTS[0]], top_k=8)
    assert doc.topk_ids.max() < len(tok_a)
    _check_against_reference(doc, tmp_path, teacher.tokenizer, 8)


def _tile_check(doc) -> None:  # noqa: ANN001
    spans = doc.token_spans
    text_rows = spans[:, 1] > spans[:, 0]
    pieces = spans[text_rows]
    assert pieces[0, 0] == 0 and pieces[-1, 1] == len(doc.text)
    assert (pieces[1:, 0] == pieces[:-1, 1]).all()
    assert (spans[~text_rows, 0] == spans[~text_rows, 1]).all()


@pytest.mark.parametrize("name", ["gpt2", "mistral-v1", "smollm2"])
def test_spans_tile_bytes_for_real_tokenizers(name: str, tmp_path: Path, corpus) -> None:  # noqa: ANN001
    from conftest import make_tiny_llama

    tok = load_tokenizer(f"embedded:{name}")
    folder = make_tiny_llama(tok.hf, tmp_path / name, hidden=16, layers=1)
    teacher = load_teacher(str(folder))
    texts = [t for t in corpus if t] + TEXTS[:2]
    docs = list(score_texts(teacher, texts, top_k=2, batch_tokens=512))
    for text, doc in zip(texts, docs, strict=True):
        assert doc.text == text.encode("utf-8")
        _tile_check(doc)
        assert b"".join(doc.text[a:b] for a, b in doc.token_spans) == doc.text
    if name == "mistral-v1":  # a BOS row with an empty span at byte 0
        assert docs[0].token_ids[0] == teacher.tokenizer.bos_id and tuple(docs[0].token_spans[0]) == (0, 0)
    _check_against_reference(docs[0], folder, teacher.tokenizer, 2)


def test_chat_text_specials_become_empty_rows(teacher) -> None:  # noqa: ANN001
    rendered = "<|endoftext|>user: hi<|endoftext|>assistant: yo!<|endoftext|>"
    a = rendered.index("yo!")
    span = (len(rendered[:a].encode()), len(rendered[:a].encode()) + 3)
    (doc,) = score_documents(teacher, [TeacherInput(0, rendered, chat=True, loss_spans=[span])], top_k=0)
    eot = teacher.tokenizer.hf.convert_tokens_to_ids("<|endoftext|>")
    assert doc.text == b"user: hiassistant: yo!"
    assert (doc.token_ids == eot).sum() == 3 and doc.token_ids[0] == eot
    _tile_check(doc)
    assert doc.text[doc.loss_spans[0, 0] : doc.loss_spans[0, 1]] == b"yo!"
    (plain,) = score_texts(teacher, [rendered], top_k=0)  # plain text: the string is text
    assert (plain.token_ids == eot).sum() == 0 and plain.text == rendered.encode()


# -- loading -------------------------------------------------------------------------------


def test_unknown_teacher_fails_fast(tmp_path: Path) -> None:
    import time

    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"not in the Hugging Face cache"):
        load_teacher("no-such-org/no-such-model-xtd")
    with pytest.raises(ModelLoadError, match=r"does not exist"):
        load_teacher(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelLoadError, match=r"no config.json"):
        load_teacher(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"unknown embedded teacher"):
        load_teacher("embedded:gpt5")
    assert time.perf_counter() - started < 10


def test_weights_digest_tracks_weights(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    from transformers import AutoModelForCausalLM

    first = weights_digest(tiny_lm)
    assert first == weights_digest(tiny_lm) and len(first) == 16
    copy = tmp_path / "copy"
    shutil.copytree(tiny_lm, copy)
    assert weights_digest(copy) == first
    model = AutoModelForCausalLM.from_pretrained(str(copy))
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(copy)
    assert weights_digest(copy) != first


def test_describe_records_identity(teacher) -> None:  # noqa: ANN001
    info = teacher.describe()
    assert info["dtype"] == "fp32" and info["vocab_size"] == 400 and len(info["weights_digest"]) == 16
    assert info["name"] and info["hidden_size"] == 32 and teacher.split_head


def test_bf16_autocast_on_cpu_is_close(tiny_lm, teacher) -> None:  # noqa: ANN001
    fast = load_teacher(str(tiny_lm), dtype="bf16")
    assert fast.dtype == "bf16" and fast.autocast_dtype == torch.bfloat16
    (a,) = score_texts(teacher, [TEXTS[0]], top_k=0)
    (b,) = score_texts(fast, [TEXTS[0]], top_k=0)
    np.testing.assert_allclose(a.token_logprob, b.token_logprob, atol=0.1)
    with pytest.raises(ConfigError, match=r"--dtype"):
        load_teacher(str(tiny_lm), dtype="int8")


@pytest.mark.slow
def test_smollm2_quantities_exact(corpus) -> None:  # noqa: ANN001
    from xtd.assets import embedded_teacher_dir

    teacher = load_teacher()
    texts = [TEXTS[0], TEXTS[3], corpus[2], "The quick brown fox jumps over the lazy dog. " * 6]
    docs = list(score_texts(teacher, texts, top_k=8, batch_tokens=256))
    assert sum(len(d.token_ids) for d in docs) >= 150
    for doc in docs:
        _tile_check(doc)
        _check_against_reference(doc, embedded_teacher_dir(), teacher.tokenizer, 8)
