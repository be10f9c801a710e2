"""xtd.align_ids: spans from ids equal the encoder's spans on real tokenizers (SentencePiece
dummy prefix included), batched space chunks equal a slow per-chunk reference over many
random seeds (slots, one-sided slots, truncation, empty documents), and align_ids equals
the span path for both chunk kinds."""

from __future__ import annotations

import numpy as np
import pytest
from test_align import _random_case, _spans

from xtd.align import Alignment, align_many, space_chunks
from xtd.align_ids import align_ids, align_ids_both, space_chunks_many, spans_from_ids
from xtd.errors import TokenizerError
from xtd.tokenization import load_tokenizer, tokenizer_from_json

REAL = ["embedded:gpt2", "embedded:llama3", "embedded:mistral-v1", "embedded:qwen3", "bytes"]


def ref_space_chunks(al: Alignment, t_space, s_space) -> tuple[list[int], list[int], list[list[int]], list[bool]]:
    """Space chunks literally: walk the chunks, close a group at a slot, before a slot, where
    the next chunk starts with a space on both sides, or at the end; groups take the
    members' byte range."""
    first_t, first_s = {}, {}
    for k, c in enumerate(al.teacher_chunk.tolist()):
        if c >= 0 and c not in first_t:
            first_t[c] = k
    for k, c in enumerate(al.student_chunk.tolist()):
        if c >= 0 and c not in first_s:
            first_s[c] = k
    group, g = [], 0
    for c in range(al.num_chunks):
        group.append(g)
        last = c == al.num_chunks - 1
        if (last or al.chunk_slot[c] or al.chunk_slot[c + 1]
                or (t_space[first_t[c + 1]] and s_space[first_s[c + 1]])):
            g += 1
    spans = [[None, None] for _ in range(g)]
    slot = [False] * g
    for c in range(al.num_chunks):
        lo, hi = al.chunk_bytes[c].tolist()
        cur = spans[group[c]]
        cur[0] = lo if cur[0] is None else min(cur[0], lo)
        cur[1] = hi if cur[1] is None else max(cur[1], hi)
        slot[group[c]] |= bool(al.chunk_slot[c])
    t = [group[c] if c >= 0 else -1 for c in al.teacher_chunk.tolist()]
    s = [group[c] if c >= 0 else -1 for c in al.student_chunk.tolist()]
    return t, s, spans, slot


@pytest.mark.parametrize("seed", range(30))
def test_space_chunks_many_equals_reference(seed):
    rng = np.random.default_rng(seed)
    cases = [_random_case(rng) for _ in range(20)]
    pairs = [(_spans(tl), _spans(sl), np.array(ts, np.int64), np.array(ss, np.int64)) for tl, ts, sl, ss in cases]
    alignments = align_many(pairs)
    t_space = [rng.random(a.teacher_chunk.size) < 0.4 for a in alignments]
    s_space = [rng.random(a.student_chunk.size) < 0.4 for a in alignments]
    got = space_chunks_many(alignments, t_space, s_space)
    for al, ts, ss, g in zip(alignments, t_space, s_space, got, strict=True):
        t, s, spans, slot = ref_space_chunks(al, ts, ss)
        assert g.teacher_chunk.tolist() == t and g.student_chunk.tolist() == s
        assert g.num_chunks == len(spans) and g.chunk_bytes.tolist() == spans and g.chunk_slot.tolist() == slot
        assert g.teacher_chunk.dtype == np.int32
        one = space_chunks(al, ts, ss)  # the one-document case of the same pass
        assert one.teacher_chunk.tolist() == t and one.chunk_bytes.tolist() == spans


def test_space_chunks_many_edges_and_errors():
    empty = np.zeros((0, 2), np.int64)
    alignments = align_many([(empty, empty), (np.array([[0, 3]]), np.array([[0, 3]])), (empty, np.array([[0, 1]]))])
    got = space_chunks_many(alignments, [np.zeros(0, bool), [True], []], [[], [False], [True]])
    assert [g.num_chunks for g in got] == [0, 1, 0]
    assert got[1].teacher_chunk.tolist() == [0] and got[2].student_chunk.tolist() == [-1]
    assert space_chunks_many([], [], []) == []
    with pytest.raises(ValueError, match="one entry per token"):
        space_chunks_many(alignments, [[], [True, False], []], [[], [False], [True]])
    with pytest.raises(ValueError, match="one teacher_space"):
        space_chunks_many(alignments, [[]], [[]])


@pytest.mark.parametrize("name", REAL)
def test_spans_from_ids_equal_the_encoder(name, corpus):
    tok = load_tokenizer(name)
    texts = [*corpus, "", " lead", "  two", "\tx", "x "]
    for special in (False, True):
        encs = tok.encode_batch(texts, add_special_tokens=special)
        got = spans_from_ids(tok, [e.ids for e in encs])
        for e, g in zip(encs, got, strict=True):
            assert g.dtype == np.int32 and np.array_equal(g, e.spans)
    assert spans_from_ids(tok, []) == []


def test_spans_from_ids_errors(tok_a):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = load_tokenizer(tok_a)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        spans_from_ids(tok, [np.array([0, tok.vocab_size])])
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]"], show_progress=False)
    wp.train_from_iterator(["hello world"] * 5, trainer=trainer)
    with pytest.raises(TokenizerError, match="WordPiece"):
        spans_from_ids(tokenizer_from_json(wp.to_str(), name="wp"), [np.array([1, 2])])


@pytest.mark.parametrize(("teacher", "student"), [("embedded:gpt2", "embedded:llama3"),
                                                  ("embedded:mistral-v1", "embedded:qwen3"),
                                                  ("embedded:llama3", "bytes")])
@pytest.mark.parametrize("special", [False, True])
def test_align_ids_equals_the_span_path(teacher, student, special, corpus):
    tt, st = load_tokenizer(teacher), load_tokenizer(student)
    te = tt.encode_batch(corpus, add_special_tokens=special)
    se = st.encode_batch(corpus, add_special_tokens=special)
    t_ids = [e.ids[:k] for e, k in zip(te, range(3, 10**6, 7), strict=False)]  # truncated teachers
    t_ids += [e.ids for e in te[len(t_ids):]]
    pairs = [(t.spans[: len(i)], s.spans, tt.special_mask(i), st.special_mask(s.ids))
             for t, i, s in zip(te, t_ids, se, strict=True)]
    want = align_many(pairs)
    both = align_ids_both(tt, st, t_ids, [e.ids for e in se])
    for k, kind in enumerate(("unconstrained", "space")):
        got = align_ids(tt, st, t_ids, [e.ids for e in se], chunks=kind)
        assert [a.teacher_chunk.tolist() for a in got] == [a.teacher_chunk.tolist() for a in both[k]]
        for d, (w, g, ti, s) in enumerate(zip(want, got, t_ids, se, strict=True)):
            if kind == "space":
                w = space_chunks(w, tt.boundary_class[ti] == 0, st.boundary_class[s.ids] == 0)
            assert np.array_equal(g.teacher_chunk, w.teacher_chunk), d
            assert np.array_equal(g.student_chunk, w.student_chunk), d
            assert np.array_equal(g.chunk_bytes, w.chunk_bytes) and np.array_equal(g.chunk_slot, w.chunk_slot)


def test_align_ids_errors():
    gpt2 = load_tokenizer("embedded:gpt2")
    with pytest.raises(ValueError, match="documents"):
        align_ids(gpt2, gpt2, [np.array([1])], [])
    with pytest.raises(ValueError, match="unknown chunk kind"):
        align_ids(gpt2, gpt2, [np.array([1])], [np.array([1])], chunks="merged")  # type: ignore[arg-type]
