"""The training data path (xtd/data_plan.py, xtd/examples.py, xtd/train_data.py): pure
helpers against slow references, the step plan, and the store → micro-batch path on a tiny
real store."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from xtd.config import ALMSettings, DataSettings
from xtd.data_plan import Pieces, StepPlan, document_piece, estimate_piece_rows, read_piece
from xtd.errors import ConfigError, DataError
from xtd.examples import pad_examples, token_loss_mask, truncate_example
from xtd.losses import LOGPROB_FLOOR, teacher_sigma
from xtd.losses.registry import loss_specs
from xtd.train_data import StepDataset, TrainData

# ----------------------------------------------------------------------------- references


def _sigma_ref(logmass: np.ndarray, columns: list[int]) -> np.ndarray:
    out = []
    for row in logmass.astype(np.float64):
        total = sum(math.exp(row[c]) for c in columns)
        out.append(min(0.0, math.log(total)) if total > 0 else -math.inf)
    return np.array(out, dtype=np.float64)


def _mask_ref(spans: np.ndarray, loss_spans: np.ndarray | None) -> np.ndarray:
    if loss_spans is None:
        return np.ones(len(spans), dtype=bool)
    out = []
    for s, e in spans:
        hit = False
        for ls, le in loss_spans:
            if s == e:
                hit |= ls <= s < le
            else:
                hit |= bool(set(range(s, e)) & set(range(ls, le)))
        out.append(hit)
    return np.array(out, dtype=bool)


def _random_spans(rng: np.random.Generator, n: int, specials: bool = True) -> np.ndarray:
    lengths = rng.integers(0 if specials else 1, 5, size=n)
    ends = np.cumsum(lengths)
    return np.stack([ends - lengths, ends], axis=1).astype(np.int32)


# ----------------------------------------------------------------------------- teacher σ


@pytest.mark.parametrize("seed", range(30))
def test_teacher_sigma_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 20))
    logmass = np.log(rng.dirichlet(np.ones(5), size=n)[:, :4]).astype(np.float16)
    logmass[rng.random(logmass.shape) < 0.2] = -np.inf  # classes with zero mass
    columns = sorted(rng.choice(4, size=int(rng.integers(1, 5)), replace=False).tolist())
    got = teacher_sigma(logmass, columns)
    want = _sigma_ref(logmass, columns)
    assert got.dtype == np.float32 and got.shape == (n,)
    assert np.array_equal(got == LOGPROB_FLOOR, np.isneginf(want))  # no mass: the floor, never −inf
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-6)
    assert np.all(got <= 0)


def test_teacher_sigma_clamps_at_zero_and_handles_empty() -> None:
    # Masses that sum past 1 (fp16 rounding) still give σ ≤ 0 (docs/method.md, "Debiasing": min(0, ·)).
    assert teacher_sigma(np.array([[math.log(0.6), math.log(0.6), -np.inf, -np.inf]], np.float32), [0, 1])[0] == 0.0
    assert teacher_sigma(np.zeros((0, 4), np.float16), [0, 1, 2, 3]).shape == (0,)


# ----------------------------------------------------------------------------- loss mask


@pytest.mark.parametrize("seed", range(30))
def test_token_loss_mask_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    spans = _random_spans(rng, int(rng.integers(0, 15)))
    total = int(spans[-1, 1]) if len(spans) else 5
    m = int(rng.integers(0, 4))
    starts = np.sort(rng.integers(0, total + 1, size=m))
    loss_spans = np.stack([starts, starts + rng.integers(0, 6, size=m)], axis=1).astype(np.int64)
    np.testing.assert_array_equal(token_loss_mask(spans, loss_spans), _mask_ref(spans, loss_spans))


def test_token_loss_mask_edge_cases() -> None:
    spans = np.array([[0, 0], [0, 3], [3, 5]], dtype=np.int32)
    assert token_loss_mask(spans, None).all()
    assert not token_loss_mask(spans, np.zeros((0, 2), np.int64)).any()
    assert token_loss_mask(np.zeros((0, 2), np.int32), np.array([[0, 4]])).shape == (0,)
    np.testing.assert_array_equal(token_loss_mask(spans, np.array([[3, 5]])), [False, False, True])


# ----------------------------------------------------------------------------- truncation


def _truncate_ref(s_spans, t_spans, max_s, max_t):
    ns = min(len(s_spans), max_s)
    covered = s_spans[ns - 1][1] if ns else 0
    if ns == len(s_spans):
        nt = len(t_spans)
    else:
        nt = sum(1 for _, e in t_spans if e <= covered)
    if max_t is not None:
        nt = min(nt, max_t)
    return ns, nt


@pytest.mark.parametrize("seed", range(30))
def test_truncate_example_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    text_len = int(rng.integers(0, 60))
    cuts = lambda k: np.unique(np.concatenate([[0], np.sort(rng.integers(0, text_len + 1, size=k)), [text_len]]))  # noqa: E731
    to_spans = lambda c: np.stack([c[:-1], c[1:]], axis=1).astype(np.int32)  # noqa: E731
    s_spans = to_spans(cuts(int(rng.integers(0, 20)))) if text_len else np.zeros((0, 2), np.int32)
    t_spans = to_spans(cuts(int(rng.integers(0, 20)))) if text_len else np.zeros((0, 2), np.int32)
    max_s = int(rng.integers(1, 25))
    max_t = None if rng.random() < 0.5 else int(rng.integers(1, 25))
    got = truncate_example(s_spans, t_spans, max_student_length=max_s, max_teacher_length=max_t)
    assert got == _truncate_ref(s_spans, t_spans, max_s, max_t)
    # Every kept teacher row ends within the bytes of the kept student tokens.
    ns, nt = got
    if ns < len(s_spans) and nt:
        assert t_spans[nt - 1, 1] <= s_spans[ns - 1, 1]


# ----------------------------------------------------------------------------- padding


def test_pad_examples_pads_each_side_to_its_longest() -> None:
    rng = np.random.default_rng(0)
    examples = []
    for s, t in [(3, 5), (1, 2), (0, 0)]:
        examples.append(
            {
                "input_ids": rng.integers(1, 9, s),
                "attention_mask": np.ones(s, bool),
                "student_chunk": np.arange(s),
                "student_scored": np.ones(s, bool),
                "sft_mask": np.ones(s, bool),
                "teacher_logprob": -rng.random(t).astype(np.float32),
                "teacher_sigma": -rng.random(t).astype(np.float32),
                "teacher_chunk": np.arange(t),
                "teacher_scored": np.ones(t, bool),
                "teacher_topk_ids": rng.integers(0, 9, (t, 2)),
            }
        )
    batch = pad_examples(examples, pad_id=7)
    assert batch["input_ids"].shape == (3, 3) and batch["input_ids"].dtype == torch.long
    assert batch["teacher_logprob"].shape == (3, 5) and batch["teacher_topk_ids"].shape == (3, 5, 2)
    assert batch["input_ids"][1].tolist()[1:] == [7, 7] and batch["input_ids"][2].tolist() == [7, 7, 7]
    assert batch["student_chunk"][1].tolist() == [0, -1, -1]
    assert batch["teacher_chunk"][2].tolist() == [-1] * 5
    assert not batch["attention_mask"][2].any() and not batch["teacher_scored"][1, 2:].any()
    for i, example in enumerate(examples):  # values are kept untouched
        n = len(example["teacher_logprob"])
        np.testing.assert_array_equal(batch["teacher_logprob"][i, :n].numpy(), example["teacher_logprob"])
    # An all-empty micro-batch still has one position per side.
    empty = pad_examples([examples[2]])
    assert empty["input_ids"].shape == (1, 1) and empty["teacher_chunk"].shape == (1, 1)


# ----------------------------------------------------------------------------- step plan


def test_step_plan_visits_every_document_once_per_epoch() -> None:
    plan = StepPlan((7, 6), batch_size=4, seed=3)
    seen = np.concatenate([plan.global_indices(s) for s in range(13)])  # 52 positions = 4 epochs
    for epoch in range(4):
        assert sorted(seen[epoch * 13 : (epoch + 1) * 13].tolist()) == list(range(13))
    assert not np.array_equal(seen[:13], seen[13:26])  # each epoch is reshuffled
    again = StepPlan((7, 6), batch_size=4, seed=3)
    assert np.array_equal(again.global_indices(9), plan.global_indices(9))  # pure in (seed, step)
    assert not np.array_equal(StepPlan((7, 6), batch_size=4, seed=4).global_indices(0), plan.global_indices(0))


def test_step_plan_ranks_partition_the_global_batch() -> None:
    plans = [StepPlan((10,), batch_size=6, seed=0, rank=r, world_size=3) for r in range(3)]
    for step in range(5):
        parts = np.concatenate([p.rank_indices(step) for p in plans])
        assert sorted(parts.tolist()) == sorted(plans[0].global_indices(step).tolist())


def test_step_plan_locates_documents_across_stores() -> None:
    plan = StepPlan((3, 0, 2), batch_size=1)
    assert [plan.locate(i) for i in range(5)] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]


def test_step_plan_rejects_bad_sizes() -> None:
    with pytest.raises(DataError, match="no documents"):
        StepPlan((0,), batch_size=2)
    with pytest.raises(ConfigError, match="multiple of the number of ranks"):
        StepPlan((5,), batch_size=3, world_size=2)


# ----------------------------------------------------------------------------- long documents → pieces


@pytest.mark.parametrize("max_rows", [1, 3, 7, 50])
def test_pieces_cover_every_row_once_and_keep_short_documents_whole(max_rows: int) -> None:

    rows = [0, 1, 5, 7, 8, 23, 50, 51]
    pieces = Pieces.of(rows, max_rows)
    covered: dict[int, list[tuple[int, int]]] = {d: [] for d in range(len(rows))}
    for p in range(len(pieces)):
        d, lo, hi, whole = pieces.locate(p)
        covered[d].append((lo, hi))
        assert whole == (rows[d] <= max_rows)
        assert hi - lo <= max_rows or rows[d] == 0
    for d, ranges in covered.items():
        assert ranges[0][0] == 0 and ranges[-1][1] == rows[d]  # from the first row to the last
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1  # as equal as rows allow
        assert len(ranges) == max(1, -(-rows[d] // max_rows))


# ----------------------------------------------------------------------------- store → micro-batches


def _texts() -> list[str]:
    return [
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles",
        "Emoji: 👩\u200d👩\u200d👧 family — CJK: 你好，世界。",
        "",
        "a",
        "def f(x):\n    if x:\n        return [i for i in range(x)]\n\treturn None\n",
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_lm) -> object:
    from _stores import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("batching"), tiny_lm, _texts())


def _spec(store, tok, *, max_student_length=16, micro_batch_tokens=None, losses=("alm", "sft"), **kwargs):
    base = dict(
        stores=(str(store),),
        student_tokenizer=tok,
        plan=StepPlan((len(_texts()),), batch_size=6, seed=1),
        micro_batch_size=4,
        data=DataSettings(batch_size=6, max_student_length=max_student_length, micro_batch_tokens=micro_batch_tokens),
        alm=ALMSettings(),
        losses=loss_specs(losses),
    )
    base.update(kwargs)
    return TrainData(**base)


def test_examples_cover_identical_bytes_per_chunk(store, tok_b_path) -> None:
    # Every chunk covers the same bytes on both sides (docs/method.md, "Chunks"), after truncation.
    from xtd.storage import open_store
    from xtd.tokenization import load_tokenizer

    tok = load_tokenizer(str(tok_b_path))
    data = StepDataset(_spec(store, tok))
    reader = open_store(store)
    for d in range(len(reader)):
        ex = data.example(d)
        doc = reader[d]
        assert len(ex["input_ids"]) <= 16
        t_spans = np.asarray(doc.token_spans)[: len(ex["teacher_chunk"])]
        s_spans = tok.encode(doc.text.decode()).spans[: len(ex["input_ids"])]
        for c in set(ex["teacher_chunk"].tolist()) - {-1}:
            t_rows = np.flatnonzero(ex["teacher_chunk"] == c)
            s_rows = np.flatnonzero(ex["student_chunk"] == c)
            assert len(s_rows) and len(t_rows)
            t_bytes = (t_spans[t_rows].min(), t_spans[t_rows].max())
            s_bytes = (s_spans[s_rows].min(), s_spans[s_rows].max())
            assert t_bytes == s_bytes, (d, c)
        # Scored rows: row ≥ 1, finite teacher log-prob, in a chunk.
        assert not ex["teacher_scored"][:1].any() and not ex["student_scored"][:1].any()
        assert np.all(ex["teacher_chunk"][ex["teacher_scored"]] >= 0)
        np.testing.assert_allclose(
            ex["teacher_sigma"], teacher_sigma(np.asarray(doc.boundary_logmass)[: len(t_spans)], [0, 1, 2, 3])
        )


def test_step_items_sort_by_length_and_count_normalisers(store, tok_b_path) -> None:
    from xtd.tokenization import load_tokenizer

    tok = load_tokenizer(str(tok_b_path))
    item = StepDataset(_spec(store, tok))[0]
    batches = item["micro_batches"]
    assert [len(b["input_ids"]) for b in batches] == [4, 2]
    lengths = [int(row.sum()) for b in batches for row in b["attention_mask"]]
    assert lengths == sorted(lengths, reverse=True)  # length bucketing within the step
    for batch, counts in zip(batches, item["counts"], strict=True):
        assert batch["input_ids"].shape[1] == max(1, int(batch["attention_mask"].sum(1).max()))  # padded to longest
        assert counts["sft"] == int(batch["sft_mask"].sum()) and counts["alm"] >= 0
    assert sorted(item["documents"]) == list(range(6))


def _pack_reference(lengths, max_texts, max_tokens):
    """Greedy packing written out step by step: longest first, stable among equals."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable
    groups = []
    for i in order:
        if groups:
            g = groups[-1]
            padded = (len(g) + 1) * max(lengths[j] for j in g + [i])
            if len(g) < max_texts and (max_tokens is None or padded <= max_tokens):
                g.append(i)
                continue
        groups.append([i])
    return groups


@pytest.mark.parametrize("seed", range(30))
def test_pack_micro_batches_matches_reference_and_budget(seed: int) -> None:
    from xtd.packing import pack_longest_first

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=int(rng.integers(1, 25))).tolist()
    max_texts = int(rng.integers(1, 10))
    max_tokens = None if seed % 5 == 0 else int(rng.integers(10, 200))
    groups = pack_longest_first(lengths, max_items=max_texts, max_tokens=max_tokens)
    assert groups == _pack_reference(lengths, max_texts, max_tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= max_texts
        padded = len(g) * max(lengths[i] for i in g)
        assert max_tokens is None or padded <= max_tokens or len(g) == 1


def test_token_budget_micro_batches_in_a_step(store, tok_b_path) -> None:
    from xtd.tokenization import load_tokenizer

    tok = load_tokenizer(str(tok_b_path))
    whole = StepDataset(_spec(store, tok, micro_batch_size=6))[0]
    packed = StepDataset(_spec(store, tok, micro_batch_size=6, micro_batch_tokens=24))[0]
    assert len(whole["micro_batches"]) == 1 and len(packed["micro_batches"]) > 1
    for batch in packed["micro_batches"]:
        b, s = batch["input_ids"].shape
        assert b * s <= 24 or b == 1
    # Same texts, same global counts: the step's normalisers do not depend on the cut.
    for name in ("alm", "sft"):
        assert sum(c[name] for c in packed["counts"]) == whole["counts"][0][name]


def test_alignment_cache_gives_the_same_examples(store, tok_b_path, tmp_path) -> None:
    import shutil

    from typer.testing import CliRunner

    from xtd.cli import app
    from xtd.storage import list_alignments
    from xtd.tokenization import load_tokenizer

    cached_store = tmp_path / "store"
    shutil.copytree(store, cached_store)
    result = CliRunner().invoke(app, ["align", "--cache", str(cached_store), "--student-tokenizer", str(tok_b_path)])
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(str(tok_b_path))
    assert list_alignments(cached_store) == [tok.digest]
    live = StepDataset(_spec(store, tok))
    cached = StepDataset(_spec(cached_store, tok, alignment_cache=(tok.digest,)))
    for d in range(len(_texts())):
        a, b = live.example(d), cached.example(d)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"document {d}: {key}")


def test_dataloader_workers_give_the_same_steps(store, tok_b_path) -> None:
    from xtd.tokenization import load_tokenizer

    tok = load_tokenizer(str(tok_b_path))
    dataset = StepDataset(_spec(store, tok))
    steps = range(2, 5)
    inline = list(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=steps, num_workers=0))
    workers = list(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=steps, num_workers=2))
    for x, y in zip(inline, workers, strict=True):
        assert x["documents"] == y["documents"] and x["counts"] == y["counts"]
        for bx, by in zip(x["micro_batches"], y["micro_batches"], strict=True):
            for key in bx:
                assert torch.equal(bx[key], by[key]), key


def test_long_documents_become_pieces_that_tile_them(store, tok_b_path) -> None:
    """Every piece is a text of its own: together they cover the document's rows and bytes once."""
    from xtd.storage import open_store
    from xtd.tokenization import load_tokenizer

    tok = load_tokenizer(str(tok_b_path))
    reader = open_store(store)
    assert 5 < estimate_piece_rows([reader], tok, 16) < 40  # both tokenizers are small BPEs
    pieces = Pieces.of(reader.doc_num_tokens(), 6)
    assert len(pieces) > len(reader)
    plan = StepPlan((len(pieces),), batch_size=6, seed=1)
    data = StepDataset(_spec(store, tok, plan=plan, max_student_length=64, pieces=(pieces,)))
    by_doc: dict[int, list[int]] = {}
    for p in range(len(pieces)):
        by_doc.setdefault(pieces.locate(p)[0], []).append(p)
    for d, ps in by_doc.items():
        doc = reader[d]
        parts = [read_piece(reader, d, *pieces.locate(p)[1:3], doc.num_tokens) for p in ps]
        starts = [0]
        for part in parts[:-1]:
            starts.append(starts[-1] + part.num_tokens)
        assert b"".join(part.text for part in parts) == doc.text
        np.testing.assert_array_equal(np.concatenate([part.token_ids for part in parts]), doc.token_ids)
        for p, part in zip(ps, parts, strict=True):
            ex = data.example(p)
            assert len(ex["teacher_logprob"]) == part.num_tokens  # no truncation at 64 tokens
            s_spans = tok.encode(part.text.decode()).spans
            assert len(ex["input_ids"]) == len(s_spans)
            for c in set(ex["teacher_chunk"].tolist()) - {-1}:  # chunks cover equal bytes
                t_rows = np.flatnonzero(ex["teacher_chunk"] == c)
                s_rows = np.flatnonzero(ex["student_chunk"] == c)
                t_bytes = (part.token_spans[t_rows].min(), part.token_spans[t_rows].max())
                assert t_bytes == (s_spans[s_rows].min(), s_spans[s_rows].max())
            assert not ex["teacher_scored"][:1].any() and not ex["student_scored"][:1].any()
            # stored teacher log-probs keep the whole document's context
            lo = starts[ps.index(p)]
            t_lp = np.asarray(doc.token_logprob[lo : lo + part.num_tokens])
            scored = ex["teacher_scored"]
            np.testing.assert_array_equal(ex["teacher_logprob"][scored], np.minimum(t_lp[scored], 0))


def test_document_piece_shifts_spans_and_clips_loss_spans() -> None:
    from xtd.storage import Document

    text = b"hello brave new world"
    spans = np.array([[0, 0], [0, 5], [5, 11], [11, 15], [15, 21]], dtype=np.int32)
    doc = Document(
        text=text,
        token_ids=np.arange(5, dtype=np.int32),
        token_spans=spans,
        token_logprob=np.zeros(5, np.float32),
        boundary_logmass=np.zeros((5, 4), np.float16),
        loss_spans=np.array([[3, 8], [16, 21]], dtype=np.int64),
        doc_index=3,
    )
    window = dataclasses.replace(doc, token_ids=doc.token_ids[2:4], token_spans=spans[2:4],
                                 token_logprob=doc.token_logprob[2:4], boundary_logmass=doc.boundary_logmass[2:4])
    piece = document_piece(window)
    assert piece.text == b" brave new" and piece.token_spans.tolist() == [[0, 6], [6, 10]]
    assert piece.loss_spans.tolist() == [[0, 3]] and piece.doc_index == 3

