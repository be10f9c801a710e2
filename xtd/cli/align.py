"""``xtd align``: show how two tokenizers chunk a text, or cache a student's alignment.

``TEXT`` (one text on the command line) or ``--text FILE`` (.txt: one text; .jsonl: field
``text`` per line, as in ``xtd eval``) print a rich table of chunks (teacher tokens |
student tokens | bytes) per text. ``--json`` prints one line:
``{"texts": [{"teacher": [{"id", "start", "end"}], "student": [...], "chunks":
[{"teacher": [a, b], "student": [d, e], "start", "end"}]}]}`` — token ranges half-open,
byte offsets into the UTF-8 text. ``--cache STORE`` computes the student tokens and chunk
ids of every document of a teacher store (:mod:`xtd.alignment_cache`); with ``--json`` it
prints ``{"store", "documents", "nothing_to_do"}``.

``--report`` audits the pair over a whole corpus instead (:mod:`xtd.align_report`): chunk
counts and lengths, digit bytes in multi-token chunks, numbers split at different places
and, over a teacher store (``--store``), the groups that merging under γ makes; a table, or
one line of JSON with ``--json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from xtd.cli._options import config_command
from xtd.config import AlignConfig, flag
from xtd.console import progress_bar, results
from xtd.errors import ConfigError
from xtd.texts import read_texts
from xtd.tokenization import load_tokenizer

logger = logging.getLogger(__name__)

EXAMPLES = """
[bold]Examples[/]

  xtd align "Hello world!" --teacher-tokenizer embedded:llama3 --student-tokenizer bytes

  xtd align --text texts.jsonl --teacher-tokenizer embedded:smollm2 --student-tokenizer embedded:mistral-v1 --json

  xtd align --cache runs/teacher.zarr --student-tokenizer embedded:gpt2

  xtd align --report --store runs/maths/teacher.zarr --student-tokenizer embedded:gpt2 --json
"""

_out = results  # stdout carries results only


@config_command("align", AlignConfig, epilog=EXAMPLES)
def align_command(
    config: AlignConfig,
    literal: Annotated[
        str | None, typer.Argument(metavar="TEXT", help="One text to align, given on the command line.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the result as one line of JSON.")] = False,
) -> None:
    """Chunk two tokenizations of the same text, or cache a student's alignment in a store."""
    given = (("TEXT", literal), ("--text", config.text), ("--cache", config.cache))
    if config.report:
        _report_command(config, literal=literal, as_json=as_json)
        return
    if config.store is not None:
        raise ConfigError(f"{flag('store')} is the corpus of {flag('report')}; to cache alignments in a store pass {flag('cache')}")
    sources = [name for name, value in given if value is not None]
    if len(sources) != 1:
        raise ConfigError(f"give exactly one of TEXT, --text FILE or --cache STORE (given: {', '.join(sources) or 'none'})")
    if config.cache is not None:
        from xtd.alignment_cache import cache_alignment  # torch: loaded only when a store is cached

        with progress_bar() as bar:
            task = bar.add_task("aligning", total=None)
            count = cache_alignment(config.cache, config, progress=lambda done, total: bar.update(task, completed=done, total=total))
        if as_json:
            typer.echo(json.dumps({"store": config.cache, "documents": count, "nothing_to_do": count is None}))
        elif count is None:
            _out.print(f"{config.cache!r} already caches this student tokenizer's alignment; nothing to do", highlight=False)
        else:
            _out.print(f"cached the alignment of {count} documents in {config.cache!r}", highlight=False)
        return
    if config.teacher_tokenizer is None:
        raise ConfigError(f"{flag('teacher_tokenizer')} is required with TEXT or {flag('text')}")
    texts = [literal] if literal is not None else read_texts(config.text)  # type: ignore[arg-type]
    strip = config.allow_strip_unicode_normalizer
    teacher = load_tokenizer(config.teacher_tokenizer, allow_strip_unicode_normalizer=strip)
    student = load_tokenizer(config.student_tokenizer, allow_strip_unicode_normalizer=strip)
    records = align_texts(teacher, student, texts, add_special_tokens=config.add_special_tokens)
    if as_json:
        typer.echo(json.dumps({"texts": records}, ensure_ascii=False))
        return
    for i, (record, body) in enumerate(zip(records, texts, strict=True)):
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


def _report_command(config: AlignConfig, *, literal: str | None, as_json: bool) -> None:
    from xtd.align_report import format_rows, report_store, report_texts

    if config.cache is not None:
        raise ConfigError(f"{flag('report')} reads a store with {flag('store')}, not {flag('cache')} (which writes alignments)")
    given = (("TEXT", literal), ("--text", config.text), ("--store", config.store))
    sources = [name for name, value in given if value is not None]
    if len(sources) != 1:
        raise ConfigError(f"{flag('report')} needs exactly one of TEXT, --text FILE or --store STORE (given: {', '.join(sources) or 'none'})")
    allow = config.allow_strip_unicode_normalizer
    student = load_tokenizer(config.student_tokenizer, allow_strip_unicode_normalizer=allow)
    if config.store is not None:
        teacher = None
        if config.teacher_tokenizer is not None:
            teacher = load_tokenizer(config.teacher_tokenizer, allow_strip_unicode_normalizer=allow)
        with progress_bar() as bar:
            task = bar.add_task("auditing", total=None)
            result = report_store(
                config.store, student, teacher=teacher, merge_threshold=config.merge_threshold,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    else:
        if config.teacher_tokenizer is None:
            raise ConfigError(f"{flag('teacher_tokenizer')} is required with {flag('report')} and TEXT or {flag('text')} (or pass {flag('store')})")
        texts = [literal] if literal is not None else read_texts(config.text)  # type: ignore[arg-type]
        teacher = load_tokenizer(config.teacher_tokenizer, allow_strip_unicode_normalizer=allow)
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
