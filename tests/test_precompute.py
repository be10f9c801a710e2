"""xtd.precompute: teacher → store, resume, ranks, chat data, bad input (Python API)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from _stores import tree_digest

from xtd.config import PrecomputeConfig
from xtd.errors import ConfigError, DataError, StoreExistsError
from xtd.precompute import precompute, resolve_rank
from xtd.scoring import score_texts
from xtd.storage import open_store
from xtd.teacher import load_teacher

FIELDS = ("token_ids", "token_spans", "token_logprob", "boundary_logmass", "topk_ids", "topk_logprobs", "tail_logmass", "hidden", "loss_spans")


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _texts(n: int) -> list[str]:
    words = "to be or not that is the question whether tis nobler in mind suffer".split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 60)))) + ("\n" if i % 3 else "") for i in range(n)]


def _documents(url: Path | str) -> list:  # noqa: ANN001
    reader = open_store(str(url))
    return [reader[i] for i in range(len(reader))]


def _assert_same(a: list, b: list, *, exact: bool = True) -> None:  # noqa: ANN001
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.doc_index == y.doc_index and x.text == y.text
        for name in FIELDS:
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is None:
                continue
            if exact or u.dtype.kind in "iu":
                np.testing.assert_array_equal(u, v, err_msg=name)
            else:
                np.testing.assert_allclose(u.astype(np.float32), v.astype(np.float32), atol=1e-4, err_msg=name)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    texts = _texts(30)
    texts[4] = ""
    texts[11] = ""
    return _write_jsonl(tmp_path / "data.jsonl", texts)


def test_store_holds_exactly_what_the_teacher_computes(tiny_lm, data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "store"
    config = PrecomputeConfig(teacher=str(tiny_lm), data=str(data), out=str(out), top_k=4, hidden=True, batch_tokens=256)
    result = precompute(config)
    assert result.complete and result.documents_written == 28 and result.empty_documents == 2
    assert result.documents_total == 28 and result.tokens > 0 and result.documents_resumed == 0
    docs = _documents(out)
    assert [d.doc_index for d in docs] == [i for i in range(30) if i not in (4, 11)]
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    direct = list(score_texts(load_teacher(str(tiny_lm)), [texts[d.doc_index] for d in docs], top_k=4, hidden=True))
    for stored, ref in zip(docs, direct, strict=True):
        assert stored.text == ref.text
        np.testing.assert_array_equal(stored.token_ids, ref.token_ids)
        np.testing.assert_array_equal(stored.token_spans, ref.token_spans)
        np.testing.assert_allclose(stored.token_logprob, ref.token_logprob, atol=1e-5)
        # Different batches: the fp32 masses may round to neighbouring fp16 values.
        np.testing.assert_allclose(stored.boundary_logmass.astype(np.float32), ref.boundary_logmass.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(stored.topk_logprobs, ref.topk_logprobs, atol=0.05)  # q8 on disk
        np.testing.assert_allclose(stored.hidden.astype(np.float32), ref.hidden.astype(np.float32), atol=1e-2)
    attrs = open_store(str(out)).attrs
    assert attrs["teacher"]["weights_digest"] and attrs["teacher"]["vocab_size"] == 400
    assert json.loads(attrs["tokenizer_json"])["model"]["type"] == "BPE"
    assert attrs["boundary_classes"] == ["space", "newline", "tab", "special"]
    assert set(attrs["boundary_class_rules"]) == set(attrs["boundary_classes"])
    assert attrs["dataset"]["fingerprint"] and attrs["dataset"]["empty_records"] == 2
    assert attrs["settings"]["top_k"] == 4 and attrs["settings"]["max_length"] == 2048


def test_rerun_is_a_no_op_and_other_settings_are_refused(tiny_lm, data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "store"
    base = {"teacher": str(tiny_lm), "data": str(data), "out": str(out), "top_k": 2}
    precompute(PrecomputeConfig(**base))
    before = tree_digest(out)
    again = precompute(PrecomputeConfig(**base))
    assert again.documents_written == 0 and again.complete
    for change in ({"top_k": 3}, {"max_length": 64, "stride": 8}, {"limit": 10}, {"hidden": True}):
        with pytest.raises(StoreExistsError, match=r"other settings.*--overwrite"):
            precompute(PrecomputeConfig(**{**base, **change}))
        assert tree_digest(out) == before
    data.write_text(data.read_text().replace("question", "answer"), encoding="utf-8")
    with pytest.raises(StoreExistsError, match=r"fingerprint"):
        precompute(PrecomputeConfig(**base))
    replaced = precompute(PrecomputeConfig(**base, overwrite=True))
    assert replaced.complete and replaced.documents_written == 28


def test_interrupted_run_resumes_to_identical_arrays(tiny_lm, data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    base = {"teacher": str(tiny_lm), "data": str(data), "top_k": 4, "shard_tokens": 150, "batch_tokens": 128}
    precompute(PrecomputeConfig(out=str(tmp_path / "ref"), **base))
    out = tmp_path / "cut"

    def interrupt(p) -> None:  # noqa: ANN001
        if p.documents_done == 17:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        precompute(PrecomputeConfig(out=str(out), **base), progress=interrupt)
    partial = open_store(str(out))
    assert not partial.complete and 0 < len(partial) <= 17
    resumed = precompute(PrecomputeConfig(out=str(out), **base))
    assert resumed.documents_resumed == len(partial) and resumed.documents_written == 28 - len(partial)
    _assert_same(_documents(tmp_path / "ref"), _documents(out), exact=True)


def test_two_ranks_equal_one_rank(tiny_lm, data: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    base = {"teacher": str(tiny_lm), "data": str(data), "top_k": 4, "batch_tokens": 256}
    precompute(PrecomputeConfig(out=str(tmp_path / "one"), **base))
    r0 = precompute(PrecomputeConfig(out=str(tmp_path / "two"), rank=0, world_size=2, **base))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r1 = precompute(PrecomputeConfig(out=str(tmp_path / "two"), **base))  # torchrun's environment
    assert (r0.rank, r1.rank) == (0, 1) and r0.documents_written + r1.documents_written == 28
    assert r0.empty_documents + r1.empty_documents == 2
    reader = open_store(str(tmp_path / "two"))
    assert reader.complete
    # Batches differ between the runs, so floats may differ in the last bits.
    _assert_same(_documents(tmp_path / "one"), _documents(tmp_path / "two"), exact=False)


def test_resolve_rank(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank(None, None) == (0, 1)
    assert resolve_rank(2, 3) == (2, 3)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank(None, None) == (3, 4)
    with pytest.raises(ConfigError, match="--rank"):
        resolve_rank(1, None)
    with pytest.raises(ConfigError, match="--rank"):
        resolve_rank(4, 4)


def test_conversations_get_exact_loss_spans(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    rows = [
        {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, friend"}]},
        {"messages": "a plain text among conversations"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer\twith tab"}]},
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # tiny_lm's tokenizer has no chat template: "auto" is refused before any work, "never" works.
    with pytest.raises(DataError, match=r"no chat template.*--chat-template never"):
        precompute(PrecomputeConfig(teacher=str(tiny_lm), data=str(data), out=str(tmp_path / "s0"), top_k=0))
    assert not (tmp_path / "s0").exists()
    out = tmp_path / "s1"
    precompute(PrecomputeConfig(teacher=str(tiny_lm), data=str(data), out=str(out), top_k=0, chat_template="never"))
    docs = _documents(out)
    assert docs[0].text == b"user: hi there\nassistant: hello, friend\n"
    assert [docs[0].text[a:b] for a, b in docs[0].loss_spans] == [b"hello, friend"]
    assert [tuple(s) for s in docs[1].loss_spans] == [(0, len(docs[1].text))]
    assert [docs[2].text[a:b] for a, b in docs[2].loss_spans] == [b"an answer\twith tab"]


def test_chat_template_renders_specials_as_tokens(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    teacher_dir = tmp_path / "chat_teacher"
    shutil.copytree(tiny_lm, teacher_dir)
    config = json.loads((teacher_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
    (teacher_dir / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo!"}]}) + "\n")
    out = tmp_path / "store"
    precompute(PrecomputeConfig(teacher=str(teacher_dir), data=str(data), out=str(out), top_k=0))
    (doc,) = _documents(out)
    assert doc.text == b"user\nhiassistant\nyo!"  # special-token strings are rows, not text
    eot = 0  # <|endoftext|> is the first special of tok_a
    assert (doc.token_ids == eot).sum() == 2 and (doc.token_spans[doc.token_ids == eot, 0] == [0, 7]).all()
    assert [doc.text[a:b] for a, b in doc.loss_spans] == [b"yo!"]
    assert open_store(str(out)).attrs["dataset"]["chat_template"] == "auto"


def test_bad_input_fails_before_writing(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "store"
    kw = {"teacher": str(tiny_lm), "out": str(out)}
    with pytest.raises(DataError, match=r"is empty"):
        precompute(PrecomputeConfig(data=str(_write_jsonl(tmp_path / "e.jsonl", [])), **kw))
    with pytest.raises(DataError, match=r"all of them are empty"):
        precompute(PrecomputeConfig(data=str(_write_jsonl(tmp_path / "z.jsonl", ["", ""])), **kw))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xfe")
    with pytest.raises(DataError, match=r"bad.txt.*byte 3"):
        precompute(PrecomputeConfig(data=str(bad), **kw))
    with pytest.raises(ConfigError, match=r"--top-k \(999\).*400"):
        precompute(PrecomputeConfig(data=str(_write_jsonl(tmp_path / "x.jsonl", ["x"])), top_k=999, **kw))
    assert not out.exists()
    replaced = precompute(PrecomputeConfig(data=str(bad), errors="replace", top_k=0, **kw))
    assert _documents(out)[0].text == "ok \ufffd".encode() and replaced.complete


def test_config_validation_names_flags() -> None:
    with pytest.raises(ConfigError, match=r"--stride \(8\).*--max-length \(8\)"):
        PrecomputeConfig(out="x", max_length=8, stride=8)
    with pytest.raises(ConfigError, match=r"--dtype 'int4'"):
        PrecomputeConfig(out="x", dtype="int4")
    with pytest.raises(ConfigError, match=r"--rank.*--world-size"):
        PrecomputeConfig(out="x", rank=1)
    cfg = PrecomputeConfig(out="x", top_k=3)
    assert PrecomputeConfig.from_dict(cfg.to_dict()) == cfg


def test_raising_limit_extends_a_finished_store(tiny_lm, tmp_path: Path) -> None:  # noqa: ANN001
    texts = _texts(45)
    texts[7] = ""
    data = _write_jsonl(tmp_path / "data.jsonl", texts)
    base = {"teacher": str(tiny_lm), "data": str(data), "top_k": 4, "batch_tokens": 256, "shard_tokens": 300}
    grown = tmp_path / "grown"
    first = precompute(PrecomputeConfig(out=str(grown), limit=40, **base))
    assert first.complete and first.documents_written == 39
    more = precompute(PrecomputeConfig(out=str(grown), limit=41, **base))
    assert more.complete and more.documents_resumed == 39 and more.documents_written == 1
    once = tmp_path / "once"
    precompute(PrecomputeConfig(out=str(once), limit=41, **base))
    _assert_same(_documents(grown), _documents(once), exact=True)
    a, b = open_store(str(grown)), open_store(str(once))
    assert a.complete and a.attrs == b.attrs  # the same description: dataset, limit, fingerprint
    from xtd.storage import verify_store

    assert verify_store(str(grown)) == []
    # The same records named another way (here a relative path) are the same data: nothing to do.
    before = tree_digest(grown)
    relative = Path(os.path.relpath(data))
    again = precompute(PrecomputeConfig(out=str(grown), **{**base, "data": str(relative)}, limit=41))
    assert again.documents_written == 0 and again.complete and tree_digest(grown) == before
    # Fewer records than the store holds are other data: refused, nothing changed.
    with pytest.raises(StoreExistsError, match="records"):
        precompute(PrecomputeConfig(out=str(grown), limit=30, **base))
    assert tree_digest(grown) == before
