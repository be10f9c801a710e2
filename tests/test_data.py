"""xtd.data: every input kind, conversation rendering with exact loss spans, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xtd.data import DataSource, Record, render_conversation, text_fingerprint
from xtd.errors import DataError


def _texts(source: DataSource) -> list[str | None]:
    return [r.text for r in source]


def test_txt_files_and_globs_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first 👍\r\n", encoding="utf-8")
    (tmp_path / "c.txt").write_bytes(b"")
    source = DataSource(str(tmp_path / "*.txt"))
    records = list(source)
    assert [r.text for r in records] == ["first 👍\r\n", "second\n", ""]
    assert [r.index for r in records] == [0, 1, 2]
    assert records[2].is_empty and not records[0].is_empty
    assert _texts(DataSource(str(tmp_path / "b.txt"))) == ["second\n"]
    assert source.describe()["text_field"] == "text"


def test_invalid_utf8_names_file_and_offset(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match=r"bad.txt.*byte 6.*--errors replace"):
        list(DataSource(str(bad)))
    assert _texts(DataSource(str(bad), errors="replace")) == ["hello \ufffd world"]


def test_invalid_utf8_in_jsonl_counts_bytes_across_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "a\xc3"}\n')
    with pytest.raises(DataError, match=r"byte 26 "):
        list(DataSource(str(path)))


def test_jsonl_field_choice_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    rows = [{"body": "one", "id": 1}, {"body": "", "id": 2}, {"body": "three", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"'body', 'id'.*--text-field"):
        DataSource(str(path))
    with pytest.raises(DataError, match=r"no field 'txt'.*'body', 'id'"):
        DataSource(str(path), text_field="txt")
    assert _texts(DataSource(str(path), text_field="body")) == ["one", "", "three"]
    assert _texts(DataSource(str(path), text_field="body", limit=2)) == ["one", ""]
    assert _texts(DataSource(str(path), text_field="body", limit=0)) == []


def test_jsonl_bad_json_and_bad_types(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 of .*not valid JSON"):
        list(DataSource(str(path)))
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"holds a int"):
        list(DataSource(str(path)))


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"content": ["x", "yz", None], "n": [1, 2, 3]}), path)
    with pytest.raises(DataError, match=r"'content', 'n'"):
        DataSource(str(path))
    assert _texts(DataSource(str(path), text_field="content")) == ["x", "yz", ""]


def test_datasets_folder_and_missing_field(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b", ""], "label": [0, 1, 2]}).save_to_disk(str(tmp_path / "ds"))
    source = DataSource(str(tmp_path / "ds"))
    assert _texts(source) == ["a", "b", ""]
    with pytest.raises(DataError, match=r"no field 'body'.*'text', 'label'"):
        DataSource(str(tmp_path / "ds"), text_field="body")
    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _texts(DataSource(str(tmp_path / "dd"), split="validation")) == ["v"]
    with pytest.raises(DataError, match=r"no split 'train'.*'validation'"):
        DataSource(str(tmp_path / "dd"))


def test_missing_inputs_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist"):
        DataSource(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"no files match"):
        DataSource(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"supported files"):
        DataSource(str(tmp_path / "*.csv"))
    with pytest.raises(DataError, match=r"cannot load dataset"):
        DataSource("no-such-org/no-such-dataset-xtd")


def test_embedded_corpus_is_deterministic() -> None:
    a = list(DataSource(None, limit=3))
    b = list(DataSource("embedded", limit=3))
    assert a == b and len(a) == 3 and all(r.text for r in a)
    assert text_fingerprint(a) == text_fingerprint(b)
    assert text_fingerprint(a) != text_fingerprint(a[:2])


def test_conversations_and_sharegpt(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    (recs,) = [list(DataSource(str(path)))]
    assert recs[0].messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    path.write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert list(DataSource(str(path)))[0].messages == (
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    )
    assert Record(0, messages=()).is_empty


class _TemplateTokenizer:
    """A stand-in with a chat template: what render_conversation needs of a tokenizer."""

    def __init__(self, template: str) -> None:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        self.hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
        self.hf.chat_template = template
        self.chat_template = template

    def apply_chat_template(self, messages, tokenize=False):  # noqa: ANN001, ANN201
        return self.hf.apply_chat_template(messages, tokenize=tokenize)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def test_render_conversation_spans_are_exact() -> None:
    tok = _TemplateTokenizer(CHATML)
    messages = [
        {"role": "user", "content": "assistant?"},  # content equal to text inside the template
        {"role": "assistant", "content": "Ja, 👍 sure"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "a"},
    ]
    rendered = render_conversation(messages, tok)
    raw = rendered.text.encode("utf-8")
    assert rendered.text == tok.apply_chat_template(messages)
    assert [raw[a:b].decode() for a, b in rendered.loss_spans] == ["Ja, 👍 sure", "a"]
    # The last assistant "a" is the one after the last "assistant\n" header.
    assert raw[: rendered.loss_spans[1][0]].endswith(b"<|im_start|>assistant\n")


def test_render_conversation_gives_up_when_template_changes_content() -> None:
    tok = _TemplateTokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}")
    rendered = render_conversation([{"role": "assistant", "content": "  padded  "}], tok)
    assert rendered.text == "assistant: padded\n" and rendered.loss_spans is None


def test_render_never_and_missing_template() -> None:
    messages = [{"role": "user", "content": "é?"}, {"role": "assistant", "content": "oui"}]
    rendered = render_conversation(messages, None, mode="never")
    assert rendered.text == "user: é?\nassistant: oui\n"
    (span,) = rendered.loss_spans
    assert rendered.text.encode()[span[0] : span[1]] == b"oui"
    tok = _TemplateTokenizer(CHATML)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"--chat-template never"):
        render_conversation(messages, tok)
