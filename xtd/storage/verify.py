"""``verify_store``: prove a store is sound, or name exactly what is wrong.

Checks, per committed shard of every part (docs/format.md):

1. the shard's ``zarr.json`` matches the checksum in its part record, and every file
   the shard lists matches its recorded crc32c and size; no unlisted file is present;
2. every array decodes, with the expected dtype, trailing shape and row count;
3. offsets start at 0, never decrease and end at the row count of their arrays;
4. spans tile each document: every token starts where the previous one ended (the
   first at 0), special tokens have empty spans and only they do, and the last token
   ends at the document's last byte (or before it when the store records
   ``text_coverage: "prefix"``, i.e. the teacher truncated);
5. values: log-probs ≤ 0 or NaN (row 0 of a document NaN), boundary log-masses ≤ 0 and
   not NaN, top-k ids inside the vocabulary, text valid UTF-8 (``text_coverage: full``);
6. ``doc_index`` strictly increasing within a part and unique over the store; part
   counts equal the sum of their shards;
7. cached alignment groups (``alignments/<digest>``): checksums, offsets, row counts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from xtd.errors import StoreFormatError
from xtd.storage.codecs import decode_topk, topk_stored_dtype, unpack_topk
from xtd.storage.format import (
    ALIGNMENT_ATTR,
    PART_ATTR,
    SHARD_ATTR,
    StoreUrl,
    checksum,
    describe_url,
    group_key,
    list_dir,
    list_prefix,
    open_array,
    open_zarr_store,
    read_bytes,
    read_group_attrs,
    read_root_meta,
    special_token_ids,
    tokenizer_vocab_size,
)
from xtd.storage.integrity import check_key, check_part_record

__all__ = ["VerifyReport", "verify_store", "verify_store_report"]

logger = logging.getLogger(__name__)

_LOGPROB_TOLERANCE = 1e-3  # fp16 rounding of a log-sum-exp just below 0


@dataclasses.dataclass
class VerifyReport:
    """Outcome of :func:`verify_store_report`."""

    problems: list[str]
    documents: int = 0
    tokens: int = 0
    files_checked: int = 0
    complete: bool = False

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def verify_store(url: StoreUrl) -> list[str]:
    """Every problem found in the store at ``url``; ``[]`` when it is sound.

    Raises:
        StoreNotFoundError, StoreFormatError: ``url`` is no xtd store (or another version).
    """
    return verify_store_report(url).problems


def verify_store_report(url: StoreUrl) -> VerifyReport:
    """Like :func:`verify_store`, with counts of documents, tokens and files checked."""
    store = open_zarr_store(url, writable=False)
    meta = read_root_meta(store, url)
    report = VerifyReport(problems=[])
    ctx = _Context(store, meta, report, where=describe_url(url))
    manifest = meta.get("manifest", {})
    parts = manifest.get("parts", []) if isinstance(manifest, dict) else None
    if not isinstance(parts, list) or not parts:
        report.problems.append("the root manifest lists no parts")
        parts = []
    all_doc_index: list[np.ndarray] = []
    complete = bool(parts)
    for part in parts:
        if not ctx.safe_key(part, "part name"):
            complete = False
            continue
        try:
            record = (read_group_attrs(store, part) or {}).get(PART_ATTR)
        except StoreFormatError as exc:
            report.problems.append(f"{part}/zarr.json: {exc}")
            complete = False
            continue
        if record is None:
            complete = False
            logger.info("part %s has not been written yet", part)
            continue
        try:
            check_part_record(record, part, where=ctx.where)
        except StoreFormatError as exc:
            report.problems.append(str(exc))
            complete = False
            continue
        complete &= bool(record.get("complete"))
        doc_index = ctx.check_part(part, record)
        all_doc_index.append(doc_index)
    merged = np.concatenate(all_doc_index) if all_doc_index else np.zeros(0, np.int64)
    uniq, counts = np.unique(merged, return_counts=True)
    if np.any(counts > 1):
        report.problems.append(
            f"doc_index: {int(np.sum(counts > 1))} values appear in more than one document "
            f"(first: {int(uniq[counts > 1][0])})"
        )
    report.complete = complete
    ctx.check_alignments(len(merged))
    store.close()
    return report


class _Context:
    """State shared by the checks of one store."""

    def __init__(self, store: Any, meta: dict[str, Any], report: VerifyReport, *, where: str) -> None:
        self.store = store
        self.where = where
        self.meta = meta
        self.report = report
        layout = meta.get("layout", {})
        self.top_k = int(layout.get("top_k") or 0)
        self.codec = layout.get("topk_codec", "q8")
        self.hidden = layout.get("hidden_size") or None
        self.num_classes = len(meta.get("boundary_classes", []))
        tok = meta.get("tokenizer_json", "")
        self.specials = special_token_ids(tok) if tok else None
        teacher_vocab = (
            (meta.get("teacher") or {}).get("vocab_size")
            if isinstance(meta.get("teacher"), dict)
            else None
        )
        self.vocab_size = teacher_vocab or (tokenizer_vocab_size(tok) if tok else None)
        self.prefix_ok = meta.get("text_coverage", "full") == "prefix"
        # Per-document teacher token counts in global order (for alignment checks).
        self.doc_index: list[np.ndarray] = []
        self.doc_tokens: list[np.ndarray] = []

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    def safe_key(self, key: Any, what: str) -> bool:
        """Whether ``key`` (from metadata) stays inside the store; a problem if not (never read)."""
        try:
            check_key(key, what=what, where=self.where)
        except StoreFormatError:
            self.problem(f"{what} {key!r} is not a key inside the store (absolute, '..' or a scheme); not read")
            return False
        return True

    # ----------------------------------------------------------------- parts

    def check_part(self, part: str, record: dict[str, Any]) -> np.ndarray:
        shards = record.get("shards", [])
        listed = {s["name"] for s in shards}
        for child in list_dir(self.store, f"{part}/"):
            if child != "zarr.json" and child not in listed:
                logger.info(
                    "%s/%s is not committed (left by an interrupted writer); ignored", part, child
                )
        doc_index_parts = []
        totals = np.zeros(3, dtype=np.int64)
        for entry in shards:
            path = f"{part}/{entry['name']}"  # names checked by check_part_record
            totals += (
                int(entry.get("documents", 0)),
                int(entry.get("tokens", 0)),
                int(entry.get("bytes", 0)),
            )
            result = self.check_shard(path, entry, entry.get("optional_arrays") or [])
            if result is not None:
                doc_index, per_doc_tokens = result
                doc_index_parts.append(doc_index)
                self.doc_index.append(doc_index)
                self.doc_tokens.append(per_doc_tokens)
        doc_index = np.concatenate(doc_index_parts) if doc_index_parts else np.zeros(0, np.int64)
        if len(doc_index) > 1 and np.any(np.diff(doc_index) <= 0):
            self.problem(f"{part}/*/doc_index: not strictly increasing across the part's shards")
        expected = (
            record.get("documents_committed"),
            record.get("tokens_committed"),
            record.get("bytes_committed"),
        )
        if tuple(int(x) for x in totals) != tuple(expected):
            self.problem(
                f"{part}/zarr.json: records {expected[0]} documents, {expected[1]} tokens, "
                f"{expected[2]} bytes but its shard entries sum to {totals[0]}, {totals[1]}, {totals[2]}"
            )
        self.report.documents += int(totals[0])
        self.report.tokens += int(totals[1])
        return doc_index

    def check_files(self, path: str, files: dict[str, dict[str, Any]]) -> bool:
        """Checksums and sizes of every listed file under ``path``; False if any is bad."""
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            self.problem(f"{path}/zarr.json: no valid checksum list (files)")
            return False
        ok = True
        present = {k[len(path) + 1 :] for k in list_prefix(self.store, f"{path}/")}
        present = {
            rel for rel in present if rel and rel != "zarr.json" and not rel.endswith("/")
        }  # zip folders
        for rel in sorted(present - set(files)):
            if not rel.endswith(".partial"):
                self.problem(f"{path}/{rel}: file not listed in the shard's checksums")
                ok = False
        for rel, info in sorted(files.items()):
            if not self.safe_key(rel, f"file key of {path}"):
                ok = False
                continue
            blob = read_bytes(self.store, f"{path}/{rel}")
            self.report.files_checked += 1
            if blob is None:
                self.problem(f"{path}/{rel}: file is missing")
                ok = False
            elif len(blob) != info.get("bytes") or checksum(blob) != info.get("crc32c"):
                self.problem(
                    f"{path}/{rel}: checksum mismatch (crc32c {checksum(blob)}, {len(blob)} bytes; "
                    f"recorded {info.get('crc32c')}, {info.get('bytes')} bytes) — the file is corrupt"
                )
                ok = False
        return ok

    def check_shard(
        self, path: str, entry: dict[str, Any], optional: list[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        meta_bytes = read_bytes(self.store, group_key(path))
        self.report.files_checked += 1
        if meta_bytes is None:
            self.problem(f"{path}/zarr.json: missing (the part record lists this shard)")
            return None
        if checksum(meta_bytes) != entry.get("zarr_json_crc32c"):
            self.problem(
                f"{path}/zarr.json: checksum mismatch with the part record — the file is corrupt"
            )
            return None
        info = (read_group_attrs(self.store, path) or {}).get(SHARD_ATTR, {})
        if not self.check_files(path, info.get("files", {})):
            return None  # decoding corrupt files would only add noise
        try:
            arrays = {rel.split("/")[0] for rel in info.get("files", {})}
            data = {name: open_array(self.store, f"{path}/{name}")[...] for name in sorted(arrays)}
        except Exception as exc:  # noqa: BLE001 - any decode failure is a finding, not a crash
            self.problem(f"{path}: an array does not decode ({type(exc).__name__}: {exc})")
            return None
        return self.check_shard_arrays(path, data, optional, entry)

    def check_shard_arrays(
        self, path: str, data: dict[str, np.ndarray], optional: list[str], entry: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        expected: dict[str, tuple[str, tuple[int, ...]]] = {
            "doc_index": ("int64", ()),
            "doc_token_offsets": ("int64", ()),
            "doc_byte_offsets": ("int64", ()),
            "text": ("uint8", ()),
            "token_ids": ("int32", ()),
            "token_spans": ("int32", (2,)),
            "token_logprob": ("float32", ()),
            "boundary_logmass": ("float16", (self.num_classes,)),
        }
        if self.top_k:
            expected["topk_ids"] = ("int32", (self.top_k,))
            expected["topk_logprobs"] = (str(topk_stored_dtype(self.codec)), (self.top_k,))
            if self.codec == "q8":
                expected["topk_floor"] = ("uint8", ())
            expected["topk_id_table"] = ("int32", ())
            expected["tail_logmass"] = ("float32", ())
        if self.hidden:
            expected["hidden"] = ("float16", (self.hidden,))
        if "token_slot" in optional:
            expected["token_slot"] = ("int8", ())
        if "loss_spans" in optional:
            expected["loss_span_offsets"] = ("int64", ())
            expected["loss_spans"] = ("int64", (2,))
        bad = False
        for name, (dtype, tail) in expected.items():
            arr = data.get(name)
            if arr is None:
                self.problem(f"{path}/{name}: array is missing")
                bad = True
            elif str(arr.dtype) != dtype or arr.shape[1:] != tail:
                self.problem(
                    f"{path}/{name}: dtype {arr.dtype}, shape {arr.shape}; expected {dtype} with rows × {tail}"
                )
                bad = True
        for name in sorted(set(data) - set(expected)):
            self.problem(f"{path}/{name}: unexpected array")
        if bad:
            return None
        doc_index = data["doc_index"]
        n_docs = len(doc_index)
        n_tokens = len(data["token_ids"])
        tok_off = data["doc_token_offsets"]
        byte_off = data["doc_byte_offsets"]
        if not self.check_offsets(f"{path}/doc_token_offsets", tok_off, n_docs, n_tokens):
            return None
        if not self.check_offsets(f"{path}/doc_byte_offsets", byte_off, n_docs, len(data["text"])):
            return None
        for name in expected:
            if name in (
                "doc_index",
                "doc_token_offsets",
                "doc_byte_offsets",
                "text",
                "loss_span_offsets",
                "loss_spans",
                "topk_id_table",
            ):
                continue
            if len(data[name]) != n_tokens:
                self.problem(f"{path}/{name}: {len(data[name])} rows, but token_ids has {n_tokens}")
                return None
        actual = (n_docs, n_tokens, int(byte_off[-1]))
        recorded = (entry.get("documents"), entry.get("tokens"), entry.get("bytes"))
        if actual != recorded:
            self.problem(
                f"{path}: holds {actual} documents, tokens, bytes; the part record says {recorded}"
            )
        if n_docs > 1 and np.any(np.diff(doc_index) <= 0):
            self.problem(f"{path}/doc_index: not strictly increasing")
        self.check_spans(path, data, tok_off, byte_off)
        self.check_values(path, data, tok_off, byte_off)
        if "loss_spans" in expected:
            lo = data["loss_span_offsets"]
            if self.check_offsets(f"{path}/loss_span_offsets", lo, n_docs, len(data["loss_spans"])):
                ls = data["loss_spans"]
                doc_of = np.repeat(np.arange(n_docs), np.diff(lo))
                length = np.diff(byte_off)[doc_of]
                if len(ls) and (
                    np.any(ls[:, 0] < 0) or np.any(ls[:, 1] < ls[:, 0]) or np.any(ls[:, 1] > length)
                ):
                    self.problem(f"{path}/loss_spans: a span falls outside its document")
        return doc_index, np.diff(tok_off)

    def check_offsets(self, where: str, off: np.ndarray, n_docs: int, n_rows: int) -> bool:
        if len(off) != n_docs + 1:
            self.problem(
                f"{where}: {len(off)} entries for {n_docs} documents (expected {n_docs + 1})"
            )
            return False
        if off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != n_rows:
            self.problem(
                f"{where}: offsets must start at 0, never decrease and end at {n_rows} "
                f"(they run {int(off[0])}..{int(off[-1])})"
            )
            return False
        return True

    def check_spans(
        self, path: str, data: dict[str, np.ndarray], tok_off: np.ndarray, byte_off: np.ndarray
    ) -> None:
        """Spans tile each document (see module docstring, item 4), vectorised over the shard."""
        spans = data["token_spans"].astype(np.int64)  # (N, 2)
        n = len(spans)
        if n == 0:
            return
        n_docs = len(tok_off) - 1
        doc_of = np.repeat(np.arange(n_docs), np.diff(tok_off))  # (N,)
        first = np.zeros(n, dtype=bool)
        first[tok_off[:-1][np.diff(tok_off) > 0]] = True
        start, end = spans[:, 0], spans[:, 1]
        prev_end = np.concatenate([[0], end[:-1]])
        prev_end[first] = 0
        length = np.diff(byte_off)[doc_of]
        bad = (start != prev_end) | (end < start) | (end > length)
        if np.any(bad):
            i = int(np.argmax(bad))
            d = int(doc_of[i])
            self.problem(
                f"{path}/token_spans: spans do not tile document {int(data['doc_index'][d])} at token "
                f"{i - int(tok_off[d])}: span {spans[i].tolist()} after end {int(prev_end[i])}, "
                f"document has {int(length[i])} bytes"
            )
            return
        last = tok_off[1:][np.diff(tok_off) > 0] - 1
        docs_with_tokens = np.nonzero(np.diff(tok_off) > 0)[0]
        covered = end[last]
        full = np.diff(byte_off)[docs_with_tokens]
        short = covered < full if not self.prefix_ok else np.zeros_like(covered, dtype=bool)
        no_tokens = (np.diff(tok_off) == 0) & (np.diff(byte_off) > 0)
        if np.any(short) or (not self.prefix_ok and np.any(no_tokens)):
            d = (
                int(docs_with_tokens[np.argmax(short)])
                if np.any(short)
                else int(np.argmax(no_tokens))
            )
            self.problem(
                f"{path}/token_spans: tokens of document {int(data['doc_index'][d])} leave bytes uncovered "
                f"and the store does not record text_coverage='prefix'"
            )
        if self.specials is not None:
            empty = start == end
            special = np.isin(data["token_ids"], self.specials)
            slot = data["token_slot"] != 0 if "token_slot" in data else np.zeros(n, dtype=bool)
            wrong = empty != (special | slot)
            if np.any(wrong):
                i = int(np.argmax(wrong))
                what = (
                    "an empty span but is no special token"
                    if empty[i]
                    else "a special token with a non-empty span"
                )
                self.problem(
                    f"{path}/token_spans: row {i} (id {int(data['token_ids'][i])}) has {what}"
                )

    def check_topk_layout(self, path: str, data: dict[str, np.ndarray]) -> bool:
        """The set layout of docs/format.md: a valid id table, ascending ranks, no wrap-around."""
        table = data["topk_id_table"]
        if len(table) and (table.min() < 0 or len(np.unique(table)) != len(table)):
            self.problem(f"{path}/topk_id_table: ids must be distinct and ≥ 0")
            return False
        stored = data["topk_ids"]
        if stored.size and stored.min() < 0:
            self.problem(
                f"{path}/topk_ids: negative rank differences (each row's ranks must ascend)"
            )
            return False
        if "topk_floor" in data and np.any(data["topk_logprobs"] > data["topk_floor"][:, None]):
            self.problem(f"{path}/topk_logprobs: values above their row's topk_floor")
            return False
        return True

    def check_values(
        self, path: str, data: dict[str, np.ndarray], tok_off: np.ndarray, byte_off: np.ndarray
    ) -> None:
        lp = data["token_logprob"]
        if np.any(lp > _LOGPROB_TOLERANCE):
            self.problem(
                f"{path}/token_logprob: {int(np.sum(lp > _LOGPROB_TOLERANCE))} values are > 0"
            )
        starts = tok_off[:-1][np.diff(tok_off) > 0]
        if np.any(~np.isnan(lp[starts])):
            self.problem(
                f"{path}/token_logprob: row 0 of a document is not NaN (it is never scored)"
            )
        bl = data["boundary_logmass"].astype(np.float32)
        if np.any(np.isnan(bl)) or np.any(bl > _LOGPROB_TOLERANCE):
            self.problem(f"{path}/boundary_logmass: values must be ≤ 0 and not NaN")
        if self.top_k and self.check_topk_layout(path, data):
            ids, values = unpack_topk(data, self.codec)
            if len(ids) and (ids.min() < 0 or (self.vocab_size and ids.max() >= self.vocab_size)):
                self.problem(f"{path}/topk_ids: ids outside the vocabulary [0, {self.vocab_size})")
            tk = decode_topk(values, self.codec)
            if np.any(np.isnan(tk)) or np.any(tk > _LOGPROB_TOLERANCE):
                self.problem(f"{path}/topk_logprobs: values must be ≤ 0 and not NaN")
            tail = data["tail_logmass"]
            if np.any(np.isnan(tail)) or np.any(tail > _LOGPROB_TOLERANCE):
                self.problem(f"{path}/tail_logmass: values must be ≤ 0 and not NaN")
        ids = data["token_ids"]
        if len(ids) and (ids.min() < 0 or (self.vocab_size and ids.max() >= self.vocab_size)):
            self.problem(f"{path}/token_ids: ids outside the vocabulary [0, {self.vocab_size})")
        if not self.prefix_ok:
            text = data["text"].tobytes()
            for d in range(len(byte_off) - 1):
                try:
                    text[byte_off[d] : byte_off[d + 1]].decode("utf-8")
                except UnicodeDecodeError as exc:
                    self.problem(
                        f"{path}/text: document {int(data['doc_index'][d])} is not valid UTF-8 at byte {exc.start}"
                    )
                    break

    # ----------------------------------------------------------------- alignments

    def check_alignments(self, n_docs: int) -> None:
        names = [c for c in list_dir(self.store, "alignments/") if c != "zarr.json"]
        if not names:
            return
        doc_index = np.concatenate(self.doc_index) if self.doc_index else np.zeros(0, np.int64)
        tokens = np.concatenate(self.doc_tokens) if self.doc_tokens else np.zeros(0, np.int64)
        tokens = tokens[np.argsort(doc_index, kind="stable")]  # global order
        for digest in names:
            path = f"alignments/{digest}"
            meta = (read_group_attrs(self.store, path) or {}).get(ALIGNMENT_ATTR)
            if meta is None:
                self.problem(
                    f"{path}: no {ALIGNMENT_ATTR!r} record (an interrupted `xtd align --cache`?)"
                )
                continue
            if not meta.get("complete"):
                self.problem(f"{path}: incomplete (an interrupted `xtd align --cache`; rerun it)")
                continue
            if not self.check_files(path, meta.get("files", {})):
                continue
            docs = int(meta.get("documents", -1))
            if docs != n_docs:
                self.problem(f"{path}: covers {docs} documents; the store has {n_docs}")
                continue
            for name in meta.get("arrays", []):
                if not self.safe_key(name, f"array name of {path}"):
                    continue
                try:
                    off = open_array(self.store, f"{path}/{name}_offsets")[...]
                    rows = open_array(self.store, f"{path}/{name}").shape[0]
                except Exception as exc:  # noqa: BLE001 - a finding, not a crash
                    self.problem(f"{path}/{name}: does not decode ({type(exc).__name__}: {exc})")
                    continue
                if self.check_offsets(
                    f"{path}/{name}_offsets", off, n_docs, rows
                ) and name.startswith("teacher_"):
                    if not np.array_equal(np.diff(off), tokens):
                        self.problem(
                            f"{path}/{name}: row counts differ from the documents' teacher token counts"
                        )
