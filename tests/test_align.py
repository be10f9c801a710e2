"""Alignment (docs/method.md, "Chunks"): the worked-example vectors, a slow two-pointer reference on random
span pairs, edge cases, and properties on real tokenizers over adversarial text."""

from __future__ import annotations

import numpy as np
import pytest

from xtd.align import (
    Alignment,
    align,
    align_many,
    merge_groups,
    repair_leading_space,
    space_chunks,
    spans_from_views,
)
from xtd.errors import ByteIdentityError
from xtd.tokenization import load_tokenizer

# --- helpers ---------------------------------------------------------------------------


def _chunks(a: Alignment) -> list[tuple[int, int, int, int]]:
    """Chunks as (teacher range | student range) tuples, the notation of docs/method.md, "Worked example"."""
    return [(*t, *s) for t, s in zip(a.teacher_ranges.tolist(), a.student_ranges.tolist(), strict=True)]


def reference_walk(t_lens, t_slot, s_lens, s_slot):
    """docs/method.md, "Chunks", literally: two pointers, running byte counts, slot units at boundaries.

    Lengths are byte-view lengths (slot tokens 0), slot labels -1 = text, ≥ 0 = slot.
    Returns (teacher chunk ids, student chunk ids, chunk byte ranges, slot flags).
    """
    n, m = len(t_lens), len(s_lens)
    tc, sc = [-1] * n, [-1] * m
    i = j = 0
    pos = 0  # byte position of the last chunk end
    ct = cs = 0
    open_t: list[int] = []
    open_s: list[int] = []
    chunk_bytes, chunk_slot = [], []

    def units(labels, k):
        out = []
        while k < len(labels) and labels[k] >= 0:
            e = k
            while e + 1 < len(labels) and labels[e + 1] == labels[k]:
                e += 1
            out.append((labels[k], k, e + 1))
            k = e + 1
        return out, k

    while True:
        if not open_t and not open_s:  # at a chunk boundary
            if i >= n or j >= m:
                break
            if t_slot[i] >= 0 or s_slot[j] >= 0:
                tu, i_next = units(t_slot, i)
                su, j_next = units(s_slot, j)
                t_keep = [u for u in tu if u[0] in {x[0] for x in su}]
                s_keep = [u for u in su if u[0] in {x[0] for x in tu}]
                for a, b in zip(t_keep, s_keep, strict=False):
                    assert a[0] == b[0], "different slots at one position"
                    c = len(chunk_bytes)
                    for k in range(a[1], a[2]):
                        tc[k] = c
                    for k in range(b[1], b[2]):
                        sc[k] = c
                    chunk_bytes.append((pos, pos))
                    chunk_slot.append(True)
                i, j = i_next, j_next
                continue
        # advance the side with the smaller running count (the teacher when equal)
        if ct <= cs:
            if i >= n:
                break  # the teacher is exhausted: the student's pending tokens get no chunk
            if t_slot[i] >= 0:  # a one-sided slot inside a chunk
                i += 1
                continue
            open_t.append(i)
            ct += t_lens[i]
            i += 1
        else:
            if j >= m:
                break
            if s_slot[j] >= 0:
                j += 1
                continue
            open_s.append(j)
            cs += s_lens[j]
            j += 1
        if ct == cs and ct > 0:
            c = len(chunk_bytes)
            for k in open_t:
                tc[k] = c
            for k in open_s:
                sc[k] = c
            chunk_bytes.append((pos, pos + ct))
            chunk_slot.append(False)
            pos += ct
            ct = cs = 0
            open_t, open_s = [], []
    # A side exhausted with tokens pending on the other: they stay -1. If the last chunk
    # closed exactly at the end, the other side's pending tokens also stay -1.
    return np.array(tc), np.array(sc), np.array(chunk_bytes).reshape(-1, 2), np.array(chunk_slot, bool)


def _random_case(rng: np.random.Generator):
    """A random text length, two tilings, shared/one-sided slots and truncation."""
    n = int(rng.integers(0, 30))
    cuts_t = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, n))), replace=False)) if n > 1 else np.array([], int)
    cuts_s = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, n))), replace=False)) if n > 1 else np.array([], int)
    bounds_t = [0, *cuts_t.tolist(), n] if n else [0]
    bounds_s = [0, *cuts_s.tolist(), n] if n else [0]
    common = sorted(set(bounds_t) & set(bounds_s))
    # slots at shared boundaries (label drawn from 0..3), sometimes on one side only
    slots_at: dict[int, tuple[list[int], list[int]]] = {}
    for p in common:
        if rng.random() < 0.3:
            labels = sorted(rng.choice(4, size=int(rng.integers(1, 3)), replace=False).tolist())
            t_lab = [x for x in labels if rng.random() < 0.8]
            s_lab = [x for x in labels if rng.random() < 0.8]
            slots_at[p] = (t_lab, s_lab)

    def build(bounds, side):
        lens, labels = [], []
        for k in range(len(bounds)):
            p = bounds[k]
            if p in slots_at:
                for lab in slots_at[p][side]:
                    for _ in range(int(rng.integers(1, 3))):  # a unit may have several tokens
                        lens.append(0)
                        labels.append(lab)
            if k + 1 < len(bounds):
                lens.append(bounds[k + 1] - p)
                labels.append(-1)
        return lens, labels

    t_lens, t_slot = build(bounds_t, 0)
    s_lens, s_slot = build(bounds_s, 1)
    if rng.random() < 0.3 and t_lens:  # truncation of one side (docs/method.md, "Chunks")
        cut = int(rng.integers(0, len(t_lens) + 1))
        t_lens, t_slot = t_lens[:cut], t_slot[:cut]
    if rng.random() < 0.3 and s_lens:
        cut = int(rng.integers(0, len(s_lens) + 1))
        s_lens, s_slot = s_lens[:cut], s_slot[:cut]
    return t_lens, t_slot, s_lens, s_slot


def _spans(lens):
    ends = np.cumsum(np.asarray(lens, dtype=np.int64))
    return np.stack([ends - np.asarray(lens, dtype=np.int64), ends], axis=1) if lens else np.zeros((0, 2), np.int64)


# --- docs/method.md, "Worked example" vectors --------------------------------------------------------------------


def test_vector_10_1_subword_vs_subword():
    t = spans_from_views([b"Hel", b"lo", b" world"])
    s = spans_from_views([b"Hello", b" wor", b"ld"])
    a = align(t, s)
    assert set(t[:, 1].tolist()) == {3, 5, 11} and set(s[:, 1].tolist()) == {5, 9, 11}
    assert _chunks(a) == [(0, 2, 0, 1), (2, 3, 1, 3)]
    assert a.chunk_bytes.tolist() == [[0, 5], [5, 11]]


def test_vector_10_2_byte_level_student():
    t = spans_from_views([b"Hello", b" world", b"!"])
    s = spans_from_views([bytes([b]) for b in b"Hello world!"])
    a = align(t, s)
    assert _chunks(a) == [(0, 1, 0, 5), (1, 2, 5, 11), (2, 3, 11, 12)]


# slot ids for 10.3/10.4: bos, start_header, user_name, end_header, eot
BOS, START, USER, END, EOT = 0, 1, 2, 3, 4


def test_vector_10_3_different_chat_templates():
    # Teacher (Gemma2) [<bos>, <start_of_turn>, user, Ċ, Hi, <end_of_turn>, Ċ]
    t_slot = np.array([BOS, START, USER, END, -1, EOT, EOT])
    # Student (Llama3) [<|begin_of_text|>, <|start_header_id|>, user, <|end_header_id|>, ĊĊ, Hi, <|eot_id|>]
    s_slot = np.array([BOS, START, USER, END, END, -1, EOT])
    t = spans_from_views([b""] * 4 + [b"Hi"] + [b""] * 2)
    s = spans_from_views([b""] * 5 + [b"Hi", b""])
    a = align(t, s, teacher_special=t_slot, student_special=s_slot)
    assert _chunks(a) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3), (3, 4, 3, 5), (4, 5, 5, 6), (5, 7, 6, 7)]
    assert a.chunk_slot.tolist() == [True, True, True, True, False, True]
    assert a.chunk_bytes.tolist() == [[0, 0]] * 4 + [[0, 2], [2, 2]]


def test_vector_10_4_missing_bos_on_one_side():
    t_slot = np.array([START, USER, END, -1])  # Qwen2 [<|im_start|>, user, Ċ, Hi]
    s_slot = np.array([BOS, START, USER, END, END, -1])  # Llama3 with bos
    t = spans_from_views([b"", b"", b"", b"Hi"])
    s = spans_from_views([b""] * 5 + [b"Hi"])
    a = align(t, s, teacher_special=t_slot, student_special=s_slot)
    assert a.teacher_chunk.tolist() == [0, 1, 2, 3]
    assert a.student_chunk.tolist() == [-1, 0, 1, 2, 2, 3]
    assert a.num_chunks == 4


def test_vector_10_5_leading_space_repair():
    t, s = repair_leading_space([b" a", b"b"], [b"a", b"b"])
    assert (t, s) == ([b" a", b"b"], [b" a", b"b"])
    a = align(spans_from_views(t), spans_from_views(s))
    assert _chunks(a) == [(0, 1, 0, 1), (1, 2, 1, 2)]
    t, s = repair_leading_space([b"  ", b" a"], [b"   a"])
    assert (t, s) == ([b"  ", b" a"], [b"   a"])  # equal counts (3): nothing repaired
    assert _chunks(align(spans_from_views(t), spans_from_views(s))) == [(0, 2, 0, 1)]


def test_repair_is_pure_and_skips_leading_slots():
    t_in, s_in = [b"", b"x"], [b"", b"  x"]
    t, s = repair_leading_space(t_in, s_in, [True, False], [True, False])
    assert t == [b"", b"  x"] and s == [b"", b"  x"]
    assert t_in == [b"", b"x"]  # the reference mutates in place (docs/method.md, "Deviations from the reference implementation"); we do not


def test_vector_10_6_unconstrained_vs_space():
    t_views = [b"", b" Hel", b"lo", b" world", b"!"]
    s_views = [b"", b" Hello", b" wor", b"ld", b"!"]
    special = np.array([True, False, False, False, False])
    a = align(spans_from_views(t_views), spans_from_views(s_views), teacher_special=special, student_special=special)
    assert a.teacher_chunk.tolist() == [0, 1, 1, 2, 3]
    assert a.student_chunk.tolist() == [0, 1, 2, 2, 3]
    t_space = np.array([v[:1] == b" " for v in t_views])
    s_space = np.array([v[:1] == b" " for v in s_views])
    sp = space_chunks(a, t_space, s_space)
    assert sp.teacher_chunk.tolist() == [0, 1, 1, 2, 2]
    assert sp.student_chunk.tolist() == [0, 1, 2, 2, 2]
    assert sp.chunk_bytes.tolist() == [[0, 0], [0, 6], [6, 13]]
    # padded to 7 rows: padding (slot id -2) belongs to no chunk
    pad_t = np.array([1, -1, -1, -1, -1, -2, -2])
    a7 = align(spans_from_views(t_views + [b"", b""]), spans_from_views(s_views + [b"", b""]),
               teacher_special=pad_t, student_special=pad_t)
    assert a7.teacher_chunk.tolist() == [0, 1, 1, 2, 3, -1, -1]
    assert a7.student_chunk.tolist() == [0, 1, 2, 2, 3, -1, -1]


def test_vector_10_9_merge_grouping():
    prob = np.array([0.9, 0.05, 0.5, 0.01, 0.3])
    keep = prob > 0.1
    assert keep.tolist() == [True, False, True, False, True]
    g = merge_groups(keep)
    assert g.tolist() == [0, 1, 1, 2, 2]
    counts = np.bincount(g, weights=[0, 1, 2, 1, 1], minlength=5)
    assert counts.tolist() == [0, 3, 2, 0, 0]
    assert int((counts > 0).sum()) == 2  # xtd divides by 2 (docs/method.md, "Deviations from the reference implementation")


def test_merge_groups_reference_and_edges():
    assert merge_groups(np.zeros(0, bool)).tolist() == []
    assert merge_groups(np.array([False])).tolist() == [0]
    assert merge_groups(np.array([False, False, False])).tolist() == [0, 0, 0]
    for seed in range(50):
        keep = np.random.default_rng(seed).random(int(seed % 17) + 1) < 0.4
        ref = [sum(keep[:c]) for c in range(keep.size)]
        assert merge_groups(keep).tolist() == ref
    with pytest.raises(ValueError):
        merge_groups(np.zeros((2, 2), bool))


# --- vectorised vs the reference walk ------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_align_many_equals_reference_walk(seed):
    rng = np.random.default_rng(seed)
    cases = [_random_case(rng) for _ in range(25)]
    pairs = [(_spans(tl), _spans(sl), np.array(ts, np.int64), np.array(ss, np.int64)) for tl, ts, sl, ss in cases]
    got = align_many(pairs)
    for (tl, ts, sl, ss), a in zip(cases, got, strict=True):
        tc, sc, cb, slot = reference_walk(tl, ts, sl, ss)
        assert a.teacher_chunk.tolist() == tc.tolist()
        assert a.student_chunk.tolist() == sc.tolist()
        assert a.chunk_bytes.tolist() == cb.tolist()
        assert a.chunk_slot.tolist() == slot.tolist()
        # single-document call agrees with the batched one
        one = align(_spans(tl), _spans(sl), teacher_special=np.array(ts, np.int64), student_special=np.array(ss, np.int64))
        assert one.teacher_chunk.tolist() == a.teacher_chunk.tolist()


@pytest.mark.parametrize("seed", range(20))
def test_plain_text_batches_equal_reference_walk(seed):
    """The slot-free path (pairs without special masks): empty tokens, offsets, truncation."""
    rng = np.random.default_rng(1000 + seed)
    cases, pairs = [], []
    for _ in range(30):
        t_lens, _, s_lens, _ = _random_case(rng)
        t_lens, s_lens = [x for x in t_lens if x], [x for x in s_lens if x]  # drop slot tokens
        for lens in (t_lens, s_lens):  # zero-length text tokens (e.g. an absorbed "▁")
            for _ in range(int(rng.integers(0, 3))):
                lens.insert(int(rng.integers(0, len(lens) + 1)), 0)
        start = int(rng.integers(0, 50))  # windows of a longer document start anywhere
        cases.append((t_lens, s_lens, start))
        pairs.append((_spans(t_lens) + start, _spans(s_lens) + start))
    for (t_lens, s_lens, start), a in zip(cases, align_many(pairs), strict=True):
        tc, sc, cb, slot = reference_walk(t_lens, [-1] * len(t_lens), s_lens, [-1] * len(s_lens))
        assert a.teacher_chunk.tolist() == tc.tolist()
        assert a.student_chunk.tolist() == sc.tolist()
        assert a.chunk_bytes.tolist() == (cb + start).tolist()
        assert not slot.any() and not a.chunk_slot.any()


def test_edge_cases_empty_single_and_all_special():
    empty = np.zeros((0, 2), np.int64)
    a = align(empty, empty)
    assert a.num_chunks == 0 and a.teacher_chunk.shape == (0,) and a.chunk_bytes.shape == (0, 2)
    a = align(np.array([[0, 3]]), np.array([[0, 3]]))
    assert a.teacher_chunk.tolist() == [0] and a.chunk_bytes.tolist() == [[0, 3]]
    a = align(np.array([[0, 3]]), empty)  # one side empty: nothing aligns
    assert a.teacher_chunk.tolist() == [-1] and a.num_chunks == 0
    sp = np.array([[0, 0], [0, 0]])
    a = align(sp, sp[:1], teacher_special=np.array([True, True]), student_special=np.array([True]))
    assert a.teacher_chunk.tolist() == [0, -1] and a.chunk_slot.tolist() == [True]
    assert align_many([]) == []
    # a zero-length text token (SentencePiece "▁" absorbed at the start) joins the first chunk
    a = align(np.array([[0, 0], [0, 2]]), np.array([[0, 2]]))
    assert a.teacher_chunk.tolist() == [0, 0]


def test_truncation_stops_at_first_exhausted_side():
    t = spans_from_views([b"ab", b"cd", b"ef"])
    s = spans_from_views([b"a", b"bcd", b"e", b"f"])
    a = align(t[:2], s)  # teacher truncated at byte 4
    assert a.teacher_chunk.tolist() == [0, 0] and a.student_chunk.tolist() == [0, 0, -1, -1]
    a = align(t, s[:3])  # student truncated at byte 5, inside the teacher's "ef"
    assert a.teacher_chunk.tolist() == [0, 0, -1] and a.student_chunk.tolist() == [0, 0, -1]
    assert a.chunk_bytes.tolist() == [[0, 4]]


def test_bad_input_errors():
    with pytest.raises(ByteIdentityError, match="does not continue"):
        align(np.array([[0, 2], [3, 5]]), np.array([[0, 5]]))
    with pytest.raises(ByteIdentityError, match="start at byte"):
        align(np.array([[1, 5]]), np.array([[0, 5]]))
    with pytest.raises(ByteIdentityError, match="special|continue"):
        align(np.array([[0, 2]]), np.array([[0, 2]]), teacher_special=np.array([True]), student_special=np.array([False]))
    with pytest.raises(ByteIdentityError, match="different chat-template slots"):
        align(np.array([[0, 0], [0, 0]]), np.array([[0, 0], [0, 0]]),
              teacher_special=np.array([1, 2]), student_special=np.array([2, 1]))
    with pytest.raises(ValueError, match="shape"):
        align(np.array([[0, 2]]), np.array([[0, 2]]), teacher_special=np.array([True, False]))


# --- real tokenizers over adversarial text ------------------------------------------------

REAL = ["embedded:gpt2", "embedded:llama3", "embedded:mistral-v1", "bytes"]


def _check_pair(tt, st, texts, *, add_special_tokens=False):
    te = tt.encode_batch(texts, add_special_tokens=add_special_tokens)
    se = st.encode_batch(texts, add_special_tokens=add_special_tokens)
    pairs = [(a.spans, b.spans, tt.special_mask(a.ids), st.special_mask(b.ids)) for a, b in zip(te, se, strict=True)]
    for text, a, b, al in zip(texts, te, se, align_many(pairs), strict=True):
        raw = text.encode("utf-8")
        t_text = ~tt.special_mask(a.ids)
        s_text = ~st.special_mask(b.ids)
        # chunks partition both sequences: every text token in exactly one chunk, in order
        assert (al.teacher_chunk[t_text] >= 0).all() and (al.student_chunk[s_text] >= 0).all()
        assert np.all(np.diff(al.teacher_chunk[al.teacher_chunk >= 0]) >= 0)
        assert set(al.teacher_chunk[al.teacher_chunk >= 0]) == set(range(al.num_chunks))
        assert set(al.student_chunk[al.student_chunk >= 0]) == set(range(al.num_chunks))
        # each chunk's bytes are equal on both sides and tile the text
        for c in range(al.num_chunks):
            tb = b"".join(tt.token_bytes[i] for i in a.ids[al.teacher_chunk == c])
            sb = b"".join(st.token_bytes[i] for i in b.ids[al.student_chunk == c])
            lo, hi = al.chunk_bytes[c]
            if tt.kind != "sentencepiece" and st.kind != "sentencepiece":
                assert tb == sb == raw[lo:hi]
            t_lo, t_hi = a.spans[al.teacher_chunk == c][[0, -1], [0, 1]]
            s_lo, s_hi = b.spans[al.student_chunk == c][[0, -1], [0, 1]]
            assert (t_lo, t_hi) == (s_lo, s_hi) == (lo, hi)
        text_chunks = ~al.chunk_slot
        assert al.chunk_bytes[text_chunks, 1].tolist() == sorted(
            set(a.spans[t_text, 1].tolist()) & set(b.spans[s_text, 1].tolist()) - {0}
        )
        assert b"".join(raw[lo:hi] for lo, hi in al.chunk_bytes) == raw


@pytest.mark.parametrize("teacher", REAL)
@pytest.mark.parametrize("student", REAL)
def test_real_tokenizer_pairs(teacher, student, corpus):
    if teacher == student and teacher != "bytes":
        pytest.skip("same tokenizer covered by the bytes pair")
    _check_pair(load_tokenizer(teacher), load_tokenizer(student), corpus)


def test_real_pairs_with_special_tokens(corpus):
    llama, mistral = load_tokenizer("embedded:llama3"), load_tokenizer("embedded:mistral-v1")
    _check_pair(llama, mistral, corpus, add_special_tokens=True)  # bos pairs with bos
    te = llama.encode(corpus[0], add_special_tokens=True)
    se = mistral.encode(corpus[0], add_special_tokens=True)
    al = align(te.spans, se.spans, teacher_special=llama.special_mask(te.ids), student_special=mistral.special_mask(se.ids))
    assert al.chunk_slot[0] and al.teacher_chunk[0] == 0 and al.student_chunk[0] == 0


def test_fixture_tokenizers(tok_a, tok_b, corpus):
    _check_pair(load_tokenizer(tok_a), load_tokenizer(tok_b), corpus)


@pytest.mark.slow
def test_smollm2_against_llama3(corpus):
    _check_pair(load_tokenizer("embedded:smollm2"), load_tokenizer("embedded:llama3"), corpus)


def test_real_truncation(corpus):
    gpt2, llama = load_tokenizer("embedded:gpt2"), load_tokenizer("embedded:llama3")
    text = corpus[3] + corpus[8]
    a, b = gpt2.encode(text), llama.encode(text)
    for k in (1, 5, len(a) // 2):
        al = align(a.spans[:k], b.spans)
        end = a.spans[k - 1, 1]
        assert (al.student_chunk[b.spans[:, 1] > end] == -1).all()
        assert al.num_chunks == 0 or al.chunk_bytes[-1, 1] <= end
