"""Read input texts for the teacher (and for evaluation): files, globs, datasets, the embedded corpus.

A *data spec* is one string:

- ``None`` or ``"embedded"``: the embedded public-domain corpus
  (:func:`xtd.assets.iter_embedded_corpus`: Shakespeare scenes, then KJV chapters);
- a local file or glob: ``.txt`` (one document per file, read as exact UTF-8 bytes),
  ``.jsonl`` (one JSON object per line) or ``.parquet``; globs are expanded and sorted;
- a folder written by ``datasets.Dataset.save_to_disk``, any other folder or a dataset
  name that ``datasets.load_dataset`` accepts (offline: it must be in the local cache),
  with ``split``.

Every source yields :class:`Record` objects in a fixed order, each with its position
``index`` in the source (empty records keep their position, so ``index`` is the
``doc_index`` of the store). A record holds either a ``text`` or a conversation
(``messages``: ``{"role", "content"}`` dicts; ShareGPT's ``{"from", "value"}`` is mapped).
:func:`render_conversation` turns a conversation into text with a chat template and
finds the exact byte ranges of the assistant turns.

Errors are :class:`~xtd.errors.DataError` and name the file, record or byte offset.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from xtd.assets import iter_embedded_corpus
from xtd.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "Record",
    "DataSource",
    "RenderedText",
    "open_data",
    "iter_jsonl",
    "render_conversation",
    "record_fingerprint_bytes",
    "text_fingerprint",
    "TEXT_FIELD_CANDIDATES",
    "FILE_SUFFIXES",
]

TEXT_FIELD_CANDIDATES = ("text", "messages", "conversations")
"""Fields tried, in order, when no text field is given."""
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
"""Local file types read directly (anything else goes through ``datasets``)."""

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_BATCH = 512

Errors = Literal["strict", "replace"]


@dataclass(frozen=True)
class Record:
    """One input document.

    Attributes:
        index: position in the source (counting empty records), the store's ``doc_index``.
        text: the document text, or ``None`` for a conversation.
        messages: the conversation as ``{"role", "content"}`` dicts, or ``None``.
    """

    index: int
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def is_empty(self) -> bool:
        """True for an empty string or a conversation without messages."""
        if self.messages is not None:
            return len(self.messages) == 0
        return not self.text


def record_fingerprint_bytes(record: Record) -> bytes:
    """A canonical byte form of a record, fed to the dataset fingerprint hash."""
    if record.messages is not None:
        body = json.dumps(list(record.messages), ensure_ascii=False, sort_keys=True).encode()
        return b"M" + len(body).to_bytes(8, "little") + body
    body = (record.text or "").encode("utf-8", errors="surrogatepass")
    return b"T" + len(body).to_bytes(8, "little") + body


@dataclass(frozen=True)
class RenderedText:
    """A conversation rendered to text.

    Attributes:
        text: the rendered text the teacher sees.
        loss_spans: (M, 2) byte ranges ``[start, end)`` of the assistant contents, as a
            list of pairs; ``None`` when they could not be located exactly.
    """

    text: str
    loss_spans: list[tuple[int, int]] | None


class DataSource:
    """An ordered, re-iterable source of :class:`Record` objects (see the module docstring).

    Args:
        spec: the data spec (``None`` = embedded corpus).
        split: split of a ``datasets`` dataset.
        text_field: field holding the text or the messages; ``None`` tries
            :data:`TEXT_FIELD_CANDIDATES`.
        limit: read at most this many records (empty ones included).
        errors: ``"strict"``: invalid UTF-8 is an error naming file and byte offset;
            ``"replace"``: it becomes U+FFFD.

    Raises:
        DataError: no such file, no match for a glob, an unknown suffix, a dataset that
            does not load, or a missing field (checked here, before any teacher runs).
    """

    def __init__(
        self,
        spec: str | None = None,
        *,
        split: str = "train",
        text_field: str | None = None,
        limit: int | None = None,
        errors: Errors = "strict",
    ) -> None:
        if limit is not None and limit < 0:
            raise DataError(f"--limit must be >= 0, got {limit}")
        if errors not in ("strict", "replace"):
            raise DataError(f"--errors must be 'strict' or 'replace', got {errors!r}")
        self.spec = spec
        self.split = split
        self.limit = limit
        self.errors: Errors = errors
        self._files: list[Path] = []
        self._dataset: Any = None
        if spec is None or spec == "embedded":
            self.kind = "embedded"
            self.text_field = text_field or "text"
            if self.text_field != "text":
                raise DataError(f"the embedded corpus has only the field 'text', not {self.text_field!r}")
        elif _is_files_spec(spec):
            self.kind = "files"
            self._files = _expand_files(spec)
            self.text_field = self._resolve_file_field(text_field)
        else:
            self.kind = "datasets"
            self._dataset = _load_dataset(spec, split)
            self.text_field = _choose_field(text_field, list(self._dataset.column_names), repr(spec))

    def describe(self) -> dict[str, Any]:
        """The ``dataset`` store attribute (without the fingerprint)."""
        source = "embedded" if self.kind == "embedded" else str(self.spec)
        return {
            "source": source,
            "kind": self.kind,
            "split": self.split if self.kind == "datasets" else None,
            "text_field": self.text_field,
            "limit": self.limit,
            "errors": self.errors,
        }

    def __iter__(self) -> Iterator[Record]:
        if self.limit == 0:
            return
        count = 0
        for record in self._iter_all():
            yield record
            count += 1
            if self.limit is not None and count >= self.limit:
                return

    # -- sources -------------------------------------------------------------------

    def _iter_all(self) -> Iterator[Record]:
        if self.kind == "embedded":

            for i, rec in enumerate(iter_embedded_corpus()):
                yield Record(i, text=rec["text"])
        elif self.kind == "files":
            index = 0
            for path in self._files:
                for value, where in self._iter_file(path):
                    yield _make_record(index, value, self.text_field, where)
                    index += 1
        else:
            index = 0
            for batch in self._dataset.iter(batch_size=_BATCH):
                for value in batch[self.text_field]:
                    yield _make_record(index, value, self.text_field, f"record {index} of {self.spec!r}")
                    index += 1

    def _iter_file(self, path: Path) -> Iterator[tuple[Any, str]]:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            data = path.read_bytes()
            yield _decode(data, path, 0, self.errors), repr(str(path))
        elif suffix == ".jsonl":
            yield from self._iter_jsonl(path)
        else:
            yield from _iter_parquet(path, self.text_field)

    def _iter_jsonl(self, path: Path) -> Iterator[tuple[Any, str]]:
        for line_no, obj in iter_jsonl(path, errors=self.errors):
            where = f"line {line_no} of {str(path)!r}"
            if self.text_field not in obj:
                raise DataError(
                    f"{where} has no field {self.text_field!r}; its fields are "
                    f"{_names(obj)}; pass --text-field"
                )
            yield obj[self.text_field], where

    def _resolve_file_field(self, text_field: str | None) -> str:
        """Check the field against the first record of each kind of file."""
        suffixes = {p.suffix.lower() for p in self._files}
        if suffixes == {".txt"}:
            if text_field not in (None, "text"):
                raise DataError(f".txt files have only the field 'text', not {text_field!r}")
            return "text"
        for path in self._files:
            if path.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq

                try:
                    names = list(pq.ParquetFile(path).schema_arrow.names)
                except Exception as exc:  # pyarrow raises several types for bad files
                    raise DataError(f"cannot read parquet file {str(path)!r}: {exc}") from None
                return _choose_field(text_field, names, repr(str(path)))
            if path.suffix.lower() == ".jsonl":
                first = next(iter_jsonl(path, errors=self.errors), None)
                if first is None:
                    continue
                return _choose_field(text_field, list(first[1]), repr(str(path)))
        return text_field or "text"


def open_data(
    spec: str | None = None,
    *,
    split: str = "train",
    text_field: str | None = None,
    limit: int | None = None,
    errors: Errors = "strict",
) -> DataSource:
    """Open a data spec (see the module docstring); a shorthand for :class:`DataSource`."""
    return DataSource(spec, split=split, text_field=text_field, limit=limit, errors=errors)


def iter_jsonl(
    path: str | Path, *, errors: Errors = "strict", fix: str = "fix the file or pass --errors replace"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The objects of a JSON-lines file, one per non-blank line, with their 1-based line numbers.

    The one JSONL reader of xtd: :class:`DataSource`, ``xtd align --text`` and
    ``xtd eval --text/--task`` read through it and then check their own fields. Lines
    are split on ``\\n`` only (a raw U+2028 inside a JSON string stays in its line).

    Args:
        path: the file (its existence is the caller's check, with the caller's flag).
        errors: ``"strict"``: invalid UTF-8 is an error naming the byte offset;
            ``"replace"``: it becomes U+FFFD.
        fix: what the invalid-UTF-8 message tells the user to do.

    Raises:
        DataError: invalid UTF-8, a line that is not valid JSON, or one that is not an object.
    """
    path = Path(path)
    offset = 0
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            start = offset
            offset += len(raw)
            if not raw.strip():
                continue
            where = f"line {line_no} of {str(path)!r}"
            try:
                obj = json.loads(_decode(raw, path, start, errors, fix=fix))
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not valid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where} is a JSON {type(obj).__name__}, expected an object")
            if _SURROGATE_ESCAPE.search(raw):  # "\ud800" decodes to a str that is not UTF-8
                obj = _without_lone_surrogates(obj, where, errors, fix)
            yield line_no, obj


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _without_lone_surrogates(value: Any, where: str, errors: Errors, fix: str) -> Any:
    """``value`` with every string checked for lone surrogates (JSON escapes of half a pair).

    Raises:
        DataError: a lone surrogate and ``errors="strict"`` (``"replace"``: U+FFFD).
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            if errors == "replace":
                return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
            raise DataError(
                f"{where} holds a lone surrogate (\\u{ord(value[exc.start]):04x}) at character {exc.start} of a "
                f"string: half of a UTF-16 pair is not text; {fix}"
            ) from None
        return value
    if isinstance(value, dict):
        return {k: _without_lone_surrogates(v, where, errors, fix) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(v, where, errors, fix) for v in value]
    return value


# -- conversations ---------------------------------------------------------------------


def render_conversation(
    messages: Sequence[dict[str, str]],
    tokenizer: Any,
    *,
    mode: Literal["auto", "never"] = "auto",
) -> RenderedText:
    """Render a conversation and locate the assistant contents in it, exactly.

    ``mode="auto"`` applies the tokenizer's chat template (``tokenizer`` is a transformers
    tokenizer); ``"never"`` writes plain ``role: content`` lines. Loss spans are found by
    rendering once with a unique sentinel in place of each content: if putting the
    contents back between the template pieces reproduces the real rendering byte for
    byte, the piece lengths give exact byte ranges; if the template transforms contents
    (e.g. trims them), the spans are ``None`` rather than approximate.

    Raises:
        DataError: ``mode="auto"`` and the tokenizer has no chat template.
    """
    contents = [m["content"] for m in messages]
    if mode == "never":
        # piece i precedes content i: "role: "; the last piece closes the last line.
        roles = [f"{m['role']}: " for m in messages]
        pieces = [roles[0]] + ["\n" + r for r in roles[1:]] + ["\n"] if roles else [""]
        return _assemble(pieces, contents, messages)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the data holds conversations but the teacher tokenizer has no chat template; "
            "pass --chat-template never to render them as plain 'role: content' lines"
        )
    real = tokenizer.apply_chat_template(list(messages), tokenize=False)
    sentinels = [f"\x1eXTD{i}SLOT\x1f" for i in range(len(messages))]
    marked = tokenizer.apply_chat_template(
        [{**m, "content": s} for m, s in zip(messages, sentinels, strict=True)], tokenize=False
    )
    pieces_or_none = _split_on_sentinels(marked, sentinels)
    if pieces_or_none is None:
        return RenderedText(real, None)
    rendered = _assemble(pieces_or_none, contents, messages)
    if rendered.text != real:
        return RenderedText(real, None)
    return rendered


def _split_on_sentinels(marked: str, sentinels: list[str]) -> list[str] | None:
    pieces = []
    pos = 0
    for s in sentinels:
        at = marked.find(s, pos)
        if at < 0 or marked.count(s) != 1:
            return None
        pieces.append(marked[pos:at])
        pos = at + len(s)
    pieces.append(marked[pos:])
    return pieces


def _assemble(pieces: list[str], contents: list[str], messages: Sequence[dict[str, str]]) -> RenderedText:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    nbytes = 0
    for i, content in enumerate(contents):
        parts.append(pieces[i])
        nbytes += len(pieces[i].encode("utf-8"))
        size = len(content.encode("utf-8"))
        if messages[i]["role"] == "assistant" and size:
            spans.append((nbytes, nbytes + size))
        parts.append(content)
        nbytes += size
    parts.append(pieces[-1])
    return RenderedText("".join(parts), spans)


# -- helpers -----------------------------------------------------------------------------


def _is_files_spec(spec: str) -> bool:
    if any(c in spec for c in "*?["):
        return True
    path = Path(spec)
    if path.is_file():
        return True
    return path.suffix.lower() in FILE_SUFFIXES


def _expand_files(spec: str) -> list[Path]:
    if any(c in spec for c in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise DataError(f"no files match {spec!r}")
    else:
        paths = [Path(spec)]
        if not paths[0].exists():
            raise DataError(f"data file {spec!r} does not exist")
    bad = [str(p) for p in paths if p.suffix.lower() not in FILE_SUFFIXES]
    if bad:
        raise DataError(
            f"cannot read {bad[0]!r}: supported files are {', '.join(FILE_SUFFIXES)} "
            "(or pass a datasets folder or name)"
        )
    return paths


def _decode(
    data: bytes, path: Path, base_offset: int, errors: Errors, *, fix: str = "fix the file or pass --errors replace"
) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(path)!r} is not valid UTF-8 at byte {base_offset + exc.start} (0x{data[exc.start]:02x}); {fix}"
        ) from None


def _iter_parquet(path: Path, field: str) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = list(pf.schema_arrow.names)
    if field not in names:
        raise DataError(f"{str(path)!r} has no column {field!r}; its columns are {_names(names)}; pass --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH, columns=[field]):
        for value in batch.column(0).to_pylist():
            yield value, f"row {row} of {str(path)!r}"
            row += 1


def _load_dataset(spec: str, split: str) -> Any:
    import datasets

    path = Path(spec)
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"dataset {spec!r} has no split {split!r}; its splits are {_names(list(ds))}; pass --split")
                ds = ds[split]
            return ds
        return datasets.load_dataset(spec, split=split)
    except DataError:
        raise
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"dataset {spec!r} has no split {split!r} ({exc}); pass --split") from None
        raise DataError(f"cannot load dataset {spec!r}: {exc}") from None
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, …)
        hint = "" if path.exists() else " (offline: a dataset name must already be in the local cache; or pass files)"
        raise DataError(f"cannot load dataset {spec!r}: {type(exc).__name__}: {exc}{hint}") from None


def _choose_field(text_field: str | None, names: list[str], where: str) -> str:
    if text_field is not None:
        if text_field not in names:
            raise DataError(f"{where} has no field {text_field!r}; its fields are {_names(names)}; pass --text-field")
        return text_field
    for candidate in TEXT_FIELD_CANDIDATES:
        if candidate in names:
            return candidate
    raise DataError(
        f"{where} has none of the fields {_names(list(TEXT_FIELD_CANDIDATES))}; its fields are "
        f"{_names(names)}; pass --text-field"
    )


def _names(names: Any) -> str:
    names = list(names)
    return ", ".join(repr(n) for n in names) if names else "(none)"


def _make_record(index: int, value: Any, field: str, where: str) -> Record:
    if value is None:
        return Record(index, text="")
    if isinstance(value, str):
        return Record(index, text=value)
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return Record(index, messages=tuple(_message(m, where) for m in value))
    raise DataError(
        f"{where}: field {field!r} holds a {type(value).__name__}; expected a string or a list "
        "of {role, content} messages"
    )


def _message(m: dict[str, Any], where: str) -> dict[str, str]:
    if "role" in m and "content" in m:
        role, content = m["role"], m["content"]
    elif "from" in m and "value" in m:  # ShareGPT
        role, content = _SHAREGPT_ROLES.get(str(m["from"]), str(m["from"])), m["value"]
    else:
        raise DataError(f"{where}: a message has fields {_names(m)}; expected 'role' and 'content'")
    if content is None:
        content = ""
    if not isinstance(role, str) or not isinstance(content, str):
        raise DataError(f"{where}: message role and content must be strings")
    return {"role": role, "content": content}


def text_fingerprint(records: Sequence[Record]) -> str:
    """16 hex chars of sha256 over the records' canonical bytes (what the store records)."""
    h = hashlib.sha256()
    for r in records:
        h.update(record_fingerprint_bytes(r))
    return h.hexdigest()[:16]

