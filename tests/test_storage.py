"""The shard store: round trips on every backend, crash safety, resume, ranks, verify.

Documents are random but valid: random non-ASCII text cut into byte-level tokens at
random offsets (possibly inside a UTF-8 character, as byte-level BPEs do), special
tokens with empty spans at the cursor, row 0 unscored. Run as a script
(``python tests/test_storage.py write URL N SHARD_TOKENS``) it is the writer process
that ``test_sigkill_mid_write`` kills.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xtd.errors import (
    ConfigError,
    DataError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
)
from xtd.storage import (
    BOUNDARY_CLASSES,
    Document,
    StoreWriter,
    decode_topk,
    encode_topk,
    list_alignments,
    open_store,
    q8_error_bound,
    read_alignment,
    verify_store,
    verify_store_report,
    write_alignment,
)

VOCAB = 400
SPECIALS = (400, 401)
TOKENIZER_JSON = json.dumps(
    {
        "model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(VOCAB)}},
        "added_tokens": [
            {"id": 400, "content": "<|endoftext|>", "special": True},
            {"id": 401, "content": "<|pad|>", "special": True},
        ],
    }
)
ATTRS = {
    "tokenizer_json": TOKENIZER_JSON,
    "boundary_classes": list(BOUNDARY_CLASSES),
    "teacher": {"name": "test", "vocab_size": VOCAB + 2},
    "dataset": {"source": "random"},
    "settings": {"max_length": 64},
}
ALPHABET = list("abc xyz\n\té漢😀ß") + ["👩‍👩‍👧"]
TOP_K = 6


def make_doc(
    rng: np.random.Generator,
    doc_index: int,
    num_tokens: int,
    *,
    top_k: int = TOP_K,
    hidden: int = 0,
) -> Document:
    """A valid random document with ``num_tokens`` rows (some of them special tokens)."""
    if num_tokens == 0:
        text = b""
        n_text = 0
    else:
        n_text = int(rng.integers(1, num_tokens + 1)) if num_tokens > 1 else 1
        text = "".join(rng.choice(ALPHABET, size=n_text + int(rng.integers(0, 3)))).encode()
        n_text = min(n_text, len(text))
    cuts = (
        np.sort(rng.choice(np.arange(1, len(text)), size=n_text - 1, replace=False))
        if n_text > 1
        else np.zeros(0, int)
    )
    bounds = np.concatenate([[0], cuts, [len(text)]]) if n_text else np.zeros(1, int)
    text_spans = np.stack([bounds[:-1], bounds[1:]], axis=1) if n_text else np.zeros((0, 2), int)
    n_special = num_tokens - n_text
    # Special tokens go between text tokens: an empty span at the current byte offset.
    positions = np.sort(rng.integers(0, n_text + 1, size=n_special))
    spans, ids, t = [], [], 0
    for i in range(n_text + 1):
        while t < n_special and positions[t] == i:
            cursor = int(text_spans[i - 1, 1]) if i else 0
            spans.append((cursor, cursor))
            ids.append(int(rng.choice(SPECIALS)))
            t += 1
        if i < n_text:
            spans.append(tuple(text_spans[i]))
            ids.append(int(rng.integers(0, VOCAB)))
    n = num_tokens
    logprob = np.log(rng.random(n).astype(np.float32) + 1e-6)
    if n:
        logprob[0] = np.nan
    topk = -np.sort(rng.exponential(3.0, size=(n, top_k)), axis=1).astype(np.float32)
    if n > 2 and top_k:
        topk[1, -1] = -np.inf  # zero mass
        topk[2, -1] = -35.0  # below the q8 range
    return Document(
        text=text,
        token_ids=np.asarray(ids, dtype=np.int32),
        token_spans=np.asarray(spans, dtype=np.int32).reshape(n, 2),
        token_logprob=logprob,
        boundary_logmass=np.log(rng.random((n, 4)) + 1e-4).astype(np.float16),
        topk_ids=rng.integers(0, VOCAB + 2, size=(n, top_k)).astype(np.int32) if top_k else None,
        topk_logprobs=topk if top_k else None,
        tail_logmass=np.log(rng.random(n)).astype(np.float32) if top_k else None,
        hidden=rng.standard_normal((n, hidden)).astype(np.float16) if hidden else None,
        doc_index=doc_index,
    )


def make_docs(seed: int, count: int = 40, *, top_k: int = TOP_K, hidden: int = 0) -> list[Document]:
    """Ragged documents: empty, one-token, short and long ones (longer than a shard)."""
    rng = np.random.default_rng(seed)
    lengths = ([0, 1, 1, 0, 90] + [int(x) for x in rng.integers(0, 30, size=max(count - 5, 0))])[
        :count
    ]
    return [make_doc(rng, 3 * i + 1, n, top_k=top_k, hidden=hidden) for i, n in enumerate(lengths)]


def write_store(url, docs, *, shard_tokens: int = 100, chunk_rows: int = 16, **kwargs) -> None:
    kwargs.setdefault("top_k", TOP_K)
    with StoreWriter(
        url, attrs=ATTRS, shard_tokens=shard_tokens, chunk_rows=chunk_rows, **kwargs
    ) as writer:
        for doc in docs:
            writer.write(doc)


def expected_topk(want: Document, codec: str) -> tuple[np.ndarray, np.ndarray]:
    """The top-k a reader must return, the slow obvious way: every row's (id, true log-prob)
    pairs sorted by descending *quantised* log-prob, ties by ascending id (docs/format.md)."""
    quantised = decode_topk(encode_topk(want.topk_logprobs, codec), codec)
    ids, truth = [], []
    for row_ids, row_q, row_x in zip(
        want.topk_ids.tolist(), quantised.tolist(), want.topk_logprobs.tolist(), strict=True
    ):
        pairs = sorted(zip(row_ids, row_q, row_x, strict=True), key=lambda p: (-p[1], p[0]))
        ids.append([p[0] for p in pairs])
        truth.append([p[2] for p in pairs])
    k = want.topk_ids.shape[1]
    return np.array(ids, dtype=np.int64).reshape(-1, k), np.array(truth, np.float32).reshape(-1, k)


def assert_same_topk(ids: np.ndarray, logprobs: np.ndarray, want: Document, *, codec: str) -> None:
    """Ids exact in canonical order; each log-prob within the codec's bound of its true value."""
    want_ids, x = expected_topk(want, codec)
    np.testing.assert_array_equal(ids, want_ids)
    with np.errstate(invalid="ignore"):  # -inf - -inf
        assert not np.any(np.diff(logprobs, axis=1) > 0)  # descending
    expected = np.where(np.isfinite(x), np.maximum(x, -20.0), x) if codec == "q8" else x
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(logprobs), finite)
    bound = q8_error_bound() if codec == "q8" else 1e-3 * np.abs(expected[finite]) + 1e-7
    assert np.all(np.abs(logprobs[finite] - expected[finite]) <= bound + 1e-6)


def assert_same_doc(got: Document, want: Document, *, codec: str = "q8") -> None:
    assert got.doc_index == want.doc_index
    assert got.text == want.text
    for name in (
        "token_ids",
        "token_spans",
        "boundary_logmass",
        "tail_logmass",
        "hidden",
        "token_slot",
    ):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
        else:
            np.testing.assert_array_equal(a, np.asarray(b).astype(a.dtype), err_msg=name)
    np.testing.assert_array_equal(got.token_logprob, want.token_logprob)  # NaN == NaN here
    if want.topk_ids is not None:
        assert_same_topk(got.topk_ids, got.topk_logprobs, want, codec=codec)
    if want.loss_spans is not None:
        np.testing.assert_array_equal(got.loss_spans, want.loss_spans)


# ------------------------------------------------------------------ backends


def _zip_of(tmp_path: Path, folder: Path) -> str:
    return shutil.make_archive(str(tmp_path / "zipped"), "zip", root_dir=folder)


@pytest.fixture(params=["local", "memory", "zip"])
def backend(request, tmp_path):
    """Returns (write_url, read_url_factory): one behaviour suite for every backend."""
    kind = request.param
    if kind == "memory":
        url = f"memory://xtd-tests/{tmp_path.name}/store"
        yield url, lambda: url
        import fsspec

        fsspec.filesystem("memory").rm(f"/xtd-tests/{tmp_path.name}", recursive=True)
    elif kind == "local":
        folder = tmp_path / "store"
        yield folder, lambda: folder
    else:
        folder = tmp_path / "store"
        yield folder, lambda: _zip_of(tmp_path, folder)


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_every_backend(backend, seed):
    write_url, read_url = backend
    docs = make_docs(seed)
    write_store(write_url, docs)
    reader = open_store(read_url())
    assert reader.complete and len(reader) == len(docs)
    assert reader.num_tokens == sum(d.num_tokens for d in docs)
    assert reader.num_shards > 3  # documents spread over several shards and chunks
    assert reader.top_k == TOP_K and reader.boundary_classes == BOUNDARY_CLASSES
    assert reader.tokenizer_json == TOKENIZER_JSON and reader.attrs["teacher"]["name"] == "test"
    for i in np.random.default_rng(seed).permutation(len(docs)):  # random access
        assert_same_doc(reader[int(i)], docs[i])
    for got, want in zip(reader.iter_documents(), docs, strict=True):  # streaming
        assert_same_doc(got, want)
    assert verify_store(read_url()) == []


@pytest.mark.parametrize("codec", ["fp16", "q8"])
def test_round_trip_codecs_hidden_and_chat(tmp_path, codec):
    rng = np.random.default_rng(7)
    docs = make_docs(3, 20, hidden=8)
    for d in docs[::2]:  # chat documents mixed with plain ones
        d.token_slot = rng.integers(0, 3, size=d.num_tokens).astype(np.int8)
        d.token_slot[d.token_spans[:, 0] != d.token_spans[:, 1]] = 0
        d.token_slot[d.token_spans[:, 0] == d.token_spans[:, 1]] = 1
        d.loss_spans = np.array([[0, len(d.text) // 2]], dtype=np.int64)
    write_store(tmp_path / "s", docs, topk_codec=codec, hidden_size=8)
    reader = open_store(tmp_path / "s")
    assert reader.hidden_size == 8
    for i, want in enumerate(docs):
        got = reader[i]
        if want.token_slot is None and got.token_slot is not None:  # plain doc in a chat shard
            assert not got.token_slot.any()
            np.testing.assert_array_equal(got.loss_spans, [[0, len(want.text)]])
            got.token_slot = got.loss_spans = None
        assert_same_doc(got, want, codec=codec)
    assert verify_store(tmp_path / "s") == []


def test_boundary_class_columns_match_tokenization():
    # storage keeps its own copy so that it imports nothing above it (README, Architecture).
    from xtd.tokenization import BOUNDARY_CLASSES as TOKENIZATION_CLASSES

    assert BOUNDARY_CLASSES == TOKENIZATION_CLASSES


def test_no_topk_store(tmp_path):
    docs = make_docs(1, 10, top_k=0)
    write_store(tmp_path / "s", docs, top_k=0)
    reader = open_store(tmp_path / "s")
    assert reader.top_k == 0 and reader[4].topk_ids is None
    assert {s.name for s in reader.array_stats()}.isdisjoint({"topk_ids", "topk_logprobs"})
    assert verify_store(tmp_path / "s") == []


def test_reading_without_topk_and_hidden(tmp_path):
    docs = make_docs(6, 8, hidden=4)
    write_store(tmp_path / "s", docs, hidden_size=4)
    reader = open_store(tmp_path / "s")
    full = reader.document(3)
    assert full.topk_ids is not None and full.hidden is not None
    assert_same_doc(full, docs[3])
    lean = reader.document(3, topk=False, hidden=False)
    assert lean.topk_ids is None and lean.topk_logprobs is None and lean.tail_logmass is None
    assert lean.hidden is None
    for name in ("token_ids", "token_spans", "token_logprob", "boundary_logmass"):
        np.testing.assert_array_equal(getattr(lean, name), getattr(full, name), err_msg=name)
    window = reader.read_window(3, 2, 9, hidden=False)
    np.testing.assert_array_equal(window.topk_ids, full.topk_ids[2:9])
    assert window.hidden is None and window.text == full.text


def test_read_window_and_streaming(tmp_path):
    docs = make_docs(5)
    write_store(tmp_path / "s", docs)
    reader = open_store(tmp_path / "s", cache_shards=1)
    window = reader.read_window(4, 10, 30)
    np.testing.assert_array_equal(window.token_ids, docs[4].token_ids[10:30])
    np.testing.assert_array_equal(window.token_spans, docs[4].token_spans[10:30])
    assert window.text == docs[4].text
    assert reader.read_window(4, 85, 500).num_tokens == 5
    np.testing.assert_array_equal(reader.doc_num_tokens(), [d.num_tokens for d in docs])
    assert_same_doc(reader[7], docs[7])
    assert [d.doc_index for d in reader.iter_documents(range(2, 5))] == [d.doc_index for d in docs[2:5]]
    assert [d.doc_index for d in reader] == [d.doc_index for d in docs]
    assert len(reader._cache) <= reader._cache_limit()  # bounded memory while streaming
    with pytest.raises(IndexError, match="out of range"):
        reader[len(docs)]


def test_two_ranks_read_back_like_one(tmp_path):
    docs = make_docs(11)
    write_store(tmp_path / "one", docs)
    for rank in (1, 0):
        write_store(tmp_path / "two", docs[rank::2], rank=rank, world_size=2, shard_tokens=25)
    one, two = open_store(tmp_path / "one"), open_store(tmp_path / "two")
    assert two.complete and len(two.parts) == 2 and len(one) == len(two)
    for i in range(len(docs)):
        assert_same_doc(two[i], one[i])
    assert [d.doc_index for d in two.iter_documents()] == [d.doc_index for d in docs]
    assert verify_store(tmp_path / "two") == []


def test_incomplete_until_every_part_is_closed(tmp_path):
    docs = make_docs(2, 12)
    write_store(tmp_path / "s", docs[::2], rank=0, world_size=2)
    reader = open_store(tmp_path / "s")
    assert not reader.complete and len(reader) == 6 and reader.parts["part-00001"] is None
    assert verify_store_report(tmp_path / "s").complete is False


# ------------------------------------------------------------------ resume and crash safety


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _data_files(folder: Path) -> dict[str, bytes]:
    # Everything except the root zarr.json (it records the xtd version only) and the store
    # card (README.md: it names the store's own path).
    return {k: v for k, v in _files(folder).items() if k not in ("zarr.json", "README.md")}


def test_resume_after_close_incomplete_matches_uninterrupted(tmp_path):
    docs = make_docs(4)
    write_store(tmp_path / "full", docs)
    writer = StoreWriter(
        tmp_path / "part", attrs=ATTRS, top_k=TOP_K, shard_tokens=100, chunk_rows=16
    )
    for doc in docs[:17]:
        writer.write(doc)
    committed_before_close = writer.documents_committed
    writer.close(complete=False)  # Ctrl-C: the buffer is committed, the part stays open
    assert open_store(tmp_path / "part").complete is False
    with StoreWriter(
        tmp_path / "part", attrs=ATTRS, top_k=TOP_K, shard_tokens=100, chunk_rows=16
    ) as writer:
        assert writer.documents_committed == 17 > committed_before_close
        for doc in docs[writer.documents_committed :]:
            writer.write(doc)
    full, resumed = open_store(tmp_path / "full"), open_store(tmp_path / "part")
    assert resumed.complete and len(resumed) == len(full)
    for i in range(len(docs)):
        assert_same_doc(resumed[i], full[i])


def test_writer_touches_the_root_only_when_creating_the_store(tmp_path, monkeypatch):
    """zarr's temporary files beside parent zarr.json files stay inside each new shard.

    A writer killed while zarr held such a file at the root would leave it there for
    good (resume cleans only uncommitted shards and parts); so after creating the root,
    the writer must never have zarr write next to it again.
    """
    import contextlib

    import zarr.storage._local as local

    touched: list[Path] = []
    atomic_write = local._atomic_write

    @contextlib.contextmanager
    def spy(path, mode, exclusive=False):
        touched.append(Path(path))
        with atomic_write(path, mode, exclusive) as fh:
            yield fh

    monkeypatch.setattr(local, "_atomic_write", spy)
    url = tmp_path / "store"
    write_store(url, make_docs(5, 40), shard_tokens=100)
    assert open_store(url).num_shards > 3
    # Besides the root zarr.json, only the store card (README.md, rewritten at open and
    # close) is written at the root; readers, verify and push never look at its temp files.
    assert [p for p in touched if p.parent == url and p.name != "README.md"] == [url / "zarr.json"]
    assert (url / "README.md") in touched
    part = url / "part-00000"
    assert {p.name for p in touched if p.parent == part} == {"zarr.json"}  # the part's commits


def _writer_main(url: str, count: int, shard_tokens: int) -> None:
    """Subprocess body of the SIGKILL test: write ``count`` documents, slowly."""
    docs = make_docs(21, count)
    with StoreWriter(
        url, attrs=ATTRS, top_k=TOP_K, shard_tokens=shard_tokens, chunk_rows=16
    ) as writer:
        for doc in docs[writer.documents_committed :]:
            writer.write(doc)
            time.sleep(0.005)


def test_sigkill_mid_write_then_verify_and_resume(tmp_path):
    count, shard_tokens = 160, 100
    url = tmp_path / "killed"
    log = tmp_path / "writer.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, __file__, "write", str(url), str(count), str(shard_tokens)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        record = url / "part-00000" / "zarr.json"
        deadline = time.monotonic() + 60
        committed = 0
        try:
            while time.monotonic() < deadline and committed < 30:
                time.sleep(0.05)
                if record.exists():
                    committed = json.loads(record.read_text())["attributes"]["xtd_part"][
                        "documents_committed"
                    ]
                assert proc.poll() is None, log.read_text()  # still writing when killed
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL and committed >= 30

    docs = make_docs(21, count)
    reader = open_store(url)
    n = len(reader)
    assert 30 <= n < count and not reader.complete
    for i in range(n):  # exactly the committed prefix, nothing more
        assert_same_doc(reader[i], docs[i])
    assert verify_store(url) == []

    _writer_main(str(url), count, shard_tokens)  # rerun the same command: resume
    write_store(tmp_path / "clean", docs, shard_tokens=shard_tokens)
    assert _data_files(url) == _data_files(tmp_path / "clean")  # byte-identical shards
    assert verify_store(url) == []


def test_orphan_shard_of_killed_writer_is_ignored_and_replaced(tmp_path):
    docs = make_docs(8)
    write_store(tmp_path / "s", docs[:10])
    # Simulate a writer killed after writing shard files but before the commit record.
    part = tmp_path / "s" / "part-00000"
    committed = json.loads((part / "zarr.json").read_text())["attributes"]["xtd_part"]
    committed["complete"] = False
    (part / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"xtd_part": committed}})
    )
    orphan = part / f"shard-{len(committed['shards']):06d}"
    shutil.copytree(part / "shard-000000", orphan)
    (part / "zarr.json.abc.partial").write_bytes(b"half a record")
    assert len(open_store(tmp_path / "s")) == 10 and verify_store(tmp_path / "s") == []
    with StoreWriter(
        tmp_path / "s", attrs=ATTRS, top_k=TOP_K, shard_tokens=100, chunk_rows=16
    ) as writer:
        assert writer.documents_committed == 10
        for doc in docs[10:]:
            writer.write(doc)
    assert not (part / "zarr.json.abc.partial").exists()
    reader = open_store(tmp_path / "s")
    for i in range(len(docs)):
        assert_same_doc(reader[i], docs[i])
    assert verify_store(tmp_path / "s") == []


# ------------------------------------------------------------------ settings and errors


def test_other_settings_refused_unless_overwrite(tmp_path):
    write_store(tmp_path / "s", make_docs(1, 8))
    other = {**ATTRS, "settings": {"max_length": 128}}
    with pytest.raises(
        StoreExistsError, match=r"settings\.max_length: 64 in the store vs 128 now.*--overwrite"
    ):
        StoreWriter(tmp_path / "s", attrs=other, top_k=TOP_K, shard_tokens=100, chunk_rows=16)
    with pytest.raises(StoreExistsError, match="top_k: 6 in the store vs 4 now"):
        StoreWriter(tmp_path / "s", attrs=ATTRS, top_k=4, shard_tokens=100, chunk_rows=16)
    with StoreWriter(tmp_path / "s", attrs=other, top_k=TOP_K, overwrite=True) as writer:
        assert writer.documents_committed == 0
        writer.write(make_docs(2, 6)[5])
    reader = open_store(tmp_path / "s")
    assert reader.attrs["settings"] == {"max_length": 128} and len(reader) == 1


def test_non_store_content_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="not an xtd store"):
        StoreWriter(tmp_path / "d", attrs=ATTRS, top_k=0)
    with pytest.raises(ConfigError, match="zip"):
        StoreWriter(tmp_path / "x.zip", attrs=ATTRS, top_k=0)
    with pytest.raises(ConfigError, match="tokenizer_json"):
        StoreWriter(tmp_path / "e", attrs={"boundary_classes": ["space"]}, top_k=0)


def test_writer_rejects_bad_documents(tmp_path):
    docs = make_docs(6, 8)
    with StoreWriter(tmp_path / "s", attrs=ATTRS, top_k=TOP_K) as writer:
        writer.write(docs[5])
        with pytest.raises(DataError, match="doc_index must increase"):
            writer.write(docs[4])
        bad = make_docs(6, 8)[6]
        bad.token_spans = bad.token_spans + 1000
        with pytest.raises(DataError, match="outside the document"):
            writer.write(bad)
        bad = make_docs(6, 8)[6]
        bad.text = b"\xff" + bad.text[1:]
        with pytest.raises(DataError, match="not valid UTF-8"):
            writer.write(bad)
        bad = make_docs(6, 8)[6]
        bad.topk_ids = None
        with pytest.raises(DataError, match="no top-k"):
            writer.write(bad)


def test_unknown_format_version_refused(tmp_path):
    write_store(tmp_path / "s", make_docs(1, 4))
    meta = json.loads((tmp_path / "s" / "zarr.json").read_text())
    meta["attributes"]["xtd"]["format_version"] = 2
    (tmp_path / "s" / "zarr.json").write_text(json.dumps(meta))
    message = r"format_version 2; this xtd reads version 1 — upgrade xtd or re-run xtd precompute"
    with pytest.raises(StoreFormatError, match=message):
        open_store(tmp_path / "s")
    with pytest.raises(StoreFormatError, match=message):
        verify_store(tmp_path / "s")
    with pytest.raises(StoreFormatError, match="format_version 2"):
        StoreWriter(tmp_path / "s", attrs=ATTRS, top_k=TOP_K)


def test_not_a_store(tmp_path):
    import zarr

    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_store(tmp_path / "missing")
    with pytest.raises(StoreNotFoundError):
        open_store("memory://xtd-tests/nothing-here")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    with pytest.raises(StoreFormatError, match="not an xtd store"):
        open_store(tmp_path / "plain")
    zarr.create_group(str(tmp_path / "group"))
    with pytest.raises(StoreFormatError, match="zarr group but not an xtd teacher store"):
        open_store(tmp_path / "group")


# ------------------------------------------------------------------ verify finds defects


def test_flipped_byte_is_named(tmp_path):
    write_store(tmp_path / "s", make_docs(9))
    victim = tmp_path / "s" / "part-00000" / "shard-000002" / "token_logprob" / "c" / "0"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    problems = verify_store(tmp_path / "s")
    assert len(problems) == 1
    assert "part-00000/shard-000002/token_logprob/c/0: checksum mismatch" in problems[0]


def test_verify_finds_structural_defects(tmp_path):
    docs = make_docs(12, 10)
    docs[4].token_spans[2] = docs[4].token_spans[3]  # an overlap (and a gap after it)
    docs[4].token_logprob[0] = -1.0  # row 0 scored
    write_store(tmp_path / "s", docs, shard_tokens=10_000)
    problems = verify_store(tmp_path / "s")
    assert any("token_spans: spans do not tile document 13 at token 2" in p for p in problems), (
        problems
    )
    assert any("token_logprob: row 0" in p for p in problems), problems


@pytest.mark.parametrize(
    ("array", "value", "phrase"),
    [
        ("topk_ids", -3, "topk_ids: negative rank differences"),
        ("topk_floor", 0, "topk_logprobs: values above their row's topk_floor"),
    ],
)
def test_verify_names_a_broken_topk_layout(tmp_path, array, value, phrase):
    import zarr

    docs = make_docs(17, 8)
    write_store(tmp_path / "s", docs, shard_tokens=10_000)
    shard = zarr.open_group(tmp_path / "s" / "part-00000" / "shard-000000", mode="r+")
    data = shard[array][...]
    data[[5] if data.ndim == 1 else (5, 1)] = value  # rows 5: a row with a top-k spread
    shard[array][...] = data
    _reseal(tmp_path / "s", "part-00000", "shard-000000")  # checksums pass: the layout is judged
    problems = verify_store(tmp_path / "s")
    assert any(phrase in p for p in problems), problems


def _reseal(url: Path, part: str, name: str) -> None:
    """Record fresh checksums for a shard edited in place (what a buggy writer would leave)."""
    from xtd.storage.format import (
        PART_ATTR,
        SHARD_ATTR,
        checksum,
        open_zarr_store,
        read_bytes,
        read_group_attrs,
        write_group_json,
    )

    store = open_zarr_store(url, writable=True)
    path = f"{part}/{name}"
    meta = read_group_attrs(store, path)
    for rel, info in meta[SHARD_ATTR]["files"].items():
        blob = read_bytes(store, f"{path}/{rel}")
        info.update(crc32c=checksum(blob), bytes=len(blob))
    meta_bytes = write_group_json(store, path, meta)
    record = read_group_attrs(store, part)
    for entry in record[PART_ATTR]["shards"]:
        if entry["name"] == name:
            entry["zarr_json_crc32c"] = checksum(meta_bytes)
    write_group_json(store, part, record)


def test_verify_requires_full_coverage_unless_recorded(tmp_path):
    docs = make_docs(13, 6)
    docs[4].text = docs[4].text + b" tail the teacher never saw"
    write_store(tmp_path / "full", docs)
    assert any("leave bytes uncovered" in p for p in verify_store(tmp_path / "full"))
    with StoreWriter(
        tmp_path / "prefix", attrs={**ATTRS, "text_coverage": "prefix"}, top_k=TOP_K
    ) as writer:
        for doc in docs:
            writer.write(doc)
    assert verify_store(tmp_path / "prefix") == []


def test_special_token_with_text_span_is_flagged(tmp_path):
    docs = make_docs(14, 6)
    docs[4].token_ids[1] = SPECIALS[0]  # an ordinary (non-empty) row claims to be special
    write_store(tmp_path / "s", docs)
    assert any("special token with a non-empty span" in p for p in verify_store(tmp_path / "s"))


# ------------------------------------------------------------------ plain zarr + numpy (docs/format.md)


def _format_md_snippet() -> str:
    text = (Path(__file__).parents[1] / "docs" / "format.md").read_text()
    match = re.search(r"<!-- plain-reader -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/format.md lost its plain-reader example"
    return match.group(1)


@pytest.mark.parametrize("codec", ["q8", "fp16"])
def test_plain_zarr_numpy_reader_from_format_md(tmp_path, codec):
    docs = make_docs(15)
    for rank in (0, 1):
        write_store(tmp_path / "s", docs[rank::2], rank=rank, world_size=2, topk_codec=codec)
    code = _format_md_snippet()
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", code, re.M))
    assert imported <= {"json", "numpy", "zarr"}, imported
    scope: dict = {"STORE": str(tmp_path / "s")}
    exec(compile(code, "docs/format.md", "exec"), scope)  # noqa: S102 - our own documentation
    plain = scope["documents"]  # list of dicts in doc_index order
    assert len(plain) == len(docs)
    for got, want in zip(plain, docs, strict=True):
        assert got["doc_index"] == want.doc_index and got["text"] == want.text
        np.testing.assert_array_equal(got["token_ids"], want.token_ids)
        np.testing.assert_array_equal(got["token_spans"], want.token_spans)
        np.testing.assert_array_equal(got["token_logprob"], want.token_logprob)
        assert_same_topk(got["topk_ids"], got["topk_logprobs"], want, codec=codec)


# ------------------------------------------------------------------ cached alignments


def test_alignment_group_round_trip_and_verify(tmp_path):
    docs = make_docs(16, 12)
    write_store(tmp_path / "s", docs)
    reader = open_store(tmp_path / "s")
    rng = np.random.default_rng(0)
    records = []
    for d in reader.iter_documents():
        s = int(rng.integers(0, 9))
        records.append(
            {
                "student_ids": rng.integers(0, 50, s).astype(np.int32),
                "student_spans": rng.integers(0, 9, (s, 2)).astype(np.int32),
                "student_chunk": rng.integers(-1, 4, s).astype(np.int32),
                "teacher_chunk": rng.integers(-1, 4, d.num_tokens).astype(np.int32),
            }
        )
    write_alignment(
        tmp_path / "s",
        "abc123",
        iter(records),
        num_documents=len(reader),
        attrs={"student": "tok_b"},
    )
    assert list_alignments(tmp_path / "s") == ["abc123"]
    cached = read_alignment(tmp_path / "s", "abc123")
    assert len(cached) == len(docs) and cached.attrs == {"student": "tok_b"}
    for i, want in enumerate(records):
        got = cached[i]
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value)
    assert verify_store(tmp_path / "s") == []
    with pytest.raises(StoreExistsError, match="--overwrite"):
        write_alignment(tmp_path / "s", "abc123", iter(records), num_documents=len(reader))
    with pytest.raises(DataError, match="got 3 documents"):
        write_alignment(tmp_path / "s", "short", iter(records[:3]), num_documents=len(reader))
    assert verify_store(tmp_path / "s") == [] and list_alignments(tmp_path / "s") == ["abc123"]  # no trace
    # A killed writer leaves its group without a complete record: ignored, and reported.
    (tmp_path / "s" / "alignments" / "short").mkdir()
    (tmp_path / "s" / "alignments" / "short" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"xtd_alignment": {"complete": False}}})
    )
    assert list_alignments(tmp_path / "s") == ["abc123"]
    assert any("alignments/short: incomplete" in p for p in verify_store(tmp_path / "s"))
    # Wrong per-document teacher row counts are found by verify.
    bad = [dict(r) for r in records]
    bad[2]["teacher_chunk"] = np.zeros(len(bad[2]["teacher_chunk"]) + 1, np.int32)
    write_alignment(tmp_path / "s", "short", iter(bad), num_documents=len(reader), overwrite=True)
    assert any(
        "alignments/short/teacher_chunk: row counts differ" in p
        for p in verify_store(tmp_path / "s")
    )
    victim = next((tmp_path / "s" / "alignments" / "abc123" / "student_ids" / "c").iterdir())
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    assert any(
        "alignments/abc123/student_ids/c/" in p and "checksum mismatch" in p
        for p in verify_store(tmp_path / "s")
    )


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "write":
    _writer_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
