"""The alignment cache of a store: built by ``xtd align --cache``, checked and read by ``xtd train``.

For one student tokenizer (named by its digest), the cache holds the student tokens and
chunk ids of every document of a teacher store under ``alignments/<digest>/``
(:mod:`xtd.storage.alignments` owns the on-disk layout), so training skips tokenising and
aligning. Each document gets ``student_ids`` (S,) int32, ``student_spans`` (S, 2) int32,
``student_chunk`` (S,) int32 and ``teacher_chunk`` (T,) int32 over the whole document,
computed exactly as training computes them on the fly (:func:`xtd.examples.alignment_inputs`:
the student mirrors a leading teacher bos with its own; teacher rows with empty spans, or
``token_slot`` ≠ 0, are slot units).

Training reads a cache only when it fits the run (:func:`usable_cache`): unconstrained
chunks, all four arrays, one record per document of the store (a store extended after
``xtd align --cache`` is aligned on the fly, with a warning). A store that caches other
student tokenizers only is refused (:func:`check_cache`): the user most likely meant one
of those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from xtd.align import align_many
from xtd.config import AlignConfig, flag
from xtd.errors import DataError, TokenizerMismatchError
from xtd.examples import alignment_inputs, document_text
from xtd.storage import (
    AlignmentReader,
    Document,
    StoreReader,
    list_alignments,
    open_store,
    read_alignment,
    write_alignment,
)
from xtd.tokenization import ByteTokenizer, load_tokenizer, tokenizer_from_json

__all__ = ["CACHED_ARRAYS", "align_documents", "cache_alignment", "check_cache", "open_cache", "usable_cache"]

logger = logging.getLogger(__name__)

CACHED_ARRAYS = ("student_ids", "student_spans", "student_chunk", "teacher_chunk")
"""The arrays of one document in the cache."""
_BATCH = 64  # documents encoded and aligned per vectorised call


def align_documents(docs: Sequence[Document], student: ByteTokenizer, *, where: str) -> list[dict[str, np.ndarray]]:
    """The cache records of ``docs``: one batched encode and alignment (module docstring)."""
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


def cache_alignment(
    url: str, config: AlignConfig, *, progress: Callable[[int, int], None] | None = None
) -> int | None:
    """Cache the student tokens and chunk ids of every document of the store at ``url``.

    A complete cache of this student tokenizer that covers every document is kept
    (nothing to do) unless ``overwrite``; one that covers fewer documents (the store was
    extended since) is rebuilt.

    Args:
        url: the teacher store.
        config: the student tokenizer, an optional teacher tokenizer to check, ``overwrite``.
        progress: ``progress(documents_done, documents_total)`` after each batch.

    Returns:
        The number of documents cached, or None when the cache was already there.

    Raises:
        TokenizerMismatchError: ``--teacher-tokenizer`` differs from the store's.
        DataError: the store embeds no teacher tokenizer, or a document is not valid UTF-8.
    """
    reader = open_store(url)
    if not reader.tokenizer_json:
        raise DataError(f"store {url!r} embeds no teacher tokenizer; re-run xtd precompute")
    teacher = tokenizer_from_json(reader.tokenizer_json, name=f"{url} (teacher)")
    strip = config.allow_strip_unicode_normalizer
    if config.teacher_tokenizer is not None:
        given = load_tokenizer(config.teacher_tokenizer, allow_strip_unicode_normalizer=strip)
        if given.digest != teacher.digest:
            raise TokenizerMismatchError(
                f"{flag('teacher_tokenizer')} {config.teacher_tokenizer!r} is not the tokenizer store {url!r} was "
                f"made with; leave {flag('teacher_tokenizer')} out to use the store's own"
            )
    student = load_tokenizer(config.student_tokenizer, allow_strip_unicode_normalizer=strip)
    num_documents = len(reader)
    overwrite = config.overwrite
    if not overwrite and student.digest in list_alignments(url):
        if len(read_alignment(url, student.digest)) == num_documents:
            return None
        logger.info("the cached alignment of %r covers fewer documents than the store; rebuilding it", url)
        overwrite = True
    attrs = {
        "student_tokenizer": config.student_tokenizer,
        "student_digest": student.digest,
        "teacher_digest": teacher.digest,
        "chunks": "unconstrained",
        "config": config.to_dict(),
    }

    def documents() -> Iterator[dict[str, np.ndarray]]:
        for lo in range(0, num_documents, _BATCH):
            docs = [reader[d] for d in range(lo, min(lo + _BATCH, num_documents))]
            yield from align_documents(docs, student, where=f"store {url!r}, documents from {lo}")
            if progress is not None:
                progress(lo + len(docs), num_documents)

    write_alignment(url, student.digest, documents(), num_documents=num_documents, attrs=attrs, overwrite=overwrite)
    return num_documents


def check_cache(url: str, student_tokenizer: ByteTokenizer) -> None:
    """Refuse a store that caches alignments only for other student tokenizers.

    Raises:
        TokenizerMismatchError: naming the cached digests and the command that fixes it.
    """
    caches = list_alignments(url)
    if caches and student_tokenizer.digest not in caches:
        raise TokenizerMismatchError(
            f"store {url!r} holds cached alignments only for student tokenizer(s) "
            f"{', '.join(sorted(caches))}, not for this student's {student_tokenizer.digest}; run "
            f"`xtd align --cache {url}` with this student's tokenizer, or use the tokenizer the cache was made for"
        )


def usable_cache(url: str, reader: StoreReader, student_tokenizer: ByteTokenizer, alm_chunks: str) -> str | None:
    """The cache digest to read for ``url`` when it fits this run (module docstring), else None."""
    digest = student_tokenizer.digest
    if alm_chunks != "unconstrained" or digest not in list_alignments(url):
        return None
    cache = read_alignment(url, digest)
    if not set(CACHED_ARRAYS) <= set(cache.names):
        missing = sorted(set(CACHED_ARRAYS) - set(cache.names))
        logger.warning("alignment cache %s of %s lacks %s; aligning on the fly", digest, url, missing)
        return None
    if len(cache) != len(reader):  # the store was extended after `xtd align --cache`
        logger.warning(
            "alignment cache %s of %s covers %d of the store's %d documents; aligning on the fly "
            "(rerun xtd align --cache to refresh it)", digest, url, len(cache), len(reader),
        )  # fmt: skip
        return None
    return digest


def open_cache(url: str, digest: str) -> AlignmentReader:
    """The cached records of ``url`` for the student tokenizer ``digest``: ``reader[d]`` → arrays."""
    return read_alignment(url, digest)
