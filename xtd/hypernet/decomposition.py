"""Each target token as a short sequence of the base model's own tokens.

The hypernetwork reads a target token through the frozen base embeddings of its pieces
(docs/method.md, "Hypernetworks"). The pieces follow the FVT rules
(:func:`xtd.fvt.fvt_pieces`; docs/method.md, "FVT initialisation"): a special token of
the same role or string, a base token with the identical byte view, or the base
tokenizer's own cut of the byte view — bytes that are not valid UTF-8 become the base's
single-byte tokens. Where FVT would draw at random, a decomposition still exists:

* ``spelled``: a token the base tokenizer cannot reproduce as a whole (real tokenizers
  lack some bytes: SmolLM2's has no token for 21 of the 256, e.g. ``\x04``) is spelled
  character by character, and a byte without a base token becomes a *byte row*: piece
  id ``V + b`` for byte ``b``, where ``V`` is the base vocabulary size — the
  hypernetwork learns an embedding for each (ZeTT's byte fallback);
* ``special_text``: a special token without a counterpart is spelled as its string;
* ``empty``: an id with no bytes (a hole in the vocabulary) maps to the base's first
  special token.

Decompositions longer than ``max_pieces`` keep their first pieces.

Dimension letters: ``N`` target tokens, ``L`` pieces per token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xtd.errors import ByteIdentityError, TokenizerError
from xtd.fvt import fvt_pieces
from xtd.tokenization import ByteTokenizer

__all__ = ["DECOMPOSITION_RULES", "Decomposer", "Decomposition", "decompose"]

DECOMPOSITION_RULES = ("special", "exact", "decomposed", "spelled", "special_text", "empty")
"""How a token got its pieces, in the order they are tried; keys of ``Decomposition.counts``."""


@dataclass(frozen=True)
class Decomposition:
    """Base-token pieces of target tokens.

    Attributes:
        pieces: (N, L) int64 base ids in text order (``V + b``: the byte row of byte
            ``b``), ``-1`` after a token's last piece; ``L`` is the longest
            decomposition (≤ ``max_pieces``).
        num_pieces: (N,) int64, 1..L.
        counts: tokens per rule (:data:`DECOMPOSITION_RULES`), ``byte_rows`` (tokens
            with a byte row among their pieces) and ``truncated`` (tokens whose
            decomposition was cut at ``max_pieces``).
    """

    pieces: np.ndarray
    num_pieces: np.ndarray
    counts: dict[str, int]

    def __len__(self) -> int:
        return int(self.pieces.shape[0])


class Decomposer:
    """Decomposes target tokens into one base tokenizer's ids, remembering what it has seen.

    A non-special token's pieces depend only on its byte view, and the tokenizers sampled
    at successive training steps share most of their pieces, so those are cached by byte
    view (up to ``max_entries``, then the cache starts afresh).

    Args:
        base: the base model's tokenizer (the pieces are its ids).
        max_pieces: keep at most this many pieces per token.
        max_entries: cache size bound (0: no cache).
    """

    def __init__(self, base: ByteTokenizer, *, max_pieces: int = 8, max_entries: int = 1_000_000) -> None:
        self.base = base
        self.max_pieces = max_pieces
        self.max_entries = max_entries
        self._cache: dict[bytes, tuple[list[int], str]] = {}

    def __call__(self, target: ByteTokenizer, ids: Sequence[int] | np.ndarray | None = None) -> Decomposition:
        """Decompose target tokens (rules in the module docstring).

        Args:
            target: the tokenizer whose tokens are decomposed.
            ids: target ids, in the order wanted; ``None`` for ``0..V-1``.

        Returns:
            The :class:`Decomposition` (row ``i`` belongs to ``ids[i]``).

        Raises:
            TokenizerError: an id outside the target vocabulary.
        """
        wanted = np.arange(target.vocab_size) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= target.vocab_size):
            raise TokenizerError(f"decompose: ids outside the vocabulary of {target.name!r} ({target.vocab_size} ids)")
        # Specials and role holders (bos, eos, pad, unk) are decomposed by id, never cached.
        by_id = set(target.special_ids.tolist()) | {
            i for i in (target.bos_id, target.eos_id, target.pad_id, getattr(target.hf, "unk_token_id", None)) if i is not None
        }
        rows: list[list[int]] = [[] for _ in range(wanted.shape[0])]
        rules = [""] * wanted.shape[0]
        missing: list[int] = []  # positions in `wanted`
        for k, j in enumerate(wanted.tolist()):
            hit = None if j in by_id else self._cache.get(target.token_bytes[j])
            if hit is None:
                missing.append(k)
            else:
                rows[k], rules[k] = hit
        if missing:
            new_rows, new_rules = self._decompose(target, wanted[missing].tolist())
            if len(self._cache) + len(missing) > self.max_entries:
                self._cache.clear()
            for k, row, rule in zip(missing, new_rows, new_rules, strict=True):
                rows[k], rules[k] = row, rule
                j = int(wanted[k])
                if j not in by_id and self.max_entries:
                    self._cache[target.token_bytes[j]] = (row, rule)
        return self._pack(rows, rules)

    def _decompose(self, target: ByteTokenizer, ids: list[int]) -> tuple[list[list[int]], list[str]]:
        base = self.base
        rows, rules = fvt_pieces(base, target, ids)
        fallback_id = int(base.special_ids[0]) if base.special_ids.size else 0
        specials = set(target.special_ids.tolist())
        for k, row in enumerate(rows):
            if row:
                continue
            j = ids[k]
            if target.token_bytes[j]:
                rows[k] = _spell(base, target.token_bytes[j])
                rules[k] = "spelled"
            elif j in specials:
                rows[k] = _spell(base, str(target.hf.convert_ids_to_tokens(j)).encode("utf-8"))
                rules[k] = "special_text"
            if not rows[k]:
                rows[k] = [fallback_id]
                rules[k] = "empty"
        return rows, rules

    def _pack(self, rows: list[list[int]], rules: list[str]) -> Decomposition:
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        width = int(min(lengths.max(initial=1), self.max_pieces))
        pieces = np.full((len(rows), width), -1, dtype=np.int64)
        for k, row in enumerate(rows):
            cut = row[:width]
            pieces[k, : len(cut)] = cut
        counts = {rule: rules.count(rule) for rule in DECOMPOSITION_RULES}
        counts["byte_rows"] = int((pieces >= self.base.vocab_size).any(axis=1).sum())
        counts["truncated"] = int((lengths > width).sum())
        return Decomposition(pieces=pieces, num_pieces=np.minimum(lengths, width), counts=counts)


def decompose(
    base: ByteTokenizer,
    target: ByteTokenizer,
    ids: Sequence[int] | np.ndarray | None = None,
    *,
    max_pieces: int = 8,
) -> Decomposition:
    """Decompose target tokens into base tokens once (no cache; see :class:`Decomposer`).

    Args:
        base: the base model's tokenizer (the pieces are its ids).
        target: the tokenizer whose tokens are decomposed.
        ids: target ids, in the order wanted; ``None`` for ``0..V-1``.
        max_pieces: keep at most this many pieces per token.

    Raises:
        TokenizerError: an id outside the target vocabulary.
    """
    return Decomposer(base, max_pieces=max_pieces, max_entries=0)(target, ids)


def _spell(base: ByteTokenizer, data: bytes) -> list[int]:
    """``data`` in base ids: as the base cuts it, else character by character, else byte rows."""
    try:
        return base.encode(data.decode("utf-8")).ids.tolist()
    except (UnicodeDecodeError, ByteIdentityError):
        pass
    single = _single_byte_ids(base)
    out: list[int] = []
    pos = 0
    while pos < len(data):
        size = _char_size(data, pos)
        chunk = data[pos : pos + max(size, 1)]
        ids: list[int] | None = None
        if size:
            try:
                ids = base.encode(chunk.decode("utf-8")).ids.tolist()
            except ByteIdentityError:
                ids = None
        if ids is None:
            ids = [int(single[b]) if single[b] >= 0 else base.vocab_size + b for b in chunk]
        out.extend(ids)
        pos += len(chunk)
    return out


def _char_size(data: bytes, pos: int) -> int:
    """Bytes of the valid UTF-8 character at ``pos``, or 0 if none starts there."""
    for size in range(1, 5):
        try:
            data[pos : pos + size].decode("utf-8")
            return size
        except UnicodeDecodeError:
            continue
    return 0


@functools.lru_cache(maxsize=8)
def _single_byte_ids(base: ByteTokenizer) -> np.ndarray:
    """(256,) int64: the base id whose byte view is that one byte, -1 where none is."""
    out = np.full(256, -1, dtype=np.int64)
    specials = set(base.special_ids.tolist())
    for i, view in enumerate(base.token_bytes):
        if len(view) == 1 and out[view[0]] < 0 and i not in specials:
            out[view[0]] = i
    return out
