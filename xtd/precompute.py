"""Stage 1: run the teacher once over a dataset and write the shard store (docs/format.md).

:func:`precompute` wires :mod:`xtd.data` (records), :mod:`xtd.teacher` (loading),
:mod:`xtd.scoring` (the forward passes) and :mod:`xtd.storage` (the writer). In order, so that bad input fails before any weights
load:

1. look at ``--out`` (nothing there, or an xtd store; a folder holding anything else
   is refused, whatever the flags), open the data and resolve the teacher (config,
   tokenizer, weights digest);
2. one pass over the records: fingerprint, counts, empty records (skipped and counted),
   a check that conversations can be rendered, and the fingerprint of as many records
   as the existing store was written from — equal, they are the same data (the store
   keeps its description); fewer than now, the store is *extended* with the rest;
3. open this rank's part of the store — a store written with other settings is refused
   unless ``overwrite`` — and read the resume point ``documents_committed``;
4. load the model and score this rank's documents (document ``d`` belongs to rank
   ``d % world_size``), skipping the committed ones; a background thread writes each
   document while the teacher computes the next batch (a bounded queue, so memory
   stays flat whatever the dataset size).

Documents are written in ``doc_index`` order, and the teacher's batches are a pure
function of the input (see :mod:`xtd.scoring`), so rerunning an interrupted command
produces a store array-equal to an uninterrupted run. Ctrl-C finishes the writes in
flight, keeps every committed shard and re-raises ``KeyboardInterrupt``.

Conversations (lists of ``{role, content}``) are rendered with the teacher's chat
template (``chat_template="auto"``) or as plain ``role: content`` lines (``"never"``);
``loss_spans`` then hold the assistant turns' byte ranges. ``token_slot`` is not
written in this version: special tokens are stored as rows with empty byte spans.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from xtd.config import PrecomputeConfig, flag
from xtd.data import DataSource, Record, record_fingerprint_bytes, render_conversation
from xtd.errors import ConfigError, DataError
from xtd.runtime import resolve_device, resolve_dtype
from xtd.scoring import ScoreStats, TeacherInput, score_documents
from xtd.storage import Document, StoreWriter, existing_store
from xtd.teacher import TeacherSource, load_teacher, resolve_teacher
from xtd.tokenization import BOUNDARY_CLASSES

logger = logging.getLogger(__name__)

__all__ = ["precompute", "PrecomputeResult", "PrecomputeProgress", "resolve_rank", "saved_settings", "store_attributes"]

BOUNDARY_CLASS_RULES = {
    "space": "the next token's byte view starts with 0x20 (and it is not special)",
    "newline": "the next token's byte view starts with 0x0A (and it is not special)",
    "tab": "the next token's byte view starts with 0x09 (and it is not special)",
    "special": "the next token is a special token of the teacher tokenizer (tested first)",
}
SCORING_VERSION = 1
_QUEUE_DOCUMENTS = 64


@dataclass(frozen=True)
class PrecomputeProgress:
    """What a progress callback receives after each document is handed to the writer."""

    documents_done: int
    """Documents of this rank done, committed ones of an earlier run included."""
    documents_total: int
    """Non-empty documents of this rank."""
    tokens: int
    """Token rows of the documents written in this run."""
    elapsed_s: float
    """Seconds since the teacher started scoring."""
    forward_tokens: int = 0
    """Positions the teacher has run in this run, documents still in progress included."""
    eta_s: float | None = None
    """Estimated seconds left (from the text bytes still to score); None until known."""

    @property
    def tokens_per_s(self) -> float:
        """Scored token rows per second in this run."""
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class PrecomputeResult:
    """Summary of one :func:`precompute` call (one rank)."""

    out: str
    rank: int
    world_size: int
    documents_total: int
    """Non-empty documents of this rank."""
    documents_written: int
    """Documents scored and written in this run."""
    documents_resumed: int
    """Documents already committed by an earlier run (skipped)."""
    empty_documents: int
    """Empty records of this rank, skipped."""
    tokens: int
    """Token rows written in this run."""
    seconds: float
    """Wall time of the scoring loop."""
    complete: bool
    """Whether this rank's part is complete."""
    inexact_loss_spans: int = 0
    """Conversations whose assistant turns could not be located exactly (trained on whole text)."""
    teacher: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Token rows written per second of scoring."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)`` from the arguments, else torchrun's ``RANK``/``WORLD_SIZE``, else (0, 1).

    Raises:
        ConfigError: only one of the two given, or a rank outside ``[0, world_size)``.
    """
    if (rank is None) != (world_size is None):
        raise ConfigError(f"give both {flag('rank')} and {flag('world_size')}, or neither")
    if rank is None:
        try:
            rank = int(os.environ.get("RANK", "0"))
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ConfigError("the RANK/WORLD_SIZE environment variables must be integers") from None
    assert world_size is not None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"{flag('rank')} ({rank}) must be in [0, {flag('world_size')} ({world_size}))")
    return rank, world_size


@dataclass
class _Scan:
    records: int = 0
    empty: int = 0
    rank_documents: int = 0
    rank_empty: int = 0
    conversations: int = 0
    fingerprint: str = ""
    prefix_fingerprint: str | None = None
    """Fingerprint of the first ``prefix`` records (None when there are fewer)."""
    rank_bytes: array = field(default_factory=lambda: array("q"))
    """Bytes of each of this rank's non-empty records, in order (for the ETA)."""


def _scan(source: DataSource, rank: int, world_size: int, prefix: int | None = None) -> _Scan:
    """One pass over the records: fingerprints and counts (no tokenisation)."""
    h = hashlib.sha256()
    scan = _Scan()
    for record in source:
        if scan.records == prefix:
            scan.prefix_fingerprint = h.hexdigest()[:16]
        body = record_fingerprint_bytes(record)
        h.update(body)
        scan.records += 1
        mine = record.index % world_size == rank
        if record.messages is not None:
            scan.conversations += 1
        if record.is_empty:
            scan.empty += 1
            scan.rank_empty += mine
        elif mine:
            scan.rank_documents += 1
            scan.rank_bytes.append(len(body) - 9)
    scan.fingerprint = h.hexdigest()[:16]
    if scan.records == prefix:
        scan.prefix_fingerprint = scan.fingerprint
    return scan


def _same_or_more_data(existing: dict[str, Any] | None, scan: _Scan) -> str | None:
    """``"same"`` or ``"more"`` when the store holds (a prefix of) these very records, else None.

    Compared by content: the fingerprint of the records the store was written from
    against the fingerprint of as many records of the data now, so a relative and an
    absolute path to one file, or a ``--limit`` beyond its end, are the same data.
    """
    old = (existing or {}).get("dataset")
    if not isinstance(old, dict) or scan.prefix_fingerprint is None:
        return None
    if scan.prefix_fingerprint != old.get("fingerprint"):
        return None
    return "same" if scan.records == old.get("records") else "more"


def precompute(
    config: PrecomputeConfig,
    *,
    progress: Callable[[PrecomputeProgress], None] | None = None,
) -> PrecomputeResult:
    """Run the teacher over the data and write (or resume) this rank's part of the store.

    Three steps: :func:`_check_inputs` (the store, the data, the teacher, before any weights
    load), :func:`store_attributes` (what the store records about this run), and
    :func:`_score_and_write` (the teacher and the writer).

    Args:
        config: every setting (:class:`xtd.config.PrecomputeConfig`).
        progress: called after each document with a :class:`PrecomputeProgress`.

    Returns:
        A :class:`PrecomputeResult` for this rank.

    Raises:
        DataError: missing or empty data, a missing text field, invalid UTF-8, a
            conversation that cannot be rendered.
        ModelLoadError: a teacher that cannot be loaded.
        ConfigError: invalid settings (e.g. ``top_k`` above the vocabulary size).
        StoreExistsError: the store holds other settings and ``overwrite`` is False.
        KeyboardInterrupt: after committed work is safely closed.
    """
    rank, world_size = resolve_rank(config.rank, config.world_size)
    inputs = _check_inputs(config, rank, world_size)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    attrs = store_attributes(config, inputs, dtype)
    relation = None if config.overwrite else _same_or_more_data(inputs.existing, inputs.scan)
    if relation == "same" and inputs.existing is not None:
        # The very records the store was written from: keep its description of them.
        attrs["dataset"] = inputs.existing["dataset"]
        attrs["settings"]["limit"] = (inputs.existing.get("settings") or {}).get("limit")
    elif relation == "more":
        logger.info(
            "extending store %r: its %d records are the first of the %d now given",
            str(config.out), inputs.existing["dataset"]["records"], inputs.scan.records,  # type: ignore[index]
        )  # fmt: skip
    writer = StoreWriter(
        config.out,
        attrs=attrs,
        top_k=config.top_k,
        hidden_size=inputs.hidden_size,
        topk_codec=config.topk_codec,
        rank=rank,
        world_size=world_size,
        overwrite=config.overwrite,
        extend=relation == "more",
        **({"shard_tokens": config.shard_tokens} if config.shard_tokens is not None else {}),
    )
    result = PrecomputeResult(
        out=str(config.out),
        rank=rank,
        world_size=world_size,
        documents_total=inputs.scan.rank_documents,
        documents_written=0,
        documents_resumed=writer.documents_committed,
        empty_documents=inputs.scan.rank_empty,
        tokens=0,
        seconds=0.0,
        complete=writer.complete,
        teacher=attrs["teacher"],
        settings=attrs["settings"],
    )
    if writer.complete:
        logger.info("store %r (part %d) already holds these documents; nothing to do", str(config.out), rank)
        writer.close(complete=False)
        return result
    if writer.documents_committed:
        logger.info("resuming after %d committed documents of rank %d", writer.documents_committed, rank)
    _score_and_write(config, inputs, writer, result, device=device, progress=progress)
    if result.inexact_loss_spans:
        logger.warning(
            "%d conversations: the chat template changes message contents, so their assistant turns "
            "could not be located exactly; they are trained on in full",
            result.inexact_loss_spans,
        )
    return result


@dataclass
class _Inputs:
    """What :func:`_check_inputs` found: the store, the data, the teacher (no weights yet)."""

    existing: dict[str, Any] | None
    source: DataSource
    teacher: TeacherSource
    scan: _Scan
    max_length: int
    hidden_size: int | None


def _check_inputs(config: PrecomputeConfig, rank: int, world_size: int) -> _Inputs:
    """Look at ``--out``, the data and the teacher before any weights load.

    ``--out`` must hold nothing or an xtd store (anything else is refused whatever the
    flags); the data must have non-empty records (conversations need a chat template or
    ``--chat-template never``); the teacher's config and tokenizer must load and fit
    ``--top-k`` and ``--max-length``.
    """
    existing = existing_store(config.out)  # a foreign or unwritable --out fails here, at once
    source = DataSource(
        config.data, split=config.split, text_field=config.text_field, limit=config.limit, errors=config.errors
    )
    where = source.describe()["source"]
    if next(iter(source), None) is None:
        raise DataError(f"dataset {where!r} is empty (no records{' within --limit' if config.limit else ''})")
    teacher = resolve_teacher(config.teacher, revision=config.revision)
    vocab = teacher.vocab_size
    if config.top_k > vocab:
        raise ConfigError(
            f"{flag('top_k')} ({config.top_k}) is larger than the teacher vocabulary ({vocab} ids); "
            f"use at most {vocab}, or 0 to store no top-k"
        )
    max_length = config.max_length
    limit = teacher.max_positions
    if limit is not None and max_length > limit:
        if config.stride >= limit:
            raise ConfigError(
                f"{flag('max_length')} ({max_length}) exceeds the teacher's context ({limit}) and "
                f"{flag('stride')} ({config.stride}) does not fit in it; pass {flag('max_length')} {limit} "
                f"and a smaller {flag('stride')}"
            )
        logger.warning("--max-length %d exceeds the teacher's context; using %d", max_length, limit)
        max_length = limit
    old_records = ((existing or {}).get("dataset") or {}).get("records")
    scan = _scan(source, rank, world_size, old_records if isinstance(old_records, int) else None)
    if scan.records == scan.empty:
        raise DataError(f"dataset {where!r} has {scan.records} records and all of them are empty")
    if scan.conversations and config.chat_template == "auto" and not getattr(teacher.tokenizer.hf, "chat_template", None):
        raise DataError(
            f"dataset {where!r} holds conversations but teacher {teacher.name!r} has no chat template; "
            f"pass {flag('chat_template')} never to render them as plain 'role: content' lines"
        )
    hidden_size = teacher.hidden_size if config.hidden else None
    return _Inputs(existing, source, teacher, scan, max_length, hidden_size)


_RUN_ONLY = ("out", "overwrite", "resume", "rank", "world_size", "device")
"""Settings of one invocation, not of the store (left out of the saved ``config``)."""


def store_attributes(config: PrecomputeConfig, inputs: _Inputs, dtype: str) -> dict[str, Any]:
    """The store's root ``xtd`` attribute (docs/format.md): the teacher, its tokenizer, the
    boundary classes and their rules, the dataset, the settings that decide the arrays, and
    the config ``xtd precompute --resume`` reads back."""
    return {
        "teacher": inputs.teacher.describe(dtype),
        "tokenizer_json": inputs.teacher.tokenizer.to_json(),
        "tokenizer_digest": inputs.teacher.tokenizer.digest,
        "boundary_classes": list(BOUNDARY_CLASSES),
        "boundary_class_rules": {c: BOUNDARY_CLASS_RULES[c] for c in BOUNDARY_CLASSES},
        "dataset": {
            **inputs.source.describe(),
            "fingerprint": inputs.scan.fingerprint,
            "records": inputs.scan.records,
            "empty_records": inputs.scan.empty,
            "conversations": inputs.scan.conversations,
            "chat_template": config.chat_template if inputs.scan.conversations else None,
        },
        "settings": {
            "scoring_version": SCORING_VERSION,
            "top_k": config.top_k,
            "topk_codec": config.topk_codec,
            "max_length": inputs.max_length,
            "stride": config.stride,
            "hidden": config.hidden,
            "dtype": dtype,
            "chat_template": config.chat_template,
            "add_special_tokens": True,
            "limit": config.limit,
            "errors": config.errors,
            "empty_documents": "skipped",
        },
        "windowing": (
            f"windows of at most {inputs.max_length} tokens; each later window starts {config.stride} tokens "
            "before the previous one ended and scores only its new rows"
        ),
        "token_slot": "not written (v1): special tokens are rows with empty byte spans",
        "config": {k: v for k, v in config.to_dict().items() if k not in _RUN_ONLY},
    }


def saved_settings(url: str) -> dict[str, Any]:
    """The precompute settings a store was written with (``xtd precompute --resume``).

    Raises:
        ConfigError: nothing at ``url``, or a store written before xtd saved its settings.
    """
    existing = existing_store(url)
    if existing is None:
        raise ConfigError(f"--resume: there is no store at {url!r} to resume; run xtd precompute with its settings")
    saved = existing.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(
            f"--resume: store {url!r} does not record its precompute settings (written by an older xtd); "
            "rerun the command that wrote it"
        )
    return {**saved, "out": url}


def _score_and_write(
    config: PrecomputeConfig,
    inputs: _Inputs,
    writer: StoreWriter,
    result: PrecomputeResult,
    *,
    device: torch.device,
    progress: Callable[[PrecomputeProgress], None] | None,
) -> None:
    """Load the teacher, score this rank's remaining documents, write them in the background."""
    committed = writer.documents_committed
    try:
        teacher = load_teacher(inputs.teacher, dtype=config.dtype, device=device)
        if inputs.hidden_size is not None and teacher.hidden_size != inputs.hidden_size:
            raise ConfigError(
                f"teacher {inputs.teacher.name!r}: config hidden_size {inputs.hidden_size} differs from its output "
                f"layer's input width {teacher.hidden_size}; cannot store hidden states"
            )
    except BaseException:
        writer.close(complete=False)
        raise
    documents_in = _teacher_inputs(
        inputs.source, inputs.teacher.tokenizer.hf, config.chat_template, result.rank, result.world_size, result,
        with_loss_spans=inputs.scan.conversations > 0,
    )  # fmt: skip
    background = _BackgroundWriter(writer)
    started = time.perf_counter()
    todo_bytes = sum(inputs.scan.rank_bytes[committed:])

    def report(stats: ScoreStats) -> None:
        if progress is None:
            return
        elapsed = time.perf_counter() - started
        eta = None
        if stats.planned_bytes and stats.forward_tokens and elapsed > 0:
            # Forward tokens still to run: the bytes left at the tokens per byte seen so far.
            left = todo_bytes * stats.planned_tokens / stats.planned_bytes - stats.forward_tokens
            eta = max(0.0, left) / (stats.forward_tokens / elapsed)
        progress(
            PrecomputeProgress(
                committed + result.documents_written, inputs.scan.rank_documents, result.tokens, elapsed,
                stats.forward_tokens, eta,
            )
        )

    stats = ScoreStats()
    report(stats)  # the first pool takes a while: show the total at once
    try:
        documents = score_documents(
            teacher,
            documents_in,
            top_k=config.top_k,
            max_length=inputs.max_length,
            stride=config.stride,
            batch_tokens=config.batch_tokens,
            hidden=config.hidden,
            skip=committed,
            stats=stats,
            on_batch=report,
        )
        for doc in documents:
            background.put(doc)
            result.documents_written += 1
            result.tokens += doc.num_tokens
            report(stats)
        background.finish()
    except BaseException:
        # Ctrl-C or an error: documents already queued are complete, so write them;
        # the writer commits whole shards and drops only its uncommitted buffer.
        background.finish(raise_errors=False)
        writer.close(complete=False)
        result.seconds = time.perf_counter() - started
        raise
    writer.close(complete=True)
    result.seconds = time.perf_counter() - started
    result.complete = True


def _teacher_inputs(
    source: DataSource,
    hf_tokenizer: PreTrainedTokenizerBase,
    chat_template: str,
    rank: int,
    world_size: int,
    result: PrecomputeResult,
    *,
    with_loss_spans: bool,
) -> Iterator[TeacherInput]:
    """This rank's non-empty records as TeacherInputs, conversations rendered.

    The store needs the same optional arrays in every document of a part, so when the
    data holds any conversation (``with_loss_spans``), a plain text gets one loss span
    over its whole text.
    """
    for record in source:
        if record.index % world_size != rank or record.is_empty:
            continue
        item = _render(record, hf_tokenizer, chat_template, result)
        if with_loss_spans and item.loss_spans is None:
            item = TeacherInput(item.doc_index, item.text, item.chat, [(0, len(item.text.encode("utf-8")))])
        yield item


def _render(record: Record, hf_tokenizer: PreTrainedTokenizerBase, chat_template: str, result: PrecomputeResult) -> TeacherInput:
    if record.messages is None:
        text = record.text or ""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(
                f"record {record.index} holds a lone surrogate at character {exc.start}, which is not "
                "valid UTF-8; fix the data"
            ) from None
        return TeacherInput(record.index, text)
    try:
        rendered = render_conversation(list(record.messages), hf_tokenizer, mode=chat_template)  # type: ignore[arg-type]
    except DataError:
        raise
    except Exception as exc:  # jinja2 TemplateError and friends from the template itself
        raise DataError(f"record {record.index}: the chat template cannot render it: {exc}") from None
    spans = rendered.loss_spans
    if spans is None:
        result.inexact_loss_spans += 1
        spans = [(0, len(rendered.text.encode("utf-8")))]
    return TeacherInput(record.index, rendered.text, chat=chat_template == "auto", loss_spans=spans)


class _BackgroundWriter:
    """Writes documents in a thread; the bounded queue keeps memory flat."""

    def __init__(self, writer: StoreWriter) -> None:
        self._writer = writer
        self._queue: queue.Queue[Document | None] = queue.Queue(maxsize=_QUEUE_DOCUMENTS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="xtd-store-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            doc = self._queue.get()
            if doc is None:
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            try:
                self._writer.write(doc)
            except BaseException as exc:  # reported to the main thread
                self._error = exc

    def put(self, doc: Document) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(doc, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self, *, raise_errors: bool = True) -> None:
        """Write everything queued, stop the thread, re-raise a write error."""
        while True:
            try:
                self._queue.put(None, timeout=0.2)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    break
        self._thread.join()
        if raise_errors and self._error is not None:
            raise self._error


def result_dict(result: PrecomputeResult) -> dict[str, Any]:
    """The result as plain JSON-able values (for ``--json`` and logs)."""
    out = asdict(result)
    out["tokens_per_s"] = result.tokens_per_s
    return out
