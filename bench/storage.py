"""Benchmark of the teacher shard store: bytes per token, write/read speed, window latency.

Data is realistic in shape without running a teacher: documents are real text (the
embedded public-domain corpus) tokenised by the real GPT-2 byte-level BPE through
``tokenizers``, so ids, spans and text are exactly what precompute stores. Teacher
outputs come from a *calibrated Zipf model*: at each position the next-token
distribution over 50,257 ranks is p(r) ∝ r^-a with a drawn from a mixture (10 %
confident, a ∈ [2.5, 5]; 90 % uncertain, a ∈ [1.0, 1.5]); the realised next token is
drawn from that same distribution (so ℓ is calibrated), the top-k log-probs are the
first k ranks' (jittered, kept sorted), the tail mass is exact, and the boundary mass
of each class sums p over ranks whose token — the realised one at its rank, others
drawn with the vocabulary's class frequencies — belongs to the class. The top-k ids
are K *distinct* ids (the realised token at its rank), drawn from the corpus unigram
(0.5 % uniformly from the vocabulary).

The parameters were calibrated against real top-32 outputs of SmolLM2-135M-Instruct on
3,870 corpus tokens: mean log-prob at ranks 1, 2, 4, 8, 16, 32 of −1.1, −2.7, −3.9,
−4.9, −6.0, −6.9 nats (this model: −1.4, −2.4, −3.5, −4.5, −5.6, −6.9); 7,403 distinct
ids in 3,870 rows, 7 % of them ≥ 20,000 (this model: 8,223 and 8 %). Outside the top-k
it is flatter than the real teacher (mean ℓ −4.7 vs −3.1 nats). Non-quick runs also
score ≈ 4,600 real tokens with that teacher and report their store in
``metrics["real_teacher"]``.

``python bench/storage.py [--quick]`` prints one JSON line and a table; the
compressor comparison behind xtd.storage.codecs is in ``metrics["compressors"]``, and the
cost of the read checks (every file checksummed on its first read) in
``metrics["read_check_speed_ratio"]``: streaming with them ÷ without, alternating runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import main, result, target  # noqa: E402

from xtd.storage import BOUNDARY_CLASSES, Document, StoreWriter, open_store  # noqa: E402

TOP_K = 32
ALM_ARRAYS = ("token_ids", "token_spans", "token_logprob", "boundary_logmass")
# Teacher model parameters (module docstring), calibrated against real SmolLM2 outputs.
UNCERTAIN_A = (1.0, 1.5)
CONFIDENT_A = (2.5, 5.0)
CONFIDENT_SHARE = 0.1
TOPK_JITTER = 0.1
UNIFORM_ID_SHARE = 0.005
STUDENT_TOKENS_PER_S = (
    8_000  # a small student training on 2 CPU cores (measured here: 150–200 tok/s for 135M)
)


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from xtd.assets import gpt2_vocab_merges_paths

    vocab, merges = gpt2_vocab_merges_paths()
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _token_classes(tok: Any) -> np.ndarray:
    """(V,) int8 boundary class of each id by its first byte (space 0, newline 1, tab 2, none -1)."""
    # GPT-2 shows bytes as characters: Ġ = space, Ċ = newline, ĉ = tab (docs/method.md, "Byte view of a tokenizer").
    vocab = tok.get_vocab()
    classes = np.full(max(vocab.values()) + 1, -1, dtype=np.int8)
    for piece, i in vocab.items():
        first = piece[:1]
        classes[i] = {"Ġ": 0, "Ċ": 1, "ĉ": 2}.get(first, -1)
    return classes


def _distinct_rows(ids: np.ndarray, fixed: np.ndarray, draw: Any) -> np.ndarray:
    """Redraw repeated ids until every row holds K distinct ids, as a real top-k does.

    Args:
        ids: (N, K) int candidate ids (drawn with replacement, so rows repeat frequent ids).
        fixed: (N, K) bool entries that must stay (the realised token at its rank).
        draw: ``draw(size) -> int array`` of fresh candidates.
    """
    ids = ids.copy()
    while True:
        # Equal ids sort next to each other, a fixed entry first; every later one is redrawn.
        order = np.argsort(ids.astype(np.int64) * 2 + ~fixed, axis=1, kind="stable")
        s = np.take_along_axis(ids, order, axis=1)
        again_sorted = np.zeros(ids.shape, dtype=bool)
        again_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
        if not again_sorted.any():
            return ids
        again = np.zeros(ids.shape, dtype=bool)
        np.put_along_axis(again, order, again_sorted, axis=1)
        ids[again] = draw(int(again.sum()))


class _ZipfTeacher:
    """The calibrated Zipf model of the module docstring (vectorised over positions)."""

    def __init__(self, vocab_size: int, class_of_id: np.ndarray, rng: np.random.Generator) -> None:
        self.v = vocab_size
        self.rng = rng
        self.grid = np.concatenate([np.linspace(*UNCERTAIN_A, 48), np.linspace(*CONFIDENT_A, 16)])
        ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
        logw = -self.grid[:, None] * np.log(ranks)[None, :]  # (G, V)
        self.logz = np.logaddexp.reduce(logw, axis=1)  # (G,)
        self.cdf = np.cumsum(np.exp(logw - self.logz[:, None]), axis=1)  # (G, V)
        self.class_freq = np.array([(class_of_id == c).mean() for c in range(3)])
        self.head = 64  # ranks whose class is drawn individually; beyond: expected mass

    def score(
        self, ids: np.ndarray, class_of_id: np.ndarray, unigram: np.ndarray
    ) -> dict[str, np.ndarray]:
        n, rng, k = len(ids), self.rng, TOP_K
        g = np.where(
            rng.random(n) < CONFIDENT_SHARE, rng.integers(48, 63, n), rng.integers(0, 47, n)
        )  # (N,)
        # A continuous exponent inside the grid cell; log Z interpolated (real log-probs
        # are continuous, a discrete set would compress unrealistically well).
        frac = rng.random(n)
        a = self.grid[g] + frac * (self.grid[g + 1] - self.grid[g])
        logz = self.logz[g] + frac * (self.logz[g + 1] - self.logz[g])
        # Realised token i+1 sits at a rank drawn from the distribution at row i.
        u = rng.random(n)
        rank = np.array(
            [np.searchsorted(self.cdf[gi], ui) + 1 for gi, ui in zip(g, u, strict=True)]
        )
        rank = np.minimum(rank, self.v)
        logp_rank = lambda r: -a[:, None] * np.log(r) - logz[:, None]  # noqa: E731
        top = logp_rank(np.arange(1, k + 1, dtype=np.float64)[None, :])  # (N, K)
        # Real top-k lists are not exact power laws: jitter, then keep them sorted.
        top = -np.sort(
            -(top + rng.normal(0.0, TOPK_JITTER, size=top.shape) * np.abs(top) ** 0.5), axis=1
        )
        top = np.minimum(top, 0.0)
        tail = np.log1p(-np.minimum(np.exp(top).sum(1), 1 - 1e-12))
        # Candidates are mostly frequent tokens (corpus unigram), sometimes any token.
        draw = lambda size: np.where(  # noqa: E731
            rng.random(size) >= UNIFORM_ID_SHARE,
            rng.choice(self.v, size=size, p=unigram),
            rng.choice(self.v, size=size),
        )
        topk_ids = draw((n, k))
        nxt = np.concatenate([ids[1:], [ids[-1]]]) if n else ids
        hit = rank <= k
        topk_ids[hit, rank[hit] - 1] = nxt[hit]
        fixed = np.zeros((n, k), dtype=bool)
        fixed[hit, rank[hit] - 1] = True
        topk_ids = _distinct_rows(topk_ids, fixed, draw)
        # Boundary masses: head ranks get sampled classes, the realised token its own.
        head_cls = rng.choice(
            4, size=(n, self.head), p=[*self.class_freq, 1 - self.class_freq.sum()]
        )
        head_hit = rank <= self.head
        head_cls[head_hit, rank[head_hit] - 1] = np.where(
            class_of_id[nxt[head_hit]] >= 0, class_of_id[nxt[head_hit]], 3
        )
        head_p = np.exp(
            logp_rank(np.arange(1, self.head + 1, dtype=np.float64)[None, :])
        )  # (N, 64)
        rest = np.maximum(1 - head_p.sum(1), 0)
        mass = np.stack(
            [(head_p * (head_cls == c)).sum(1) + rest * self.class_freq[c] for c in range(3)], 1
        )
        special_mass = np.full((n, 1), 1e-7) + 0.02 * (rng.random((n, 1)) < 0.01)
        boundary = np.log(np.concatenate([mass, special_mass], 1) + 1e-30).astype(np.float16)
        logprob = (-a * np.log(rank) - logz).astype(np.float32)
        logprob = np.concatenate([[np.nan], logprob[:-1]]).astype(np.float32) if n else logprob
        return {
            "token_logprob": logprob,
            "boundary_logmass": boundary,
            "topk_ids": topk_ids.astype(np.int32),
            "topk_logprobs": top.astype(np.float32),
            "tail_logmass": tail.astype(np.float32),
        }


def make_documents(target_tokens: int, seed: int = 0) -> list[Document]:
    """Real text, real GPT-2 tokenisation, calibrated Zipf teacher outputs."""
    from xtd.assets import iter_embedded_corpus

    tok = _tokenizer()
    classes = _token_classes(tok)
    teacher = _ZipfTeacher(tok.get_vocab_size(), classes, np.random.default_rng(seed))
    encoded = []
    total = 0
    for record in iter_embedded_corpus():
        text = record["text"]
        enc = tok.encode(text)
        # Offsets from tokenizers are in characters; convert to byte offsets.
        char_to_byte = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])])
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        encoded.append(
            (
                text.encode(),
                np.asarray(enc.ids, dtype=np.int32),
                char_to_byte[offsets].astype(np.int32),
            )
        )
        total += len(enc.ids)
        if total >= target_tokens:
            break
    counts = np.bincount(
        np.concatenate([ids for _, ids, _ in encoded]), minlength=tok.get_vocab_size()
    )
    unigram = (counts + 0.01) / (counts + 0.01).sum()
    docs: list[Document] = []
    for data, ids, spans in encoded:
        out = teacher.score(ids, classes, unigram)
        docs.append(
            Document(text=data, token_ids=ids, token_spans=spans, doc_index=len(docs), **out)
        )
    return docs


def compare_compressors(docs: list[Document], chunk_rows: int) -> dict[str, dict[str, Any]]:
    """Stored bytes/token and decode speed of every array under each candidate compressor."""
    import zarr
    from zarr.storage import MemoryStore

    from xtd.storage.codecs import encode_topk, filters_for, make_compressor, pack_topk

    n = sum(d.num_tokens for d in docs)
    topk = pack_topk(
        np.concatenate([d.topk_ids for d in docs]),
        encode_topk(np.concatenate([d.topk_logprobs for d in docs]), "q8"),
        "q8",
    )
    arrays = {
        "text": np.frombuffer(b"".join(d.text for d in docs), np.uint8),
        **{
            name: np.concatenate([getattr(d, name) for d in docs])
            for name in (*ALM_ARRAYS, "tail_logmass")
        },
        **topk,
    }
    candidates = {
        "none": ("none", None),
        "zstd-3": ("zstd", 3),
        "zstd-9": ("zstd", 9),
        "blosc-lz4-shuffle": ("blosc-lz4", "shuffle"),
        "blosc-zstd-shuffle": ("blosc-zstd", "shuffle"),
        "blosc-zstd-bitshuffle": ("blosc-zstd", "bitshuffle"),
        "blosc-zstd9-shuffle": ("blosc-zstd9", "shuffle"),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, data in arrays.items():
        row: dict[str, Any] = {}
        for label, kind in candidates.items():
            store = MemoryStore()
            rows = len(data)
            inner = min(chunk_rows, rows)
            arr = zarr.create_array(
                store,
                shape=data.shape,
                dtype=data.dtype,
                chunks=(inner, *data.shape[1:]),
                shards=(-(-rows // inner) * inner, *data.shape[1:]),
                filters=filters_for(name),
                compressors=make_compressor(kind, data.dtype.itemsize),
                fill_value=0,
            )
            arr[...] = data
            size = sum(len(v) for k, v in store._store_dict.items() if not k.endswith("zarr.json"))
            t0 = time.perf_counter()
            back = arr[...]
            dt = time.perf_counter() - t0
            assert np.array_equal(back.view(np.uint8), data.view(np.uint8))
            row[label] = {"bytes_per_token": size / n, "decode_mb_per_s": data.nbytes / dt / 1e6}
        out[name] = row
    return out


def write_store(url: str, docs: list[Document], shard_tokens: int, chunk_rows: int) -> float:
    """Write ``docs`` as a top-32 q8 store at ``url``; returns the seconds it took."""
    attrs = {
        "tokenizer_json": "{}",
        "boundary_classes": list(BOUNDARY_CLASSES),
        "settings": {"bench": True},
    }
    t0 = time.perf_counter()
    with StoreWriter(
        url,
        attrs=attrs,
        top_k=TOP_K,
        topk_codec="q8",
        shard_tokens=shard_tokens,
        chunk_rows=chunk_rows,
    ) as w:
        for doc in docs:
            w.write(doc)
    return time.perf_counter() - t0


def real_teacher_sizes(chunk_rows: int) -> dict[str, Any]:
    """Bytes/token of a store of *real* teacher outputs: SmolLM2-135M-Instruct (fp32, CPU).

    Eight excerpts (2,200 characters each) spread over the embedded corpus, ≈ 4,600
    tokens: small, so per-file overheads (``doc_*``, ``topk_id_table``) weigh more than in
    a full shard; the top-k arrays are what the synthetic teacher cannot vouch for.
    """
    try:
        from xtd.assets import embedded_teacher_dir, iter_embedded_corpus
        from xtd.scoring import score_texts
        from xtd.teacher import load_teacher
    except ImportError as exc:  # the teacher module is optional for this benchmark
        return {"skipped": f"the teacher is unavailable ({exc})"}
    records = list(iter_embedded_corpus())
    picks = np.linspace(0, len(records) - 1, 8).astype(int)
    texts = [records[i]["text"][:2200] for i in picks]
    t0 = time.perf_counter()
    teacher = load_teacher(str(embedded_teacher_dir()), dtype="fp32")
    docs = list(score_texts(teacher, texts, top_k=TOP_K))
    score_s = time.perf_counter() - t0
    n = sum(d.num_tokens for d in docs)
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "real")
        write_store(url, docs, shard_tokens=1 << 20, chunk_rows=chunk_rows)
        stats = {s.name: s.stored_bytes / n for s in open_store(url).array_stats()}
    return {
        "tokens": n,
        "scoring_s": score_s,
        **{f"bytes_per_token.{k}": v for k, v in stats.items()},
        "bytes_per_token.topk": sum(v for k, v in stats.items() if k.startswith("topk_")),
        "bytes_per_token.total_k32": sum(stats.values()),
    }


def read_check_cost(url: str, n_tokens: int, repeats: int = 3) -> dict[str, Any]:
    """Streaming speed with and without the read checks, alternating (xtd.storage.integrity).

    "Without" bypasses :class:`~xtd.storage.integrity.CheckedStore`'s checksum and presence
    check on ``get`` for this measurement only; the listing at open still runs.
    """
    from zarr.storage import WrapperStore

    from xtd.storage.integrity import CheckedStore

    checked_get = CheckedStore.get
    speeds: dict[str, list[float]] = {"checked": [], "unchecked": []}
    try:
        for _ in range(repeats):
            for mode in speeds:
                CheckedStore.get = checked_get if mode == "checked" else WrapperStore.get  # type: ignore[method-assign]
                t0 = time.perf_counter()
                assert sum(d.num_tokens for d in open_store(url, cache_shards=2).iter_documents()) == n_tokens
                speeds[mode].append(n_tokens / (time.perf_counter() - t0))
    finally:
        CheckedStore.get = checked_get  # type: ignore[method-assign]
    return {
        "read_stream_tokens_per_s_checked_runs": [round(x) for x in speeds["checked"]],
        "read_stream_tokens_per_s_unchecked_runs": [round(x) for x in speeds["unchecked"]],
        "read_check_speed_ratio": float(np.median(speeds["checked"]) / np.median(speeds["unchecked"])),
    }


def run(quick: bool = False) -> dict[str, Any]:
    tokens = 30_000 if quick else 200_000
    t0 = time.perf_counter()
    docs = make_documents(tokens)
    gen_s = time.perf_counter() - t0
    n_tokens = sum(d.num_tokens for d in docs)
    shard_tokens = 16_384 if quick else 65_536
    chunk_rows = 2048
    compressors = (
        compare_compressors(docs[: max(1, len(docs) // 2)], chunk_rows) if not quick else {}
    )
    real = real_teacher_sizes(chunk_rows) if not quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        url = os.path.join(tmp, "store")
        write_s = write_store(url, docs, shard_tokens, chunk_rows)
        reader = open_store(url, cache_shards=2)
        stats = {s.name: s for s in reader.array_stats()}
        t0 = time.perf_counter()
        streamed = sum(d.num_tokens for d in reader.iter_documents())
        stream_s = time.perf_counter() - t0
        assert streamed == n_tokens
        fresh = open_store(url, cache_shards=2)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        random_tokens = 0
        for d in rng.integers(0, len(fresh), size=min(60, len(fresh))):
            random_tokens += fresh[int(d)].num_tokens
        random_s = time.perf_counter() - t0
        long_docs = [i for i, n in enumerate(fresh.doc_num_tokens()) if n >= 512]
        latencies = []
        for _ in range(50 if quick else 200):
            d = int(rng.choice(long_docs))
            start = int(rng.integers(0, fresh.doc_num_tokens()[d] - 512 + 1))
            t0 = time.perf_counter()
            window = fresh.read_window(d, start, start + 512)
            latencies.append(time.perf_counter() - t0)
            assert window.num_tokens == 512
        check_cost = read_check_cost(url, n_tokens)
    per_token = {name: s.stored_bytes / n_tokens for name, s in stats.items()}
    alm = sum(per_token[name] for name in ALM_ARRAYS)
    total = sum(per_token.values())
    read_tps = streamed / stream_s
    metrics: dict[str, Any] = {
        "tokens": n_tokens,
        "documents": len(docs),
        "shards": reader.num_shards,
        "data_generation_s": gen_s,
        **{f"bytes_per_token.{name}": v for name, v in per_token.items()},
        "bytes_per_token.alm_total": alm,
        "bytes_per_token.total_k32": total,
        "raw_bytes_per_token.alm": 4 + 8 + 4 + 2 * len(BOUNDARY_CLASSES),
        "write_tokens_per_s": n_tokens / write_s,
        "read_stream_tokens_per_s": read_tps,
        "read_random_doc_tokens_per_s": random_tokens / random_s,
        "window512_latency_ms_median": 1e3 * float(np.median(latencies)),
        "window512_latency_ms_p95": 1e3 * float(np.percentile(latencies, 95)),
        **check_cost,
        "compressors": compressors,
        "real_teacher": real,
    }
    targets = {
        "ALM bytes/token (ids, spans, logprob, boundary)": target(alm, "<=", 12.0, unit="B"),
        "total bytes/token with top-32": target(total, "<=", 70.0, unit="B"),
        "streaming read vs student training speed": target(
            read_tps / STUDENT_TOKENS_PER_S, ">=", 10.0, unit="×"
        ),
    }
    setup = (
        f"{n_tokens:,} tokens of the embedded corpus, GPT-2 BPE, calibrated Zipf teacher; top-{TOP_K} q8; "
        f"shards of {shard_tokens:,} tokens, chunks of {chunk_rows}; local folder"
    )
    return result("storage", metrics=metrics, targets=targets, setup=setup)


if __name__ == "__main__":
    main(run)
