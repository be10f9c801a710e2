"""Run a teacher over documents: per teacher token, what stage 2 needs (docs/method.md, "What the store holds").

Dimension letters: ``B`` sequences in a batch, ``T`` positions, ``N`` token rows of one
document, ``n`` positions scored in a batch, ``V`` tokenizer vocabulary (the softmax
width), ``K`` top-k, ``H`` hidden size, ``C`` boundary classes.

Per token row ``r`` of a document (docs/format.md; arrays of :class:`xtd.storage.Document`):

* ``token_logprob[r] = log_softmax(z[r-1])[t_r]`` in fp32, clamped ≤ 0 — the realised
  log-prob sits on the row of the token it scores; row 0 has no context and is NaN;
* ``boundary_logmass[r, c] = log Σ_{v in class c} softmax(z[r])[v]`` — the mass of the
  token *after* row ``r`` by boundary class (space, newline, tab, special; the classes of
  :mod:`xtd.tokenization`), summed over the **full** softmax in fp32, clamped ≤ 0,
  ``-inf`` for zero mass, stored fp16 (docs/method.md, "Scoring a chunk", "What the store holds");
* ``topk_ids/topk_logprobs[r]``: the ``K`` most likely next tokens after row ``r`` and
  ``tail_logmass[r] = log(1 − Σ top-k probs)`` (a difference of sums: accurate to about
  1e-6 in probability mass, so a tiny tail is only approximate in log space);
* ``hidden[r]``: the last hidden state after the final norm (docs/method.md, "Hidden-state loss"), fp16.

Logits of vocabulary rows beyond the tokenizer's ids (padded embedding matrices) are
dropped before every softmax.

**Long documents (windows).** A document longer than ``max_length`` tokens is scored in
windows (:func:`xtd.packing.plan_windows`, with ``stride`` tokens of context carried into
each later window): every row is scored exactly once, every row except row 0 has at least
``stride`` tokens of context (or all of them, inside window 0), and nothing is truncated.

**Throughput.** Documents are taken in *pools* of consecutive documents (≈ 64 ×
``batch_tokens`` bytes of text, a pure function of the input, so a resumed run re-forms
the same pools and reproduces the same batches bit for bit). Within a pool the windows
are packed longest first into batches of at most ``batch_tokens`` padded positions
(:func:`xtd.packing.pack_longest_first`); the final norm output of the positions that are
needed is gathered (padding is never sent through the output layer), and the output
layer + log-softmax run in slices of at most ``logits_budget_bytes`` of fp32 logits.
Batches are right-padded and run without an attention mask: under causal attention a
pad position only follows real ones, so real positions compute as if unpadded. The
full-vocabulary statistics come from one exp per logit, ``e = exp(z − max z)`` written
over the logits, and one ``(n, V) @ (V, 1 + C)`` product (in blocks of 1024 ids, for
fp32 accuracy) gives the normaliser and every class mass at once.
Documents are yielded in input order as soon as they and all before them are done.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xtd.errors import ByteIdentityError, ConfigError
from xtd.packing import pack_longest_first, plan_windows
from xtd.storage import Document
from xtd.teacher import Teacher
from xtd.tokenization import Encoding

logger = logging.getLogger(__name__)

__all__ = [
    "TeacherInput",
    "ScoreStats",
    "score_texts",
    "score_documents",
    "pool_bytes_for",
    "DEFAULT_LOGITS_BUDGET_BYTES",
]

DEFAULT_LOGITS_BUDGET_BYTES = 256 * 2**20
"""At most this many bytes of fp32 logits exist at once (their exponentials overwrite them)."""


@dataclass(frozen=True)
class TeacherInput:
    """One document to score.

    Attributes:
        doc_index: position in the source dataset (copied to the Document).
        text: the text the teacher reads.
        chat: True for text rendered with a chat template: occurrences of special-token
            strings become those special tokens (as ``apply_chat_template`` tokenises), and
            their literal strings are not part of the stored text (each is an empty-span
            row at its position, docs/method.md, "Byte view of a tokenizer"). False: plain text, tokenised with the
            tokenizer's own special tokens added (e.g. a BOS), and special-token strings
            inside it are ordinary text.
        loss_spans: (M, 2) byte ranges ``[start, end)`` of ``text`` to train on, or None.
    """

    doc_index: int
    text: str
    chat: bool = False
    loss_spans: Sequence[tuple[int, int]] | None = None


@dataclass
class ScoreStats:
    """Counters filled in while scoring (for reports and benchmarks)."""

    documents: int = 0
    tokens: int = 0
    forward_tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    forward_seconds: float = 0.0
    planned_tokens: int = 0
    """Forward tokens of every window of the pools started so far (for progress estimates)."""
    planned_bytes: int = 0
    """Text bytes of the pools started so far."""


def pool_bytes_for(batch_tokens: int) -> int:
    """Bytes of text per pool (module docstring): about 16 full batches at 4 bytes/token."""
    return 64 * batch_tokens


def score_texts(
    teacher: Teacher,
    texts: Iterable[str],
    *,
    top_k: int = 32,
    max_length: int = 2048,
    stride: int = 512,
    batch_tokens: int = 8192,
    hidden: bool = False,
) -> Iterator[Any]:
    """Score plain texts; yields one :class:`xtd.storage.Document` per text, in order.

    ``doc_index`` is the position in ``texts``; an empty text gives a 0-row document.
    See :func:`score_documents` for the arguments.
    """
    inputs = (TeacherInput(i, t) for i, t in enumerate(texts))
    yield from score_documents(
        teacher, inputs, top_k=top_k, max_length=max_length, stride=stride, batch_tokens=batch_tokens, hidden=hidden
    )


def score_documents(
    teacher: Teacher,
    inputs: Iterable[TeacherInput],
    *,
    top_k: int = 32,
    max_length: int = 2048,
    stride: int = 512,
    batch_tokens: int = 8192,
    hidden: bool = False,
    skip: int = 0,
    stats: ScoreStats | None = None,
    logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES,
    pool_bytes: int | None = None,
    on_batch: Callable[[ScoreStats], None] | None = None,
) -> Iterator[Any]:
    """Run the teacher over documents; yields :class:`xtd.storage.Document` in input order.

    Args:
        teacher: from :func:`load_teacher`.
        inputs: the documents, in the order they are to be written.
        top_k: number of top next-token log-probs per row (0: none).
        max_length: window length in tokens; stride: context tokens carried into each
            later window (module docstring).
        batch_tokens: padded positions per forward batch.
        hidden: also return the final hidden state per row.
        skip: do not yield the first ``skip`` documents. The pools are formed as if
            nothing were skipped and only pools that contain a yielded document run, so
            a resumed run computes the same batches as an uninterrupted one.
        stats: counters to update, or None.
        logits_budget_bytes: bound on the fp32 logits held at once.
        pool_bytes: text bytes per pool (default :func:`pool_bytes_for` ``(batch_tokens)``);
            a resumed run must use the same value as the first.
        on_batch: called with ``stats`` after every forward batch (progress: a pool of
            long documents may run for minutes before its first document is done).

    Raises:
        ConfigError: ``top_k`` larger than the vocabulary, bad window settings.
        ByteIdentityError: a document that the tokenizer cannot reproduce (names it).
    """
    if top_k < 0 or top_k > teacher.vocab_size:
        raise ConfigError(f"--top-k ({top_k}) must be between 0 and the teacher vocabulary size ({teacher.vocab_size})")
    if batch_tokens < 1:
        raise ConfigError(f"--batch-tokens must be >= 1, got {batch_tokens}")
    plan_windows(0, max_length, stride)  # validates
    opts = _Options(top_k, max_length, stride, batch_tokens, hidden, logits_budget_bytes, on_batch)
    stats = stats if stats is not None else ScoreStats()
    position = 0
    for pool in _pools(inputs, pool_bytes or pool_bytes_for(batch_tokens)):
        first, position = position, position + len(pool)
        if position <= skip:
            continue
        for j, doc in enumerate(_score_pool(teacher, pool, opts, stats)):
            if first + j >= skip:
                yield doc


@dataclass(frozen=True)
class _Options:
    top_k: int
    max_length: int
    stride: int
    batch_tokens: int
    hidden: bool
    logits_budget_bytes: int
    on_batch: Callable[[ScoreStats], None] | None = None


@dataclass
class _Window:
    doc: int  # position in the pool
    start: int
    end: int
    new_from: int


def _pools(inputs: Iterable[TeacherInput], pool_bytes: int) -> Iterator[list[TeacherInput]]:
    pool: list[TeacherInput] = []
    size = 0
    for item in inputs:
        pool.append(item)
        size += len(item.text.encode("utf-8", errors="surrogatepass"))
        if size >= pool_bytes:
            yield pool
            pool, size = [], 0
    if pool:
        yield pool


def _encode_pool(teacher: Teacher, pool: list[TeacherInput]) -> list[tuple[bytes, Any, np.ndarray | None]]:
    """(stored text bytes, Encoding, loss spans in stored bytes) per document."""

    tok = teacher.tokenizer
    out: list[tuple[bytes, Any, np.ndarray | None] | None] = [None] * len(pool)
    plain = [i for i, item in enumerate(pool) if not item.chat]
    if plain:
        try:
            encs = tok.encode_batch([pool[i].text for i in plain], add_special_tokens=True)
        except ByteIdentityError:
            for i in plain:  # find the document to name it
                _encode_one_plain(tok, pool[i])
            raise
        for i, enc in zip(plain, encs, strict=True):
            raw = pool[i].text.encode("utf-8")
            out[i] = (raw, enc, _spans_array(pool[i].loss_spans))
    for i, item in enumerate(pool):
        if item.chat:
            out[i] = _encode_chat(teacher, item)
    return [o for o in out if o is not None]


def _encode_one_plain(tok: Any, item: TeacherInput) -> None:

    try:
        tok.encode(item.text, add_special_tokens=True)
    except ByteIdentityError as exc:
        raise ByteIdentityError(f"document {item.doc_index}: {exc}") from None


def _spans_array(spans: Sequence[tuple[int, int]] | None) -> np.ndarray | None:
    if spans is None:
        return None
    return np.asarray(list(spans), dtype=np.int64).reshape(-1, 2)


def _special_pattern(tok: Any) -> re.Pattern[str] | None:
    cached = getattr(tok, "_xtd_special_pattern", None)
    if cached is not None:
        return cached if cached != "" else None
    strings = [s for s in (tok.hf.convert_ids_to_tokens(int(i)) for i in tok.special_ids) if s]
    pattern = re.compile("|".join(re.escape(s) for s in sorted(set(strings), key=len, reverse=True))) if strings else None
    tok._xtd_special_pattern = pattern if pattern is not None else ""
    return pattern


def _encode_chat(teacher: Teacher, item: TeacherInput) -> tuple[bytes, Any, np.ndarray | None]:
    """Tokenise rendered chat text: special strings → special ids with empty spans."""

    tok = teacher.tokenizer
    pattern = _special_pattern(tok)
    text = item.text
    pieces: list[tuple[str, int | None]] = []  # (text, None) or (special string, id)
    pos = 0
    if pattern is not None:
        for m in pattern.finditer(text):
            if m.start() > pos:
                pieces.append((text[pos : m.start()], None))
            pieces.append((m.group(0), int(tok.hf.convert_tokens_to_ids(m.group(0)))))
            pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], None))
    segments = [p for p, sid in pieces if sid is None]
    try:
        encs = iter(tok.encode_batch(segments, add_special_tokens=False)) if segments else iter(())
    except ByteIdentityError as exc:
        raise ByteIdentityError(f"document {item.doc_index}: {exc}") from None
    ids: list[np.ndarray] = []
    spans: list[np.ndarray] = []
    stored: list[bytes] = []
    keep: list[np.ndarray] = []  # per rendered byte: kept in the stored text?
    offset = 0
    for piece, sid in pieces:
        raw = piece.encode("utf-8")
        if sid is None:
            enc = next(encs)
            ids.append(enc.ids)
            spans.append(enc.spans + offset)
            stored.append(raw)
            offset += len(raw)
            keep.append(np.ones(len(raw), dtype=bool))
        else:
            ids.append(np.asarray([sid], dtype=np.int32))
            spans.append(np.asarray([[offset, offset]], dtype=np.int32))
            keep.append(np.zeros(len(raw), dtype=bool))
    token_ids = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    token_spans = np.concatenate(spans).astype(np.int32) if spans else np.zeros((0, 2), np.int32)
    loss = _spans_array(item.loss_spans)
    if loss is not None:
        kept = np.concatenate(keep) if keep else np.zeros(0, bool)
        before = np.concatenate([[0], np.cumsum(kept)])  # stored offset of each rendered offset
        loss = before[loss]
        loss = loss[loss[:, 1] > loss[:, 0]]
    return b"".join(stored), Encoding(ids=token_ids, spans=token_spans), loss


def _score_pool(teacher: Teacher, pool: list[TeacherInput], opts: _Options, stats: ScoreStats) -> Iterator[Any]:

    encoded = _encode_pool(teacher, pool)
    windows: list[_Window] = []
    outputs: list[dict[str, np.ndarray]] = []
    pending = np.zeros(len(pool), dtype=np.int64)  # windows still to run per document
    k, h = opts.top_k, teacher.hidden_size
    for d, (_, enc, _) in enumerate(encoded):
        n = len(enc.ids)
        outputs.append(
            {
                "token_logprob": np.full(n, np.nan, dtype=np.float32),
                "boundary_logmass": np.zeros((n, teacher.class_matrix.shape[1] - 1), dtype=np.float16),
                "topk_ids": np.zeros((n, k), dtype=np.int32),
                "topk_logprobs": np.zeros((n, k), dtype=np.float32),
                "tail_logmass": np.zeros(n, dtype=np.float32),
                "hidden": np.zeros((n, h) if opts.hidden else (0, h), dtype=np.float16),
            }
        )
        if n:
            for start, end, new_from in plan_windows(n, opts.max_length, opts.stride):
                windows.append(_Window(d, start, end, new_from))
                pending[d] += 1
    stats.planned_tokens += sum(w.end - w.start for w in windows)
    stats.planned_bytes += sum(len(text) for text, _, _ in encoded)
    next_doc = 0

    def finished() -> Iterator[Any]:
        nonlocal next_doc
        while next_doc < len(pool) and pending[next_doc] == 0:
            text, enc, loss = encoded[next_doc]
            out = outputs[next_doc]
            outputs[next_doc] = {}
            stats.documents += 1
            stats.tokens += len(enc.ids)
            yield Document(
                text=text,
                token_ids=enc.ids.astype(np.int32),
                token_spans=enc.spans.astype(np.int32),
                token_logprob=out["token_logprob"],
                boundary_logmass=out["boundary_logmass"],
                topk_ids=out["topk_ids"] if k else None,
                topk_logprobs=out["topk_logprobs"] if k else None,
                tail_logmass=out["tail_logmass"] if k else None,
                hidden=out["hidden"] if opts.hidden else None,
                token_slot=None,
                loss_spans=loss,
                doc_index=pool[next_doc].doc_index,
            )
            next_doc += 1

    yield from finished()
    for batch in pack_longest_first([w.end - w.start for w in windows], max_tokens=opts.batch_tokens):
        group = [windows[i] for i in batch]
        _run_batch(teacher, group, [encoded[w.doc][1].ids for w in group], outputs, opts, stats)
        if opts.on_batch is not None:
            opts.on_batch(stats)
        for w in group:
            pending[w.doc] -= 1
        yield from finished()


@torch.inference_mode()
def _run_batch(
    teacher: Teacher,
    group: list[_Window],
    doc_ids: list[np.ndarray],
    outputs: list[dict[str, np.ndarray]],
    opts: _Options,
    stats: ScoreStats,
) -> None:
    """Forward one batch of windows and fill the new rows of their documents."""
    started = time.perf_counter()
    lengths = [w.end - w.start for w in group]
    width = max(lengths)
    ids = np.zeros((len(group), width), dtype=np.int64)
    # Positions whose next-token distribution is needed: from the row before the first
    # new row (it scores that row's realised token) to the end of the window.
    lo = [max(w.new_from - w.start - 1, 0) for w in group]
    rows_b: list[np.ndarray] = []
    rows_t: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for b, (w, toks) in enumerate(zip(group, doc_ids, strict=True)):
        window_ids = toks[w.start : w.end]
        ids[b, : len(window_ids)] = window_ids
        positions = np.arange(lo[b], len(window_ids))
        rows_b.append(np.full(len(positions), b))
        rows_t.append(positions)
        nxt = np.zeros(len(positions), dtype=np.int64)  # the token after each position
        nxt[:-1] = window_ids[positions[:-1] + 1]
        targets.append(nxt)
    dev = teacher.device
    ids_t = torch.from_numpy(ids).to(dev, non_blocking=True)
    # Right padding under causal attention: every pad position comes after all real
    # ones, so real positions compute exactly as unpadded without any attention mask
    # (and the fused causal kernel runs); pad outputs are never read.
    mask_t = None
    b_idx = torch.from_numpy(np.concatenate(rows_b)).to(dev)
    t_idx = torch.from_numpy(np.concatenate(rows_t)).to(dev)
    target = torch.from_numpy(np.concatenate(targets)).to(dev)
    with teacher.autocast():
        if teacher.split_head:
            hid = teacher.base_model()(input_ids=ids_t, attention_mask=mask_t, use_cache=False).last_hidden_state
            logits_all = None
        else:
            out = teacher.model(input_ids=ids_t, attention_mask=mask_t, use_cache=False, output_hidden_states=opts.hidden)
            hid = out.hidden_states[-1] if opts.hidden else None
            logits_all = out.logits
        gathered_h = hid[b_idx, t_idx] if hid is not None else None  # (n, H)
    # Outside autocast: softmax statistics are fp32 (docs/method.md, "What the store holds"), only the output
    # layer runs in the forward precision.
    stats_out = _position_stats(teacher, gathered_h, logits_all, b_idx, t_idx, target, opts)
    lp_next, bmass, topk_ids, topk_lp, tail = (x.cpu().numpy() if x is not None else None for x in stats_out)
    hidden_np = gathered_h.to(torch.float16).cpu().numpy() if (opts.hidden and gathered_h is not None) else None
    offset = 0
    for b, w in enumerate(group):
        out = outputs[w.doc]
        count = lengths[b] - lo[b]
        rel = slice(offset + (w.new_from - w.start - lo[b]), offset + count)  # new rows' positions
        rows = slice(w.new_from, w.end)
        out["boundary_logmass"][rows] = bmass[rel].astype(np.float16)
        if opts.top_k:
            out["topk_ids"][rows] = topk_ids[rel]
            out["topk_logprobs"][rows] = topk_lp[rel]
            out["tail_logmass"][rows] = tail[rel]
        if opts.hidden:
            out["hidden"][rows] = hidden_np[rel]
        # ℓ of row r comes from position r − 1: rows new_from.. (row 0 stays NaN).
        first_scored = max(w.new_from, 1)
        if first_scored < w.end:
            a = offset + (first_scored - 1 - w.start - lo[b])
            out["token_logprob"][first_scored : w.end] = lp_next[a : a + (w.end - first_scored)]
        offset += count
    if teacher.device.type == "cuda":
        torch.cuda.synchronize(teacher.device)
    stats.batches += 1
    stats.forward_tokens += int(sum(lengths))
    stats.padded_tokens += width * len(group)
    stats.forward_seconds += time.perf_counter() - started


_SUM_BLOCK = 1024


def _class_sums(e: torch.Tensor, class_matrix: torch.Tensor) -> torch.Tensor:
    """``e @ class_matrix`` with fp32 accuracy: (m, V) @ (V, 1 + C) → (m, 1 + C).

    One GEMM accumulates up to V = 10⁵ positive terms per output and loses ~1e-4
    relative accuracy on CPU; summing blocks of 1024 with a batched GEMM, then the
    block sums, keeps the error near 1e-6 at the same cost (one read of ``e``).
    """
    m, vocab = e.shape
    blocks = vocab // _SUM_BLOCK
    main = blocks * _SUM_BLOCK
    out = torch.zeros(m, class_matrix.shape[1], dtype=torch.float32, device=e.device)
    if blocks:
        lhs = e[:, :main].reshape(m, blocks, _SUM_BLOCK).transpose(0, 1)  # (blocks, m, 1024)
        rhs = class_matrix[:main].reshape(blocks, _SUM_BLOCK, -1)  # (blocks, 1024, 1 + C)
        out += torch.matmul(lhs, rhs).sum(dim=0)
    if main < vocab:
        out += e[:, main:] @ class_matrix[main:]
    return out


def _position_stats(
    teacher: Teacher,
    h: torch.Tensor | None,
    logits_all: torch.Tensor | None,
    b_idx: torch.Tensor,
    t_idx: torch.Tensor,
    target: torch.Tensor,
    opts: _Options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per gathered position: realised next-token log-prob, class log-masses, top-k, tail.

    Returns (n,) f32, (n, C) f32, (n, K) int32, (n, K) f32, (n,) f32 (top-k ones None
    when K = 0). Runs in slices so that at most ``logits_budget_bytes`` of logits exist.
    """
    n = int(b_idx.shape[0])
    vocab = teacher.vocab_size
    rows_per_slice = max(1, opts.logits_budget_bytes // (4 * vocab))
    lp_parts, mass_parts, ids_parts, lpk_parts, tail_parts = [], [], [], [], []
    for a in range(0, n, rows_per_slice):
        b = min(n, a + rows_per_slice)
        if logits_all is not None:
            z = logits_all[b_idx[a:b], t_idx[a:b], :vocab].float()  # (m, V), a fresh copy
        else:
            with teacher.autocast():
                z = teacher.head_logits(h[a:b])
            z = z.float()  # (m, V), fresh: ours to overwrite
        zmax = z.amax(dim=-1, keepdim=True)  # (m, 1)
        z_target = z.gather(1, target[a:b, None])  # (m, 1) logit of the realised next token
        if opts.top_k:
            vals, idx = torch.topk(z, opts.top_k, dim=-1)  # (m, K)
        e = z.sub_(zmax).exp_()  # (m, V) in place: one exp per logit, no second buffer
        sums = _class_sums(e, teacher.class_matrix)  # (m, 1 + C): normaliser, then each class mass
        log_total = torch.log(sums[:, :1])
        lse = zmax + log_total  # (m, 1)
        mass_parts.append((torch.log(sums[:, 1:]) - log_total).clamp(max=0.0))
        lp_parts.append((z_target - lse).squeeze(1).clamp(max=0.0))
        if opts.top_k:
            ids_parts.append(idx.to(torch.int32))
            lpk_parts.append((vals - lse).clamp(max=0.0))
            top_mass = e.gather(1, idx).sum(dim=-1, keepdim=True)
            rest = (sums[:, :1] - top_mass).clamp(min=0.0)
            tail_parts.append((torch.log(rest) - log_total).clamp(max=0.0).squeeze(1))
        del z, e
    if n == 0:
        c = teacher.class_matrix.shape[1] - 1
        empty = torch.zeros(0)
        return empty, torch.zeros(0, c), None, None, None
    lp = torch.cat(lp_parts)
    mass = torch.cat(mass_parts)
    if not opts.top_k:
        return lp, mass, None, None, None
    return lp, mass, torch.cat(ids_parts), torch.cat(lpk_parts), torch.cat(tail_parts)

