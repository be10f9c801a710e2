"""Byte view of any tokenizer (docs/method.md, "Byte view of a tokenizer").

Every token id gets its exact byte string (its *byte view*), read from the tokenizer's
model and pipeline, never guessed from a family name:

* byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2): invert the GPT-2 byte→unicode map;
* SentencePiece style (Mistral, Llama-2, Gemma): ``<0xNN>`` → byte NN, ``▁`` → space;
* WordPiece (BERT style): ``##`` continuation pieces; byte views are per occurrence,
  taken from the offset mapping (docs/method.md, "Byte view of a tokenizer");
* the built-in ``bytes`` tokenizer: ids 0..255 are the bytes in order, then specials
  (built, like the ``embedded:<name>`` tokenizers, by :mod:`xtd.embedded_tokenizers`).

Encoding a text gives every token its half-open byte span ``[start, end)`` in the UTF-8
bytes of the text. The spans are the cumulative byte-view lengths, and the byte views
are checked (vectorised) to concatenate to exactly the text — otherwise
:class:`~xtd.errors.ByteIdentityError` names the tokenizer and the first bad byte
offset. Special tokens have empty byte views (``start == end``). A SentencePiece dummy
prefix space (docs/method.md, "Chunks") is absorbed into the first token's span, so spans are always
offsets into the text itself.

Dimension letters: ``N`` tokens of one text, ``V`` vocabulary entries.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xtd.embedded_tokenizers import (
    EMBEDDED_TOKENIZERS,
    bytes_hf,
    bytes_to_unicode,
    embedded_hf,
    wrap_backend,
)
from xtd.errors import ByteIdentityError, TokenizerError, XtdWarning

logger = logging.getLogger(__name__)

__all__ = [
    "BOUNDARY_CLASSES",
    "EMBEDDED_TOKENIZERS",
    "Encoding",
    "ByteTokenizer",
    "load_tokenizer",
    "tokenizer_from_json",
    "bytes_to_unicode",
]

BOUNDARY_CLASSES: tuple[str, ...] = ("space", "newline", "tab", "special")
"""Column order of ``boundary_logmass``: the first byte of the next token is 0x20, 0x0A,
0x09, or the next token is special (docs/method.md, "Notation", β)."""


_BOUNDARY_BYTES = {0x20: 0, 0x0A: 1, 0x09: 2}
_SPECIAL_CLASS = 3
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_UNICODE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Precompiled"}

@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@dataclass(frozen=True)
class Encoding:
    """The tokens of one text.

    Attributes:
        ids: (N,) int32 token ids.
        spans: (N, 2) int32 half-open byte offsets into the UTF-8 text; special tokens
            have ``start == end``. Non-special spans tile the text in order.
    """

    ids: np.ndarray
    spans: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class ByteTokenizer:
    """A transformers tokenizer plus its exact byte view (docs/method.md, "Byte view of a tokenizer").

    Build with :func:`load_tokenizer` or :func:`tokenizer_from_json`.

    Attributes:
        name: the spec it was loaded from.
        hf: the transformers tokenizer (``save_pretrained`` works).
        vocab_size: number of ids, specials included.
        token_bytes: byte view of every id (``b""`` for special tokens).
        token_lengths: (V,) int64 read-only, ``len(token_bytes[id])``: ids → spans at array
            speed (:func:`xtd.align_ids.spans_from_ids`).
        has_dummy_prefix: a SentencePiece dummy prefix adds one leading space to the views.
        boundary_class: (V,) int8, -1 none, else an index into :data:`BOUNDARY_CLASSES`.
        special_ids: (n,) int64 sorted ids of the special tokens.
        bos_id, eos_id, pad_id: ids of those special tokens, or None.
        digest: 16 hex chars of sha256 over the canonical tokenizer.json.
        kind: ``"byte_level"``, ``"sentencepiece"``, ``"wordpiece"`` or ``"plain"``.
    """

    def __init__(self, hf: Any, name: str, *, allow_strip_unicode_normalizer: bool = False) -> None:
        from transformers import PreTrainedTokenizerFast

        if not isinstance(hf, PreTrainedTokenizerFast):
            raise TokenizerError(
                f"tokenizer {name!r} is a {type(hf).__name__}, which has no `tokenizers` backend; "
                "xtd needs a fast tokenizer (a tokenizer.json) to compute byte spans"
            )
        self.name = name
        text = hf.backend_tokenizer.to_str()
        state = json.loads(text)
        normalizer, stripped = _check_normalizer(state.get("normalizer"), name, allow_strip_unicode_normalizer)
        if stripped:
            # docs/method.md, "Byte view of a tokenizer": removed with a warning only when the user opted in.
            warnings.warn(
                f"tokenizer {name!r}: removed the Unicode normaliser(s) {', '.join(stripped)} "
                "so that token bytes match the text (allow_strip_unicode_normalizer=True)",
                XtdWarning,
                stacklevel=3,
            )
            state["normalizer"] = normalizer
            text = json.dumps(state, ensure_ascii=False)
            hf = copy.deepcopy(hf)
            hf._tokenizer = _backend_from_text(text)  # the copy tokenises like xtd does
        self.hf = hf
        self._json = text
        canonical = json.dumps(state, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        self.digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
        # A private copy that splits special-token strings found inside text as plain text:
        # text segments never contain slots (docs/method.md, "Byte view of a tokenizer"); specials come only from templates
        # or add_special_tokens.
        self._backend = _backend_from_text(text)
        self._backend.encode_special_tokens = True
        self.kind = _pipeline_kind(state)
        self._dummy_prefix = self.kind == "sentencepiece" and _has_dummy_prefix(state)

        vocab: dict[str, int] = self._backend.get_vocab(with_added_tokens=True)
        added = self._backend.get_added_tokens_decoder()
        self.vocab_size = max(len(hf), (max(vocab.values()) + 1) if vocab else 0)
        specials = sorted(i for i, tok in added.items() if tok.special)
        self.special_ids = np.asarray(specials, dtype=np.int64)
        self.token_bytes = _token_bytes(vocab, added, self.vocab_size, self.kind, state)
        self._lengths = np.fromiter((len(b) for b in self.token_bytes), np.int64, self.vocab_size)
        self._lengths.flags.writeable = False
        self.token_lengths, self.has_dummy_prefix = self._lengths, self._dummy_prefix
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])
        self._flat = np.frombuffer(b"".join(self.token_bytes), dtype=np.uint8)
        self._is_special = np.zeros(self.vocab_size, dtype=bool)
        self._is_special[self.special_ids] = True
        first = np.full(self.vocab_size, -1, dtype=np.int16)
        nonempty = self._lengths > 0
        first[nonempty] = self._flat[self._offsets[:-1][nonempty]]
        boundary = np.full(self.vocab_size, -1, dtype=np.int8)
        for byte, cls in _BOUNDARY_BYTES.items():
            boundary[first == byte] = cls
        boundary[self._is_special] = _SPECIAL_CLASS
        self.boundary_class = boundary
        self.bos_id = _maybe_id(hf, "bos_token")
        self.eos_id = _maybe_id(hf, "eos_token")
        self.pad_id = _maybe_id(hf, "pad_token")

    def __repr__(self) -> str:
        return f"ByteTokenizer({self.name!r}, kind={self.kind}, vocab_size={self.vocab_size})"

    # -- encoding ---------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> Encoding:
        """Token ids and exact byte spans of one text.

        Raises:
            ByteIdentityError: the byte views do not reproduce the text.
        """
        return self.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[Encoding]:
        """:meth:`encode` for many texts; one batched tokenizer call, vectorised checks.

        Raises:
            ByteIdentityError: some text is not reproduced (names the first one and the
                first bad byte offset in it).
            DataError-like TokenizerError: an element is not a ``str``.
        """
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"encode_batch: text {i} is a {type(text).__name__}, not a str")
        if not texts:
            return []
        encs = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        if self.kind == "wordpiece":
            return [self._wordpiece_encoding(t, e, i) for i, (t, e) in enumerate(zip(texts, encs, strict=True))]
        counts = np.fromiter((len(e.ids) for e in encs), np.int64, len(encs))
        tok_offsets = np.concatenate([[0], np.cumsum(counts)])
        ids = np.fromiter((i for e in encs for i in e.ids), np.int64, int(tok_offsets[-1]))
        raw = [t.encode("utf-8") for t in texts]
        spans = self._spans_checked(ids, tok_offsets, raw)
        ids32 = ids.astype(np.int32)
        return [
            Encoding(ids=ids32[a:b], spans=spans[a:b])
            for a, b in zip(tok_offsets[:-1], tok_offsets[1:], strict=True)
        ]

    def _spans_checked(self, ids: np.ndarray, tok_offsets: np.ndarray, raw: list[bytes]) -> np.ndarray:
        """Byte spans from cumulative view lengths, after checking the byte-view invariant."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TokenizerError(f"tokenizer {self.name!r} produced an id outside its vocabulary")
        lens = self._lengths[ids]  # (N_total,)
        cum = np.concatenate([[0], np.cumsum(lens)])  # byte position before each token
        starts_of_text = cum[tok_offsets]  # (B+1,) position of each text in the flat views
        totals = np.diff(starts_of_text)
        text_lens = np.fromiter((len(r) for r in raw), np.int64, len(raw))
        flat_views = _gather(self._flat, self._offsets[ids], lens)
        dummy = np.zeros(len(raw), dtype=bool)
        if self._dummy_prefix:
            # docs/method.md, "Chunks": a SentencePiece dummy prefix adds one leading space that is not in
            # the text; it belongs to the first token, whose span starts at 0.
            first_byte = np.full(len(raw), -1)
            has = totals > 0
            first_byte[has] = flat_views[starts_of_text[:-1][has]]
            dummy = (totals == text_lens + 1) & (first_byte == 0x20)
        flat_text = np.frombuffer(b"".join(raw), dtype=np.uint8)
        keep = np.ones(flat_views.shape[0], dtype=bool)
        keep[starts_of_text[:-1][dummy]] = False
        ok = np.array_equal(totals - dummy, text_lens) and np.array_equal(flat_views[keep], flat_text)
        if not ok:
            self._raise_identity(flat_views, starts_of_text, dummy, raw)
        base = np.repeat(starts_of_text[:-1] + dummy, np.diff(tok_offsets))
        ends = cum[1:] - base
        starts = ends - lens
        spans = np.stack([np.maximum(starts, 0), np.maximum(ends, 0)], axis=1)
        return spans.astype(np.int32)

    def _raise_identity(self, flat_views: np.ndarray, starts: np.ndarray, dummy: np.ndarray, raw: list[bytes]) -> None:
        for i, text in enumerate(raw):
            a = int(starts[i] + dummy[i])
            views = flat_views[a : int(starts[i + 1])].tobytes()
            if views == text:
                continue
            n = min(len(views), len(text))
            diff = np.flatnonzero(np.frombuffer(views[:n], np.uint8) != np.frombuffer(text[:n], np.uint8))
            offset = int(diff[0]) if diff.size else n
            where = f"text {i} of the batch, " if len(raw) > 1 else ""
            raise ByteIdentityError(
                f"tokenizer {self.name!r}: token byte views do not reproduce the text ({where}first bad "
                f"byte offset {offset}: text has {text[offset : offset + 8]!r}, tokens give "
                f"{views[offset : offset + 8]!r}); the tokenizer drops or rewrites bytes (unknown "
                "token, normaliser or whitespace-removing pre-tokenizer) — use a tokenizer with "
                "byte fallback or byte-level BPE"
            )
        raise AssertionError("identity check failed but every text matched")  # pragma: no cover

    def _wordpiece_encoding(self, text: str, enc: Any, index: int) -> Encoding:
        """Per-occurrence byte views of WordPiece (docs/method.md, "Byte view of a tokenizer"): offsets + whitespace before."""
        raw = text.encode("utf-8")
        ids = np.asarray(enc.ids, dtype=np.int64)
        if not ids.size:
            if raw.strip():
                raise ByteIdentityError(f"tokenizer {self.name!r}: no tokens for text {index} ({raw[:8]!r}...)")
            return Encoding(ids=np.zeros(0, np.int32), spans=np.zeros((0, 2), np.int32))
        char_to_byte = _char_to_byte(text)
        offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        special = self._is_special[ids]
        b_start = char_to_byte[offs[:, 0]]
        b_end = char_to_byte[offs[:, 1]]
        # Every byte must be covered by a text token or be whitespace between tokens.
        covered = np.zeros(len(raw) + 1, dtype=np.int64)
        np.add.at(covered, b_start[~special], 1)
        np.add.at(covered, b_end[~special], -1)
        gaps = np.flatnonzero(np.cumsum(covered)[: len(raw)] == 0)
        if gaps.size:
            gap_text = raw[int(gaps[0]) :]
            for pos in gaps:
                ch = raw[int(pos) : int(pos) + 1]
                if ch not in b" \t\n\r\x0b\x0c" and not _is_unicode_space(raw, int(pos)):
                    raise ByteIdentityError(
                        f"tokenizer {self.name!r}: WordPiece tokens do not cover byte offset {int(pos)} "
                        f"(text {index}: {gap_text[:8]!r}), which is not whitespace; its normaliser "
                        "drops characters — use a byte-level tokenizer"
                    )
        # Tile: each text token takes the bytes since the previous text token's end (the
        # whitespace before it); the last one also takes trailing whitespace, so that the
        # spans tile the whole text. Specials sit, empty, at the previous text token's end.
        ends = np.where(special, 0, b_end)
        text_pos = np.flatnonzero(~special)
        if text_pos.size:
            ends[text_pos[-1]] = len(raw)
        ends = np.maximum.accumulate(ends)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        ends = np.where(special, starts, ends)
        return Encoding(ids=ids.astype(np.int32), spans=np.stack([starts, ends], axis=1).astype(np.int32))

    # -- vocabulary facts -------------------------------------------------------------

    def special_mask(self, ids: np.ndarray) -> np.ndarray:
        """(N,) bool: which of ``ids`` are special tokens."""
        return self._is_special[np.asarray(ids, dtype=np.int64)]

    def boundary_mask(self, classes: Sequence[str] = BOUNDARY_CLASSES) -> np.ndarray:
        """(V,) bool: ids whose byte view starts with a boundary byte of ``classes``.

        Raises:
            TokenizerError: unknown class name, or a WordPiece tokenizer (its boundary
                class is not a property of the vocabulary entry, docs/method.md, "Byte view of a tokenizer").
        """
        unknown = [c for c in classes if c not in BOUNDARY_CLASSES]
        if unknown:
            raise TokenizerError(f"unknown boundary classes {unknown}; known: {', '.join(BOUNDARY_CLASSES)}")
        if self.kind == "wordpiece" and any(c != "special" for c in classes):
            raise TokenizerError(
                f"tokenizer {self.name!r} is WordPiece: whether a token starts with a space depends on "
                "the text, not the vocabulary, so boundary classes other than 'special' are undefined"
            )
        wanted = np.asarray([BOUNDARY_CLASSES.index(c) for c in classes], dtype=np.int8)
        return np.isin(self.boundary_class, wanted)

    def to_json(self) -> str:
        """The tokenizer.json text (after any normaliser stripping)."""
        return self._json

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write a folder that ``transformers.AutoTokenizer.from_pretrained`` loads."""
        self.hf.save_pretrained(str(folder))


# -- loading -------------------------------------------------------------------------


def load_tokenizer(spec: Any, *, allow_strip_unicode_normalizer: bool = False) -> ByteTokenizer:
    """Load any tokenizer as a :class:`ByteTokenizer`.

    Args:
        spec: a Hugging Face id or folder; a ``tokenizer.json`` path; a transformers
            ``PreTrainedTokenizerBase``; ``"bytes"`` (256 bytes + ``<|endoftext|>``,
            ``<|pad|>``); ``"bytes:<spec>"`` (256 bytes + the specials of ``<spec>``); or
            ``"embedded:<name>"`` with name in :data:`EMBEDDED_TOKENIZERS`.
        allow_strip_unicode_normalizer: remove an NFC/NFKC/... normaliser with a warning
            instead of refusing the tokenizer (docs/method.md, "Byte view of a tokenizer").

    Raises:
        TokenizerError: the spec cannot be loaded (the message says what was tried).
        ByteIdentityError: the pipeline rewrites bytes (lowercasing, accent stripping, ...).
    """
    if isinstance(spec, ByteTokenizer):
        return spec
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        return _load_cached(spec, bool(allow_strip_unicode_normalizer))
    from transformers import PreTrainedTokenizerBase

    if isinstance(spec, PreTrainedTokenizerBase):
        name = getattr(spec, "name_or_path", "") or type(spec).__name__
        return ByteTokenizer(spec, name, allow_strip_unicode_normalizer=allow_strip_unicode_normalizer)
    raise TokenizerError(
        f"cannot load a tokenizer from a {type(spec).__name__}; give an HF id or folder, a "
        "tokenizer.json path, 'bytes', or 'embedded:<name>'"
    )


def tokenizer_from_json(text: str, *, name: str = "tokenizer.json") -> ByteTokenizer:
    """A :class:`ByteTokenizer` from tokenizer.json text (e.g. the one embedded in a store).

    bos/eos/pad are not part of tokenizer.json; they are taken from the post-processor
    (bos) and from well-known special-token names.
    """
    return _from_json_cached(text, name)


@functools.lru_cache(maxsize=16)
def _from_json_cached(text: str, name: str) -> ByteTokenizer:
    try:
        backend = _backend_from_state(json.loads(text))
    except (ValueError, Exception) as exc:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"{name!r} is not a valid tokenizer.json: {exc}") from None
    return ByteTokenizer(wrap_backend(backend, **_guess_special_names(backend)), name)


@functools.lru_cache(maxsize=32)
def _load_cached(spec: str, allow_strip: bool) -> ByteTokenizer:
    if spec == "bytes" or spec.startswith("bytes:"):
        specials_of = load_tokenizer(spec[len("bytes:") :]) if ":" in spec else None
        return ByteTokenizer(bytes_hf(specials_of), spec)
    if spec.startswith("embedded:"):
        return ByteTokenizer(embedded_hf(spec[len("embedded:") :]), spec, allow_strip_unicode_normalizer=allow_strip)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise TokenizerError(f"{spec!r} is a file but not a tokenizer.json; give its folder or a tokenizer.json")
        try:
            backend = _backend_from_state(json.loads(path.read_text(encoding="utf-8")))
        except Exception as exc:
            raise TokenizerError(f"{spec!r} is not a valid tokenizer.json: {exc}") from None
        config = path.parent / "tokenizer_config.json"
        if config.is_file():  # a folder's tokenizer.json: take its special-token roles too
            return _load_cached(str(path.parent), allow_strip)
        hf = wrap_backend(backend, **_guess_special_names(backend))
        return ByteTokenizer(hf, spec, allow_strip_unicode_normalizer=allow_strip)
    looks_like_path = path.exists() or spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") > 1
    if looks_like_path and not path.is_dir():
        raise TokenizerError(f"no tokenizer at {spec!r}: the path does not exist")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(spec)
    except Exception as exc:  # OSError, ValueError, HF hub errors: all mean "cannot load"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenizerError(
            f"cannot load tokenizer {spec!r} ({first}); give a Hugging Face id that is cached or "
            "reachable, a local folder, a tokenizer.json path, 'bytes', or "
            f"'embedded:<name>' with name in {', '.join(EMBEDDED_TOKENIZERS)}"
        ) from None
    return ByteTokenizer(hf, spec, allow_strip_unicode_normalizer=allow_strip)


def _backend_from_state(state: dict[str, Any]) -> Any:
    return _backend_from_text(json.dumps(state, ensure_ascii=False))


def _backend_from_text(text: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def _guess_special_names(backend: Any) -> dict[str, str | None]:
    """bos/eos/pad of a bare tokenizer.json, from the post-processor and common names."""
    added = {tok.content for tok in backend.get_added_tokens_decoder().values() if tok.special}
    state = json.loads(backend.to_str())
    bos = None
    post = state.get("post_processor") or {}
    for piece in post.get("single", []) if post.get("type") == "TemplateProcessing" else []:
        if "SpecialToken" in piece:
            bos = piece["SpecialToken"]["id"]
        break

    def pick(*names: str) -> str | None:
        return next((n for n in names if n in added), None)

    return {
        "bos_token": bos or pick("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"),
        "eos_token": pick("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>"),
        "pad_token": pick("<|pad|>", "<pad>", "[PAD]"),
        "unk_token": pick("<unk>", "[UNK]"),
    }


# -- pipeline inspection -------------------------------------------------------------


def _check_normalizer(node: dict[str, Any] | None, name: str, allow_strip: bool) -> tuple[dict[str, Any] | None, list[str]]:
    """Validate a normaliser (docs/method.md, "Byte view of a tokenizer"); returns (normaliser to use, stripped types)."""
    if node is None:
        return None, []
    kind = node.get("type")
    if kind == "Sequence":
        kept, stripped = [], []
        for child in node.get("normalizers", []):
            new, gone = _check_normalizer(child, name, allow_strip)
            stripped += gone
            if new is not None:
                kept.append(new)
        return ({"type": "Sequence", "normalizers": kept} if kept else None), stripped
    if kind in _UNICODE_NORMALIZERS:
        if kind == "Precompiled" and not node.get("precompiled_charsmap"):
            return node, []  # an empty charsmap changes nothing
        if allow_strip:
            return None, [kind]
        raise ByteIdentityError(
            f"tokenizer {name!r} has a {kind} Unicode normaliser, which rewrites the bytes of the "
            "text, so token spans would not match it; pass allow_strip_unicode_normalizer=True "
            "(--allow-strip-unicode-normalizer) to remove it with a warning"
        )
    if kind == "Prepend" and node.get("prepend") == "▁":
        return node, []
    if kind == "Replace" and node.get("pattern") == {"String": " "} and node.get("content") == "▁":
        return node, []
    if kind == "ByteLevel":
        return node, []
    if kind == "BertNormalizer" and not node.get("lowercase") and not node.get("strip_accents"):
        return node, []  # clean_text only: WordPiece spans come from offsets and are checked
    raise ByteIdentityError(
        f"tokenizer {name!r} has a {kind} normaliser ({json.dumps(node)[:120]}), which changes "
        "bytes (lowercasing, accent stripping, replacements); xtd cannot align it to the text — "
        "use a tokenizer without it"
    )


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every dict in a pipeline JSON tree (Sequence nodes included)."""
    out: list[dict[str, Any]] = []
    if isinstance(node, dict):
        out.append(node)
        for value in node.values():
            out += _walk(value)
    elif isinstance(node, list):
        for value in node:
            out += _walk(value)
    return out


def _pipeline_kind(state: dict[str, Any]) -> str:
    model = (state.get("model") or {}).get("type")
    if model == "WordPiece":
        return "wordpiece"
    stages = _walk([state.get("pre_tokenizer"), state.get("decoder"), state.get("normalizer")])
    types = {n.get("type") for n in stages}
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or model == "Unigram" or any(
        n.get("type") in ("Prepend", "Replace") and "▁" in json.dumps(n, ensure_ascii=False) for n in stages
    ):
        return "sentencepiece"
    return "plain"


def _has_dummy_prefix(state: dict[str, Any]) -> bool:
    for n in _walk([state.get("normalizer"), state.get("pre_tokenizer")]):
        if n.get("type") == "Prepend" and n.get("prepend") == "▁":
            return True
        if n.get("type") == "Metaspace" and n.get("prepend_scheme", "always") != "never" and n.get("add_prefix_space", True):
            return True
    return False


def _token_bytes(vocab: dict[str, int], added: dict[int, Any], size: int, kind: str, state: dict[str, Any]) -> list[bytes]:
    out = [b""] * size
    u2b = _unicode_to_byte()
    byte_fallback = bool((state.get("model") or {}).get("byte_fallback"))
    for piece, ident in vocab.items():
        if ident in added:
            continue
        if kind == "byte_level":
            try:
                out[ident] = bytes(u2b[c] for c in piece)
            except KeyError:  # a piece outside the byte alphabet: its text is its bytes
                out[ident] = piece.encode("utf-8")
        elif kind == "sentencepiece":
            match = _BYTE_FALLBACK.match(piece) if byte_fallback or len(piece) == 6 else None
            out[ident] = bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode("utf-8")
        elif kind == "wordpiece":
            out[ident] = (piece[2:] if piece.startswith("##") else piece).encode("utf-8")
        else:
            out[ident] = piece.encode("utf-8")
    for ident, tok in added.items():
        if ident < size:
            # Non-special added tokens match their raw text (normalized=False) in the input.
            out[ident] = b"" if tok.special else tok.content.encode("utf-8")
    return out


def _maybe_id(hf: Any, attr: str) -> int | None:
    token = getattr(hf, attr, None)
    if token is None:
        return None
    ident = hf.convert_tokens_to_ids(str(token))
    return None if ident is None or ident == hf.unk_token_id and str(token) != str(hf.unk_token) else int(ident)


def _gather(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenate ``flat[starts[i]:starts[i]+lens[i]]`` for all i, without a Python loop."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=flat.dtype)
    out_start = np.cumsum(lens) - lens
    index = np.arange(total, dtype=np.int64) + np.repeat(starts - out_start, lens)
    return flat[index]


def _char_to_byte(text: str) -> np.ndarray:
    """(len(text)+1,) int64: byte offset of every char offset (UTF-8 lengths, cumulated)."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(width)])


def _is_unicode_space(raw: bytes, pos: int) -> bool:
    """Whether the character containing byte ``pos`` is whitespace."""
    start = pos
    while start > 0 and (raw[start] & 0xC0) == 0x80:
        start -= 1
    for end in range(start + 1, min(start + 5, len(raw)) + 1):
        try:
            return raw[start:end].decode("utf-8").isspace()
        except UnicodeDecodeError:
            continue
    return False
