"""Each target token as a short sequence of the base model's own tokens.

The hypernetwork reads a target token through the frozen base embeddings of its pieces
(docs/method.md, "Hypernetworks"). The pieces follow the FVT rules
(:func:`xtd.fvt.fvt_pieces`; docs/method.md, "FVT initialisation"): a special token of
the same role or string, a base token with the identical byte view, or the base
tokenizer's own cut of the byte view — bytes that are not valid UTF-8 become the base's
single-byte tokens. Where FVT would draw at random, a decomposition still exists: a
special token without a counterpart is spelled as its string, and an id with no bytes
(a hole in the vocabulary) maps to the base's first special token. Decompositions longer
than ``max_pieces`` keep their first pieces.

Dimension letters: ``N`` target tokens, ``L`` pieces per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xtd.errors import ByteIdentityError, TokenizerError
from xtd.fvt import fvt_pieces
from xtd.tokenization import ByteTokenizer

__all__ = ["DECOMPOSITION_RULES", "Decomposition", "decompose"]

DECOMPOSITION_RULES = ("special", "exact", "decomposed", "special_text", "empty")
"""How a token got its pieces, in the order they are tried; keys of ``Decomposition.counts``."""


@dataclass(frozen=True)
class Decomposition:
    """Base-token pieces of target tokens.

    Attributes:
        pieces: (N, L) int64 base ids in text order, ``-1`` after a token's last piece;
            ``L`` is the longest decomposition (≤ ``max_pieces``).
        num_pieces: (N,) int64, 1..L.
        counts: tokens per rule (:data:`DECOMPOSITION_RULES`) and ``truncated`` (tokens
            whose decomposition was cut at ``max_pieces``).
    """

    pieces: np.ndarray
    num_pieces: np.ndarray
    counts: dict[str, int]

    def __len__(self) -> int:
        return int(self.pieces.shape[0])


def decompose(
    base: ByteTokenizer,
    target: ByteTokenizer,
    ids: Sequence[int] | np.ndarray | None = None,
    *,
    max_pieces: int = 8,
) -> Decomposition:
    """Decompose target tokens into base tokens (rules in the module docstring).

    Args:
        base: the base model's tokenizer (the pieces are its ids).
        target: the tokenizer whose tokens are decomposed.
        ids: target ids, in the order wanted; ``None`` for ``0..V-1``.
        max_pieces: keep at most this many pieces per token.

    Returns:
        The :class:`Decomposition` (row ``i`` belongs to ``ids[i]``).

    Raises:
        TokenizerError: an id outside the target vocabulary, or a token whose bytes the
            base tokenizer cannot spell (it lacks a single-byte token).
    """
    wanted = np.arange(target.vocab_size) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
    if wanted.size and (wanted.min() < 0 or wanted.max() >= target.vocab_size):
        raise TokenizerError(f"decompose: ids outside the vocabulary of {target.name!r} ({target.vocab_size} ids)")
    rows, rules = fvt_pieces(base, target, wanted.tolist())
    fallback_id = int(base.special_ids[0]) if base.special_ids.size else 0
    target_specials = set(target.special_ids.tolist())
    for k, row in enumerate(rows):
        if row:
            continue
        j = int(wanted[k])
        if target.token_bytes[j]:
            raise TokenizerError(
                f"token {j} of {target.name!r} ({target.token_bytes[j][:16]!r}) cannot be spelled in "
                f"{base.name!r}'s tokens: the base tokenizer lacks a single-byte token for one of its "
                "bytes; use a base model whose tokenizer covers all 256 bytes (byte-level BPE or byte fallback)"
            )
        if j in target_specials:
            rows[k] = _spell(base, str(target.hf.convert_ids_to_tokens(j)))
            rules[k] = "special_text"
        if not rows[k]:
            rows[k] = [fallback_id]
            rules[k] = "empty"
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    width = int(min(lengths.max(initial=1), max_pieces))
    pieces = np.full((len(rows), width), -1, dtype=np.int64)
    for k, row in enumerate(rows):
        cut = row[:width]
        pieces[k, : len(cut)] = cut
    counts = {rule: rules.count(rule) for rule in DECOMPOSITION_RULES}
    counts["truncated"] = int((lengths > width).sum())
    return Decomposition(pieces=pieces, num_pieces=np.minimum(lengths, width), counts=counts)


def _spell(base: ByteTokenizer, text: str) -> list[int]:
    """``text`` as the base tokenizer cuts it ([] when it cannot reproduce the bytes)."""
    try:
        return base.encode(text).ids.tolist()
    except ByteIdentityError:
        return []
