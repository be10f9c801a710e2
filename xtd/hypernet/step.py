"""What one hypernetwork training step needs from a sampled tokenizer and the step's texts.

:func:`prepare_step` tokenizes the texts with the step's tokenizer, chooses the target
vocabulary whose embeddings the hypernetwork predicts this step — every token the texts
use, the special tokens, and (with ``max_vocab``) random other tokens up to that many,
so the output softmax runs over a fixed-size sample of the vocabulary as ZeTT's
``n_token_subsample`` does; without ``max_vocab``, the whole vocabulary — and
decomposes them into base tokens. Token ids are remapped to rows of that vocabulary,
so a step's model runs on a (U, W) embedding table: input ids, labels and the boundary
mask of the ALM loss all index it.

Dimension letters: ``U`` target tokens predicted this step, ``S`` tokens of one text,
``L`` pieces per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xtd.errors import ConfigError
from xtd.hypernet.decomposition import Decomposer, Decomposition
from xtd.tokenization import ByteTokenizer, Encoding

__all__ = ["StepVocabulary", "choose_vocabulary", "prepare_step"]


@dataclass(frozen=True)
class StepVocabulary:
    """The target vocabulary of one step and the texts in its rows.

    Attributes:
        encodings: per text, the sampled tokenizer's ids (S,) and byte spans (S, 2)
            (what alignment with the teacher's spans takes).
        local_ids: per text, (S,) int64 rows of ``vocab_ids``: the model's input ids and
            labels this step.
        vocab_ids: (U,) int64 sorted target ids whose embeddings are predicted.
        used: (U,) bool, the token occurs in the texts (else it only widens the softmax).
        decomposition: base-token pieces of ``vocab_ids`` (row-aligned).
        boundary_class: (U,) int8 boundary class of each row (-1 none; index into
            :data:`xtd.tokenization.BOUNDARY_CLASSES`), for the student's boundary mask.
        stats: ``vocab_size`` (of the sampled tokenizer), ``predicted`` (U), ``used``,
            ``tokens``, ``bytes_per_token`` (text bytes per non-special token),
            ``mean_pieces``, ``truncated`` (decompositions cut at ``max_pieces``).
    """

    encodings: list[Encoding]
    local_ids: list[np.ndarray]
    vocab_ids: np.ndarray
    used: np.ndarray
    decomposition: Decomposition
    boundary_class: np.ndarray
    stats: dict[str, float]


def choose_vocabulary(
    tokenizer: ByteTokenizer,
    used_ids: np.ndarray,
    *,
    max_vocab: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The sorted target ids a step predicts: the used ones, the specials, and random others.

    Args:
        tokenizer: the step's tokenizer.
        used_ids: (N,) ids the step's texts use (any order, repeats allowed).
        max_vocab: at most this many ids (more only when the used ones and the specials
            are more); ``None`` for the whole vocabulary.
        rng: draws the extra ids (default: ``np.random.default_rng(0)``).

    Returns:
        (U,) int64 sorted ids.

    Raises:
        ConfigError: ``max_vocab`` not positive.
    """
    if max_vocab is not None and max_vocab <= 0:
        raise ConfigError(f"--max-vocab ({max_vocab}) must be positive")
    if max_vocab is None:
        return np.arange(tokenizer.vocab_size, dtype=np.int64)
    keep = np.union1d(np.asarray(used_ids, dtype=np.int64), tokenizer.special_ids)
    extra = max(max_vocab - keep.shape[0], 0)
    if extra:
        others = np.setdiff1d(np.arange(tokenizer.vocab_size), keep, assume_unique=True)
        rng = rng if rng is not None else np.random.default_rng(0)
        keep = np.union1d(keep, rng.choice(others, size=min(extra, others.shape[0]), replace=False))
    return keep.astype(np.int64)


def prepare_step(
    tokenizer: ByteTokenizer,
    decomposer: Decomposer,
    texts: Sequence[str],
    *,
    max_vocab: int | None = None,
    rng: np.random.Generator | None = None,
    add_special_tokens: bool = False,
) -> StepVocabulary:
    """Tokenize a step's texts and choose and decompose the vocabulary it predicts.

    Args:
        tokenizer: the step's (sampled) tokenizer.
        decomposer: decomposes into the base model's ids, at most ``max_pieces`` each
            (one per run: it caches what earlier steps decomposed).
        texts: the step's texts.
        max_vocab: predict at most this many tokens: the used ones and the specials,
            then random others (drawn from ``rng``) up to this size; ``None`` for the
            whole vocabulary. When the texts use more tokens, all of them are kept.
        rng: draws the extra tokens (default: ``np.random.default_rng(0)``).
        add_special_tokens: let the tokenizer add its bos/eos template.

    Returns:
        The :class:`StepVocabulary`.

    Raises:
        ConfigError: ``max_vocab`` not positive.
        ByteIdentityError: the tokenizer does not reproduce a text.
    """
    encodings = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    flat = np.concatenate([e.ids for e in encodings] + [np.zeros(0, np.int32)]).astype(np.int64)
    used_ids = np.unique(flat)
    vocab_ids = choose_vocabulary(tokenizer, used_ids, max_vocab=max_vocab, rng=rng)
    used = np.isin(vocab_ids, used_ids)
    decomposition = decomposer(tokenizer, vocab_ids)
    local_ids = [np.searchsorted(vocab_ids, e.ids.astype(np.int64)) for e in encodings]

    text_tokens = flat[~tokenizer.special_mask(flat)] if flat.size else flat
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    stats = {
        "vocab_size": float(tokenizer.vocab_size),
        "predicted": float(vocab_ids.shape[0]),
        "used": float(used.sum()),
        "tokens": float(flat.shape[0]),
        "bytes_per_token": num_bytes / max(text_tokens.shape[0], 1),
        "mean_pieces": float(decomposition.num_pieces.mean()) if len(decomposition) else 0.0,
        "truncated": float(decomposition.counts["truncated"]),
    }
    return StepVocabulary(
        encodings=encodings,
        local_ids=local_ids,
        vocab_ids=vocab_ids,
        used=used,
        decomposition=decomposition,
        boundary_class=tokenizer.boundary_class[vocab_ids],
        stats=stats,
    )
