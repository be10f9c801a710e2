"""Documents as one shard stores them: each document validated and cast to the stored dtypes
(:func:`normalise_document`), and a shard's CSR arrays from its documents (:func:`shard_arrays`;
the layout of docs/format.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xtd.errors import DataError
from xtd.storage.codecs import encode_topk, pack_topk
from xtd.storage.format import Document

__all__ = ["normalise_document", "shard_arrays"]


def normalise_document(
    doc: Document, *, last_doc_index: int | None, num_classes: int, top_k: int, topk_codec: str,
    hidden_size: int | None,
) -> Document:
    """Validate one document and cast its arrays to the stored dtypes.

    Args:
        doc: the document as the teacher scored it.
        last_doc_index: the previous document's index in this part (indices must increase).
        num_classes: boundary classes C of the store.
        top_k: K of the store (0: none); ``topk_codec`` encodes the log-probs.
        hidden_size: H of the store, or None.

    Raises:
        DataError: a shape, span, id or encoding the store cannot hold, naming the document.
    """
    where = f"document {doc.doc_index}"
    n = len(doc.token_ids)
    last = last_doc_index
    if last is not None and doc.doc_index <= last:
        raise DataError(f"{where}: doc_index must increase within a part (previous was {last})")
    try:
        doc.text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: text is not valid UTF-8 at byte {exc.start}") from None
    c = num_classes

    def cast(name: str, value: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(value)
        if arr.shape != shape:
            raise DataError(f"{where}: {name} has shape {arr.shape}, expected {shape}")
        return np.ascontiguousarray(arr, dtype=dtype)

    spans = cast("token_spans", doc.token_spans, np.int32, (n, 2))
    if n and (
        spans.min() < 0 or spans.max() > len(doc.text) or np.any(spans[:, 1] < spans[:, 0])
    ):
        raise DataError(
            f"{where}: token_spans fall outside the document's {len(doc.text)} bytes"
        )
    out = Document(
        text=bytes(doc.text),
        token_ids=cast("token_ids", doc.token_ids, np.int32, (n,)),
        token_spans=spans,
        token_logprob=cast("token_logprob", doc.token_logprob, np.float32, (n,)),
        boundary_logmass=cast("boundary_logmass", doc.boundary_logmass, np.float16, (n, c)),
        doc_index=int(doc.doc_index),
    )
    if top_k:
        k = top_k
        if doc.topk_ids is None or doc.topk_logprobs is None or doc.tail_logmass is None:
            raise DataError(
                f"{where}: the store has top_k={k} but the document has no top-k arrays"
            )
        out.topk_ids = cast("topk_ids", doc.topk_ids, np.int32, (n, k))
        if n and out.topk_ids.min() < 0:
            raise DataError(f"{where}: topk_ids has negative ids")
        out.topk_logprobs = encode_topk(
            cast("topk_logprobs", doc.topk_logprobs, np.float32, (n, k)), topk_codec
        )
        out.tail_logmass = cast("tail_logmass", doc.tail_logmass, np.float32, (n,))
    if hidden_size:
        if doc.hidden is None:
            raise DataError(
                f"{where}: the store has hidden_size={hidden_size} but the document has no hidden"
            )
        out.hidden = cast("hidden", doc.hidden, np.float16, (n, hidden_size))
    if doc.token_slot is not None:
        out.token_slot = cast("token_slot", doc.token_slot, np.int8, (n,))
    if doc.loss_spans is not None:
        ls = np.asarray(doc.loss_spans, dtype=np.int64).reshape(-1, 2)
        if len(ls) and (
            ls.min() < 0 or ls.max() > len(doc.text) or np.any(ls[:, 1] < ls[:, 0])
        ):
            raise DataError(
                f"{where}: loss_spans fall outside the document's {len(doc.text)} bytes"
            )
        out.loss_spans = ls
    return out


def shard_arrays(
    docs: list[Document],
    top_k: int,
    topk_codec: str,
    hidden_size: int | None,
    optional: list[str],
) -> dict[str, np.ndarray]:
    """CSR arrays of one shard from its documents (already normalised)."""
    tok_counts = np.array([d.num_tokens for d in docs], dtype=np.int64)
    byte_counts = np.array([len(d.text) for d in docs], dtype=np.int64)
    out: dict[str, np.ndarray] = {
        "doc_index": np.array([d.doc_index for d in docs], dtype=np.int64),
        "doc_token_offsets": np.concatenate([[0], np.cumsum(tok_counts)]).astype(np.int64),
        "doc_byte_offsets": np.concatenate([[0], np.cumsum(byte_counts)]).astype(np.int64),
        "text": np.frombuffer(b"".join(d.text for d in docs), dtype=np.uint8).copy(),
    }
    names = ["token_ids", "token_spans", "token_logprob", "boundary_logmass"]
    if top_k:
        names += ["topk_ids", "topk_logprobs", "tail_logmass"]
    if hidden_size:
        names.append("hidden")
    for name in names:
        out[name] = np.concatenate([getattr(d, name) for d in docs], axis=0)
    if top_k:
        # The id table is per shard, so the row layout is made here, not per document.
        out.update(pack_topk(out.pop("topk_ids"), out.pop("topk_logprobs"), topk_codec))
    if "token_slot" in optional:
        # A document without slots in a shard with chat documents is ordinary text: 0.
        out["token_slot"] = np.concatenate(
            [
                d.token_slot if d.token_slot is not None else np.zeros(d.num_tokens, np.int8)
                for d in docs
            ]
        )
    if "loss_spans" in optional:
        # None means "train on every byte", which is the span [0, len(text)).
        spans = [
            d.loss_spans if d.loss_spans is not None else np.array([[0, len(d.text)]], np.int64)
            for d in docs
        ]
        counts = np.array([len(x) for x in spans], dtype=np.int64)
        out["loss_span_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out["loss_spans"] = np.concatenate(spans, axis=0).astype(np.int64).reshape(-1, 2)
    return out
