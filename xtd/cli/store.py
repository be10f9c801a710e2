"""``xtd inspect`` and ``xtd verify``: look into a teacher store, and prove it sound.

Both accept a local folder, a ``.zip`` of a finished store or any fsspec URL. Results go
to stdout (rich tables, or ``--json``); a path that is no store gives one ``error:``
line and exit 1. ``--json`` prints one line: for ``inspect`` the store's summary with
``stored_bytes``, ``arrays`` and a sample ``document``; for ``verify``
``{"store", "ok", "problems", "documents", "tokens", "files_checked", "complete"}``
(and, when ``ok`` is false, the ``error:`` line and exit code 1 as without ``--json``).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from xtd.cli._app import command, fail
from xtd.console import results
from xtd.errors import ConfigError

INSPECT_EXAMPLES = """
[bold]Examples[/]

  # metadata, array sizes, document 0
  xtd inspect runs/teacher.zarr

  xtd inspect runs/teacher.zarr --doc 12 --rows 60

  xtd inspect s3://bucket/teacher.zip --json | jq .arrays
"""

VERIFY_EXAMPLES = """
[bold]Examples[/]

  # exit 0 when sound
  xtd verify runs/teacher.zarr

  xtd verify teacher.zip || echo "do not train on this store"

  xtd verify runs/teacher.zarr --json | jq .problems
"""

_STORE_ARG = Annotated[
    str, typer.Argument(metavar="STORE", help="Store folder, .zip file or fsspec URL (memory://, s3://, ...).")
]

_out = results  # stdout carries results only


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _token_text(doc: Any, i: int, vocab: dict[int, str]) -> str:
    start, end = (int(x) for x in doc.token_spans[i])
    if start == end:
        return escape(vocab.get(int(doc.token_ids[i]), f"<special {int(doc.token_ids[i])}>"))
    # Byte-level tokens may end inside a character: show those bytes as \xNN.
    text = doc.text[start:end].decode("utf-8", errors="backslashreplace")
    return escape(text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r"))


def _special_names(tokenizer_json: str) -> dict[int, str]:
    try:
        data = json.loads(tokenizer_json)
        return {int(t["id"]): str(t["content"]) for t in data.get("added_tokens", [])}
    except (json.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        return {}


def _num(x: float) -> float | None:
    """JSON-safe float: NaN and ±inf become None."""
    return float(x) if math.isfinite(float(x)) else None


@command("inspect", epilog=INSPECT_EXAMPLES)
def inspect_store(
    store: _STORE_ARG,
    doc: Annotated[
        int, typer.Option("--doc", metavar="N", help="Index of the sample document (global order).")
    ] = 0,
    rows: Annotated[
        int, typer.Option("--rows", metavar="N", help="Token rows of the sample document to show.")
    ] = 30,
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="Print the store's description as one line of JSON.")
    ] = False,
) -> None:
    """Show a store's metadata, every array's size and bytes per token, and one document."""
    from xtd.storage import open_store

    if rows < 0:
        raise ConfigError(f"--rows ({rows}) must be 0 or more")
    reader = open_store(store)
    meta = reader.attrs
    stats = reader.array_stats()
    n_docs = len(reader)
    sample = None
    if n_docs:
        if not -n_docs <= doc < n_docs:
            raise ConfigError(
                f"--doc {doc} is out of range: the store has {n_docs} documents (0..{n_docs - 1})"
            )
        sample = reader[doc]
    summary = {
        "store": store,
        "format": meta.get("format"),
        "format_version": meta.get("format_version"),
        "xtd_version": meta.get("xtd_version"),
        "complete": reader.complete,
        "documents": n_docs,
        "tokens": reader.num_tokens,
        "text_bytes": reader.num_bytes,
        "parts": {
            name: (
                None
                if rec is None
                else {
                    k: rec.get(k) for k in ("documents_committed", "tokens_committed", "complete")
                }
            )
            for name, rec in reader.parts.items()
        },
        "shards": reader.num_shards,
        "top_k": reader.top_k,
        "topk_codec": reader.topk_codec,
        "hidden_size": reader.hidden_size,
        "boundary_classes": list(reader.boundary_classes),
        "text_coverage": reader.text_coverage,
        "teacher": meta.get("teacher"),
        "dataset": meta.get("dataset"),
        "settings": meta.get("settings"),
    }
    card = _card(store, meta)
    total = sum(s.stored_bytes for s in stats)
    arrays = [
        {
            "name": s.name,
            "dtype": s.dtype,
            "shape": list(s.shape),
            "stored_bytes": s.stored_bytes,
            "bytes_per_token": s.bytes_per_token,
        }
        for s in stats
    ]
    if as_json:
        out: dict[str, Any] = {**summary, "stored_bytes": total, "arrays": arrays, "card": card}
        if sample is not None:
            out["document"] = _doc_json(sample, doc, rows)
        typer.echo(json.dumps(out, default=str))
        return
    _print_summary(summary, total)
    table = Table(title="arrays", title_justify="left")
    for col in ("array", "dtype", "shape", "stored", "bytes/token"):
        table.add_column(col, justify="left" if col in ("array", "dtype") else "right")
    for a in arrays:
        table.add_row(
            a["name"],
            a["dtype"],
            " × ".join(map(str, a["shape"])),
            _fmt_bytes(a["stored_bytes"]),
            f"{a['bytes_per_token']:.2f}",
        )
    table.add_row(
        "[bold]total[/]", "", "", _fmt_bytes(total), f"{total / max(reader.num_tokens, 1):.2f}"
    )
    _out.print(table)
    _print_card(card)
    if sample is not None:
        _print_document(
            sample, doc, rows, reader.boundary_classes, _special_names(reader.tokenizer_json)
        )
    else:
        _out.print("the store has no committed documents yet")


def _card(store: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The store card's facts (xtd.storage.card) and whether README.md states them."""
    from xtd.storage.card import card_facts, card_status
    from xtd.storage.format import open_zarr_store

    raw = open_zarr_store(store, writable=False)
    try:
        return {**card_facts(raw, store, meta), "status": card_status(raw, store, meta)}
    finally:
        raw.close()


def _print_card(card: dict[str, Any]) -> None:
    table = Table(title="card", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    teacher, tok = card["teacher"], card["tokenizer"]
    status = {"current": "README.md (current)", "stale": "README.md ([yellow]stale[/]: the store changed since)",
              "absent": "[yellow]none[/] (a store written before store cards; xtd push writes one)"}  # fmt: skip
    rows = [
        ("card", status[card["status"]]),
        ("teacher", f"{teacher.get('name')} (revision {teacher.get('revision')})"),
        ("tokenizer", f"{tok.get('model')}, {tok.get('vocab_size')} ids, digest {tok.get('digest')}"),
        ("verify with", escape(card["verify_command"])),
        *((f"train ({what})", escape(cmd)) for what, cmd in card["train_commands"].items()),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    _out.print(table)


def _print_summary(summary: dict[str, Any], total: int) -> None:
    table = Table(title="store", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    teacher = summary["teacher"] if isinstance(summary["teacher"], dict) else {}
    dataset = summary["dataset"] if isinstance(summary["dataset"], dict) else {}
    rows = [
        ("store", summary["store"]),
        (
            "format",
            f"{summary['format']} v{summary['format_version']} (written by xtd {summary['xtd_version']})",
        ),
        (
            "complete",
            "yes"
            if summary["complete"]
            else "[yellow]no[/] (an unfinished or interrupted precompute)",
        ),
        ("documents / tokens", f"{summary['documents']:,} / {summary['tokens']:,}"),
        ("text", _fmt_bytes(summary["text_bytes"])),
        ("stored", _fmt_bytes(total)),
        ("parts / shards", f"{len(summary['parts'])} / {summary['shards']}"),
        ("top-k", f"{summary['top_k']} ({summary['topk_codec']})" if summary["top_k"] else "none"),
        ("hidden", str(summary["hidden_size"] or "none")),
        ("boundary classes", ", ".join(summary["boundary_classes"])),
        ("teacher", ", ".join(f"{k}={v}" for k, v in teacher.items()) or "-"),
        ("dataset", ", ".join(f"{k}={v}" for k, v in dataset.items()) or "-"),
        ("settings", json.dumps(summary["settings"]) if summary["settings"] else "-"),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    _out.print(table)


def _print_document(
    doc: Any, index: int, rows: int, classes: tuple[str, ...], specials: dict[int, str]
) -> None:
    n = doc.num_tokens
    table = Table(
        title=f"document {index} (doc_index {doc.doc_index}): {n} tokens, {len(doc.text)} bytes",
        title_justify="left",
        caption="logprob: log p(token | before); class columns: boundary log-mass after the token",
    )
    table.add_column("row", justify="right")
    table.add_column("id", justify="right")
    table.add_column("token")
    table.add_column("logprob", justify="right")
    for c in classes:
        table.add_column(c, justify="right")
    if doc.topk_ids is not None:
        table.add_column("top-1 (logprob)", justify="right")
    for i in range(min(n, rows)):
        lp = float(doc.token_logprob[i])
        cells = [
            str(i),
            str(int(doc.token_ids[i])),
            _token_text(doc, i, specials),
            "—" if math.isnan(lp) else f"{lp:.3f}",
        ]
        cells += [f"{float(x):.2f}" for x in doc.boundary_logmass[i]]
        if doc.topk_ids is not None and doc.topk_ids.shape[1]:
            cells.append(f"{int(doc.topk_ids[i, 0])} ({float(doc.topk_logprobs[i, 0]):.2f})")
        table.add_row(*cells)
    _out.print(table)
    if n > rows:
        _out.print(f"… {n - rows} more rows (use --rows)")


def _doc_json(doc: Any, index: int, rows: int) -> dict[str, Any]:
    k = slice(0, rows)
    out: dict[str, Any] = {
        "index": index,
        "doc_index": doc.doc_index,
        "num_tokens": doc.num_tokens,
        "num_bytes": len(doc.text),
        "text": doc.text.decode("utf-8", errors="replace"),
        "token_ids": doc.token_ids[k].tolist(),
        "token_spans": doc.token_spans[k].tolist(),
        "token_logprob": [_num(x) for x in doc.token_logprob[k]],
        "boundary_logmass": [
            [_num(x) for x in row] for row in np.asarray(doc.boundary_logmass[k], np.float32)
        ],
    }
    if doc.topk_ids is not None:
        out["topk_ids"] = doc.topk_ids[k].tolist()
        out["topk_logprobs"] = [[_num(x) for x in row] for row in doc.topk_logprobs[k]]
    return out


@command("verify", epilog=VERIFY_EXAMPLES)
def verify(
    store: _STORE_ARG,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the report as one line of JSON.")] = False,
) -> None:
    """Check a store: checksums of every file, schema and version, offsets, spans, values.

    Exit 0 when sound; otherwise exit 1 with every problem, each naming its array or file.
    """
    from xtd.storage import verify_store_report

    report = verify_store_report(store)
    if as_json:
        typer.echo(json.dumps({
            "store": store, "ok": not report.problems, "problems": report.problems, "documents": report.documents,
            "tokens": report.tokens, "files_checked": report.files_checked, "complete": report.complete,
        }))  # fmt: skip
    if report.problems and as_json:
        raise fail(escape(f"store {store!r} failed verification: {len(report.problems)} problem(s), first: {report.problems[0]}"))
    if as_json:
        return
    if report.problems:
        for problem in report.problems[:50]:
            _out.print(f"problem: {problem}", highlight=False, markup=False)
        if len(report.problems) > 50:
            _out.print(f"... and {len(report.problems) - 50} more problems")
        raise fail(
            escape(
                f"store {store!r} failed verification: {len(report.problems)} problem(s), first: {report.problems[0]}"
            )
        )
    state = (
        "" if report.complete else " (incomplete: a precompute is unfinished or was interrupted)"
    )
    _out.print(
        f"ok: {report.documents:,} documents, {report.tokens:,} tokens, {report.files_checked:,} files checked{state}",
        highlight=False,
    )
