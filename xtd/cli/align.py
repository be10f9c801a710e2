"""``xtd align``: show how two tokenizers chunk a text, or cache a student's alignment.

``--text``/``--input`` print a rich table of chunks (teacher tokens | student tokens |
bytes) per text, or with ``--json`` one JSON object per text:
``{"teacher": [{"id", "start", "end"}], "student": [...], "chunks": [{"teacher": [a, b],
"student": [d, e], "start", "end"}]}`` — token ranges half-open, byte offsets into the
UTF-8 text (spec/ALM.md §3). ``--cache STORE`` computes the student tokens and chunk ids
of every document of a teacher store and keeps them under
``alignments/<student tokenizer digest>/`` so training skips that work.

``--report`` audits the pair over a whole corpus instead (xtd.align_report): chunk
counts and lengths, digit bytes in multi-token chunks, numbers split at different
places and, over a teacher store (``--store``), the groups that merging under γ makes;
a table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from xtd.cli._app import command
from xtd.config import AlignConfig, flag
from xtd.console import progress_bar, results
from xtd.data import iter_jsonl
from xtd.errors import ConfigError, DataError, TokenizerMismatchError

EXAMPLES = """\
Examples:

  xtd align --teacher-tokenizer embedded:llama3 --student-tokenizer bytes --text "Hello world!"

  xtd align --teacher-tokenizer embedded:smollm2 --student-tokenizer embedded:mistral-v1 --input texts.jsonl --json

  xtd align --cache runs/teacher --student-tokenizer embedded:gpt2

  xtd align --report --store runs/maths/teacher.zarr --student-tokenizer embedded:gpt2 --json
"""

_out = results  # stdout: results only (STYLE.md §5)
_CACHE_BATCH = 64  # documents encoded and aligned per vectorised call


@command("align", epilog=EXAMPLES)
def align_command(
    student_tokenizer: Annotated[
        str, typer.Option("--student-tokenizer", help="HF id or folder, tokenizer.json, 'bytes' or 'embedded:<name>'.")
    ],
    teacher_tokenizer: Annotated[
        str | None,
        typer.Option("--teacher-tokenizer", help="Same forms; with --cache, defaults to the store's tokenizer."),
    ] = AlignConfig.teacher_tokenizer,
    text: Annotated[str | None, typer.Option("--text", help="One text to align.")] = None,
    input_path: Annotated[
        Path | None, typer.Option("--input", help="JSON lines file with a 'text' field per line.")
    ] = None,
    cache: Annotated[
        str | None, typer.Option("--cache", help="Teacher store: cache the student's alignment of every document.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per text on stdout.")] = False,
    add_special_tokens: Annotated[
        bool, typer.Option("--add-special-tokens", help="Let each tokenizer add its bos/eos.")
    ] = AlignConfig.add_special_tokens,
    allow_strip_unicode_normalizer: Annotated[
        bool,
        typer.Option("--allow-strip-unicode-normalizer", help="Remove an NFC/NFKC normaliser instead of refusing."),
    ] = AlignConfig.allow_strip_unicode_normalizer,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="With --cache: rebuild an existing cached alignment.")
    ] = AlignConfig.overwrite,
    report: Annotated[
        bool,
        typer.Option("--report", help="Audit the pair over the whole corpus: chunks, digits, numbers, merged groups."),
    ] = AlignConfig.report,
    store: Annotated[
        str | None,
        typer.Option("--store", help="With --report: a teacher store as the corpus (adds the merge statistics)."),
    ] = None,
    merge_threshold: Annotated[
        float, typer.Option("--merge-threshold", help="With --report --store: γ of the merge statistics.")
    ] = AlignConfig.merge_threshold,
) -> None:
    """Chunk two tokenizations of the same text (spec/ALM.md §3)."""
    config = AlignConfig(
        student_tokenizer=student_tokenizer,
        teacher_tokenizer=teacher_tokenizer,
        add_special_tokens=add_special_tokens,
        allow_strip_unicode_normalizer=allow_strip_unicode_normalizer,
        overwrite=overwrite,
        report=report,
        merge_threshold=merge_threshold,
    )
    if report:
        _report_command(config, text=text, input_path=input_path, store=store, cache=cache, as_json=as_json)
        return
    if store is not None:
        raise ConfigError("--store is the corpus of --report; to cache alignments in a store pass --cache")
    sources = [name for name, value in (("text", text), ("input", input_path), ("cache", cache)) if value is not None]
    if len(sources) != 1:
        given = ", ".join(flag(s) for s in sources) or "none"
        raise ConfigError(f"give exactly one of --text, --input or --cache (given: {given})")
    if cache is not None:
        if as_json:
            raise ConfigError("--json applies to --text/--input, not to --cache")
        count = cache_alignment(cache, config)
        _out.print(f"cached the alignment of {count} documents in {cache!r}", highlight=False)
        return
    if config.teacher_tokenizer is None:
        raise ConfigError("--teacher-tokenizer is required with --text or --input")
    texts = [text] if text is not None else list(_read_jsonl(input_path))  # type: ignore[arg-type]
    from xtd.tokenization import load_tokenizer

    teacher = load_tokenizer(config.teacher_tokenizer, allow_strip_unicode_normalizer=allow_strip_unicode_normalizer)
    student = load_tokenizer(config.student_tokenizer, allow_strip_unicode_normalizer=allow_strip_unicode_normalizer)
    records = align_texts(teacher, student, texts, add_special_tokens=add_special_tokens)
    for i, (record, body) in enumerate(zip(records, texts, strict=True)):
        if as_json:
            typer.echo(json.dumps(record, ensure_ascii=False))
        else:
            _print_table(record, body, teacher, student, title=f"text {i}" if len(texts) > 1 else None)


def align_texts(teacher: Any, student: Any, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[dict[str, Any]]:
    """The ``--json`` records of ``texts`` (one batched encode and align per side)."""
    from xtd.align import align_many

    t_enc = teacher.encode_batch(texts, add_special_tokens=add_special_tokens)
    s_enc = student.encode_batch(texts, add_special_tokens=add_special_tokens)
    pairs = [
        (a.spans, b.spans, teacher.special_mask(a.ids), student.special_mask(b.ids))
        for a, b in zip(t_enc, s_enc, strict=True)
    ]
    records = []
    for a, b, al in zip(t_enc, s_enc, align_many(pairs), strict=True):
        t_ranges, s_ranges = al.teacher_ranges, al.student_ranges
        records.append(
            {
                "teacher": _tokens(a),
                "student": _tokens(b),
                "chunks": [
                    {
                        "teacher": t_ranges[c].tolist(),
                        "student": s_ranges[c].tolist(),
                        "start": int(al.chunk_bytes[c, 0]),
                        "end": int(al.chunk_bytes[c, 1]),
                    }
                    for c in range(al.num_chunks)
                ],
            }
        )
    return records


def _tokens(enc: Any) -> list[dict[str, int]]:
    return [{"id": int(i), "start": int(s), "end": int(e)} for i, (s, e) in zip(enc.ids, enc.spans, strict=True)]


def _read_jsonl(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise DataError(f"--input {str(path)!r} does not exist or is not a file")
    for line_no, record in iter_jsonl(path, fix="convert it to UTF-8"):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{str(path)!r} line {line_no} has no string 'text' field")
        yield record["text"]


def _show(tok: Any, ident: int) -> str:
    if tok.special_mask(np.asarray([ident]))[0]:
        return f"[magenta]{escape(tok.hf.convert_ids_to_tokens(int(ident)))}[/]"
    return escape(repr(tok.token_bytes[int(ident)].decode("utf-8", errors="backslashreplace"))[1:-1])


def _print_table(record: dict[str, Any], text: str, teacher: Any, student: Any, *, title: str | None) -> None:
    raw = text.encode("utf-8")
    table = Table(title=title, show_lines=False)
    table.add_column("#", justify="right")
    table.add_column(f"teacher ({escape(teacher.name)})")
    table.add_column(f"student ({escape(student.name)})")
    table.add_column("bytes")
    for c, chunk in enumerate(record["chunks"]):
        t_ids = [record["teacher"][i]["id"] for i in range(*chunk["teacher"])]
        s_ids = [record["student"][i]["id"] for i in range(*chunk["student"])]
        body = raw[chunk["start"] : chunk["end"]].decode("utf-8", errors="backslashreplace")
        table.add_row(
            str(c),
            " · ".join(_show(teacher, i) for i in t_ids),
            " · ".join(_show(student, i) for i in s_ids),
            escape(repr(body)[1:-1]) if chunk["end"] > chunk["start"] else "[dim]slot[/]",
        )
    _out.print(table)
    covered_t = sum(b - a for a, b in (c["teacher"] for c in record["chunks"]))
    covered_s = sum(b - a for a, b in (c["student"] for c in record["chunks"]))
    _out.print(
        f"{len(record['chunks'])} chunks · teacher {covered_t}/{len(record['teacher'])} tokens · "
        f"student {covered_s}/{len(record['student'])} tokens · {len(raw)} bytes",
        highlight=False,
    )


# -- --report ------------------------------------------------------------------------


def _report_command(
    config: AlignConfig, *, text: str | None, input_path: Path | None, store: str | None, cache: str | None,
    as_json: bool,
) -> None:
    from xtd.align_report import format_rows

    if cache is not None:
        raise ConfigError("--report reads a store with --store, not --cache (which writes alignments)")
    sources = [name for name, value in (("text", text), ("input", input_path), ("store", store)) if value is not None]
    if len(sources) != 1:
        given = ", ".join(flag(s) for s in sources) or "none"
        raise ConfigError(f"--report needs exactly one of --text, --input or --store (given: {given})")
    from xtd.align_report import report_store, report_texts
    from xtd.tokenization import load_tokenizer

    allow = config.allow_strip_unicode_normalizer
    if store is not None:
        student = load_tokenizer(config.student_tokenizer, allow_strip_unicode_normalizer=allow)
        teacher = None
        if config.teacher_tokenizer is not None:
            teacher = load_tokenizer(config.teacher_tokenizer, allow_strip_unicode_normalizer=allow)
        with progress_bar() as bar:
            task = bar.add_task("auditing", total=None)
            result = report_store(
                store, student, teacher=teacher, merge_threshold=config.merge_threshold,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    else:
        if config.teacher_tokenizer is None:
            raise ConfigError("--teacher-tokenizer is required with --report --text/--input (or pass --store)")
        texts = [text] if text is not None else list(_read_jsonl(input_path))  # type: ignore[arg-type]
        teacher = load_tokenizer(config.teacher_tokenizer, allow_strip_unicode_normalizer=allow)
        student = load_tokenizer(config.student_tokenizer, allow_strip_unicode_normalizer=allow)
        result = report_texts(texts, teacher, student, add_special_tokens=config.add_special_tokens)
    record = result.to_dict()
    if as_json:
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    table = Table(title="alignment report")
    table.add_column("quantity")
    table.add_column(f"teacher ({escape(result.teacher)})", justify="right")
    table.add_column(f"student ({escape(result.student)})", justify="right")
    for row in format_rows(record):
        table.add_row(*(escape(cell) for cell in row))
    _out.print(table)


# -- --cache -------------------------------------------------------------------------


def cache_alignment(url: str, config: AlignConfig) -> int:
    """Cache the student tokens and chunk ids of every document of the store at ``url``.

    Each document gets ``student_ids`` (S,) int32, ``student_spans`` (S, 2) int32,
    ``student_chunk`` (S,) int32 and ``teacher_chunk`` (T,) int32 over the whole
    document, computed as training would on the fly (xtd.batching.build_example): the
    student mirrors a leading teacher special token (bos) with its own bos, and
    teacher rows with empty spans (or ``token_slot`` ≠ 0) are slot units.

    Returns:
        The number of documents cached.

    Raises:
        TokenizerMismatchError: ``--teacher-tokenizer`` differs from the store's.
    """
    from xtd.storage import open_store, write_alignment
    from xtd.tokenization import load_tokenizer, tokenizer_from_json

    reader = open_store(url)
    if not reader.tokenizer_json:
        raise DataError(f"store {url!r} embeds no teacher tokenizer; re-run xtd precompute")
    teacher = tokenizer_from_json(reader.tokenizer_json, name=f"{url} (teacher)")
    if config.teacher_tokenizer is not None:
        given = load_tokenizer(config.teacher_tokenizer, allow_strip_unicode_normalizer=config.allow_strip_unicode_normalizer)
        if given.digest != teacher.digest:
            raise TokenizerMismatchError(
                f"--teacher-tokenizer {config.teacher_tokenizer!r} is not the tokenizer store {url!r} was made "
                "with; leave --teacher-tokenizer out to use the store's own"
            )
    student = load_tokenizer(config.student_tokenizer, allow_strip_unicode_normalizer=config.allow_strip_unicode_normalizer)
    num_documents = len(reader)
    attrs = {
        "student_tokenizer": config.student_tokenizer,
        "student_digest": student.digest,
        "teacher_digest": teacher.digest,
        "chunks": "unconstrained",
        "config": config.to_dict(),
    }

    def documents() -> Iterator[dict[str, np.ndarray]]:
        with progress_bar() as progress:
            task = progress.add_task("aligning", total=num_documents)
            for lo in range(0, num_documents, _CACHE_BATCH):
                docs = [reader[d] for d in range(lo, min(lo + _CACHE_BATCH, num_documents))]
                yield from _align_documents(docs, student, where=f"store {url!r}, documents from {lo}")
                progress.update(task, advance=len(docs))

    write_alignment(url, student.digest, documents(), num_documents=num_documents, attrs=attrs, overwrite=config.overwrite)
    return num_documents


def _align_documents(docs: Sequence[Any], student: Any, *, where: str) -> list[dict[str, np.ndarray]]:
    from xtd.align import align_many
    from xtd.batching import alignment_inputs, document_text

    texts = [document_text(doc, where=f"{where}: document {k}") for k, doc in enumerate(docs)]
    encodings = student.encode_batch(texts)
    sides = [
        alignment_inputs(doc, student, enc.ids.astype(np.int32), enc.spans.astype(np.int32))
        for doc, enc in zip(docs, encodings, strict=True)
    ]
    pairs = [(x.teacher_spans, x.student_spans, x.teacher_special, x.student_special) for x in sides]
    return [
        {
            "student_ids": x.student_ids,
            "student_spans": x.student_spans,
            "student_chunk": al.student_chunk.astype(np.int32),
            "teacher_chunk": al.teacher_chunk.astype(np.int32),
        }
        for x, al in zip(sides, align_many(pairs), strict=True)
    ]
