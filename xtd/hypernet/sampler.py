"""Diverse training tokenizers for the hypernetwork, drawn from recent text.

A hypernetwork generalises to unseen tokenizers only if it is trained on many
segmentations (docs/method.md, "Hypernetworks"). :class:`TokenizerSampler` keeps the
pretokens of the last ``window_batches`` batches it has observed (the GPT-2 byte-level
split, so every byte is one character) and, per :meth:`~TokenizerSampler.sample`, draws
a byte-level UnigramLM tokenizer:

1. every substring of 2..``max_piece_bytes`` bytes of a window pretoken is a candidate
   piece, with frequency f = Σ over pretokens of (pretoken count × occurrences);
2. a noise level σ = ``noise_median`` · exp(``noise_spread`` · z) is drawn per tokenizer,
   and each candidate gets the noisy score log(f · bytes) + σ·ε;
3. the vocabulary size V is drawn from a normal, clipped to [min, max]; the V − k − 256 − w
   best-scoring candidates join the base tokenizer's k special tokens (ids ``0..k-1``,
   the same names and bos/eos/pad roles), the 256 bytes and w whitespace runs;
4. each piece's UnigramLM log-probability is its noisy log-frequency, normalised.

Frequencies come from one ``np.bincount`` over a table of (piece, pretoken, occurrences)
rows that grows only when a new pretoken is seen, so observing and sampling stay cheap
once the corpus's common words are known. The tokenizers are ordinary
:class:`~xtd.tokenization.ByteTokenizer` objects (kind ``byte_level``): alignment and
saving work on them unchanged.

Dimension letters: ``P`` pretokens known, ``Q`` pieces known, ``R`` table rows.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xtd.config import SamplerConfig
from xtd.embedded_tokenizers import bytes_to_unicode, wrap_backend
from xtd.errors import TokenizerError
from xtd.tokenization import ByteTokenizer

__all__ = ["SampledTokenizer", "TokenizerSampler", "pretokenize"]

_WHITESPACE = (" ", "\t", "\n")
_SPECIAL_SCORE = -1e6  # specials are matched as added tokens, never by the Viterbi search
_COMPACT_MIN_DEAD = 20_000  # rebuild the table once this many (and more than live) pretokens left the window


def _pretokenizer() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def pretokenize(texts: Sequence[str]) -> collections.Counter[str]:
    """Counts of the byte-level pretokens of ``texts`` (GPT-2 split, one char per byte)."""
    split = _pretokenizer()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(piece for piece, _ in split.pre_tokenize_str(text))
    return counts


@dataclass(frozen=True)
class SampledTokenizer:
    """One sampled tokenizer and how it was drawn.

    Attributes:
        tokenizer: the tokenizer (specials at ids ``0..k-1``, then bytes, whitespace
            runs and learned pieces).
        num_learned: learned pieces (beyond specials, bytes and whitespace runs).
        noise_std: σ of the score noise drawn for this tokenizer.
        num_candidates: candidate pieces the window offered.
    """

    tokenizer: ByteTokenizer
    num_learned: int
    noise_std: float
    num_candidates: int

    def stats(self) -> dict[str, float]:
        """Metrics of this draw: ``vocab_size``, ``learned``, ``noise_std``, ``candidates``."""
        return {
            "vocab_size": float(self.tokenizer.vocab_size),
            "learned": float(self.num_learned),
            "noise_std": self.noise_std,
            "candidates": float(self.num_candidates),
        }


class TokenizerSampler:
    """Seeded sampler of byte-level UnigramLM tokenizers from recent batches' pretokens.

    Args:
        base: the base model's tokenizer; its special tokens (names and bos/eos/pad/unk
            roles) are copied to ids ``0..k-1`` of every sampled tokenizer.
        config: sizes, noise and window (:class:`~xtd.config.SamplerConfig`).

    Example::

        sampler = TokenizerSampler(base_tokenizer, SamplerConfig(vocab_size_mean=4096))
        sampler.observe(batch_texts)
        drawn = sampler.sample(np.random.default_rng([seed, step]))
    """

    def __init__(self, base: ByteTokenizer, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()
        self._b2u = bytes_to_unicode()
        self._specials, self._roles = _special_tokens(base)
        runs = [c * n for c in _WHITESPACE for n in range(2, self.config.max_whitespace_run + 1)]
        self._fixed = [self._b2u[b] for b in range(256)] + [self._chars(r) for r in [*runs, "\r\n"]]
        self._fixed_set = set(self._fixed) | set(self._specials)  # never learned pieces
        if len(self._specials) + len(self._fixed) > self.config.vocab_size_min:
            raise TokenizerError(
                f"--vocab-size-min ({self.config.vocab_size_min}) is smaller than the {len(self._specials)} "
                f"special tokens, 256 bytes and {len(self._fixed) - 256} whitespace runs every sampled "
                "tokenizer holds; raise it or lower --max-whitespace-run"
            )
        self._reset_tables()
        self._window: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque()
        self._weight = np.zeros(0, dtype=np.float64)  # (P,) pretoken count in the window

    # -- statistics -------------------------------------------------------------------

    def _chars(self, text: str) -> str:
        return "".join(self._b2u[b] for b in text.encode("utf-8"))

    def _reset_tables(self) -> None:
        self._pretoken_id: dict[str, int] = {}
        self._pretokens: list[str] = []
        self._piece_id: dict[str, int] = {}
        self._pieces: list[str] = []
        self._piece_bytes: list[int] = []
        self._piece_learnable: list[bool] = []  # not a byte, whitespace run or special
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (piece, pretoken, occurrences)
        self._table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def num_pretokens(self) -> int:
        """Distinct pretokens in the window."""
        return int((self._weight > 0).sum())

    def observe(self, texts: Sequence[str]) -> None:
        """Add one batch's pretokens to the window (dropping the oldest batch when full)."""
        counts = pretokenize(texts)
        ids = np.fromiter((self._pretoken(p) for p in counts), np.int64, len(counts))
        values = np.fromiter(counts.values(), np.float64, len(counts))
        if self._weight.shape[0] < len(self._pretokens):
            self._weight = np.concatenate([self._weight, np.zeros(len(self._pretokens) - self._weight.shape[0])])
        np.add.at(self._weight, ids, values)
        self._window.append((ids, values))
        while len(self._window) > self.config.window_batches:
            old_ids, old_values = self._window.popleft()
            np.subtract.at(self._weight, old_ids, old_values)
        dead = len(self._pretokens) - self.num_pretokens
        if dead >= max(_COMPACT_MIN_DEAD, self.num_pretokens):
            self._compact()

    def _pretoken(self, text: str) -> int:
        """Id of a pretoken; a new one has its substrings added to the table."""
        found = self._pretoken_id.get(text)
        if found is not None:
            return found
        ident = len(self._pretokens)
        self._pretoken_id[text] = ident
        self._pretokens.append(text)
        n, longest = len(text), self.config.max_piece_bytes
        subs = collections.Counter(text[i:j] for i in range(n) for j in range(i + 1, min(n, i + longest) + 1))
        pieces = np.fromiter((self._piece(s) for s in subs), np.int64, len(subs))
        occurrences = np.fromiter(subs.values(), np.float64, len(subs))
        self._rows.append((pieces, np.full(len(subs), ident, dtype=np.int64), occurrences))
        self._table = None
        return ident

    def _piece(self, text: str) -> int:
        found = self._piece_id.get(text)
        if found is None:
            found = self._piece_id[text] = len(self._pieces)
            self._pieces.append(text)
            self._piece_bytes.append(len(text))
            self._piece_learnable.append(len(text) >= 2 and text not in self._fixed_set)
        return found

    def _compact(self) -> None:
        """Forget pretokens that left the window (and pieces only they held)."""
        live = np.flatnonzero(self._weight > 0)
        texts = [self._pretokens[i] for i in live]
        remap = np.full(len(self._pretokens), -1, dtype=np.int64)
        self._reset_tables()
        for i, text in zip(live, texts, strict=True):
            remap[i] = self._pretoken(text)
        self._weight = self._weight[live]
        self._window = collections.deque((remap[ids], values) for ids, values in self._window)

    def frequencies(self) -> dict[str, float]:
        """Window frequency of every known substring, as byte-level strings (for inspection and tests)."""
        freq = self._frequency_array()
        return {self._pieces[i]: float(freq[i]) for i in np.flatnonzero(freq > 0)}

    def _frequency_array(self) -> np.ndarray:
        """(Q,) float64: Σ over window pretokens of count × occurrences, per piece."""
        if self._table is None:
            if self._rows:
                self._table = tuple(np.concatenate(cols) for cols in zip(*self._rows, strict=True))  # type: ignore[assignment]
                self._rows = [self._table]  # type: ignore[list-item]
            else:
                empty = np.zeros(0, dtype=np.int64)
                self._table = (empty, empty, np.zeros(0))
        piece, pretoken, occurrences = self._table
        weight = np.zeros(len(self._pretokens))
        weight[: self._weight.shape[0]] = self._weight
        return np.bincount(piece, weights=weight[pretoken] * occurrences, minlength=len(self._pieces))

    # -- sampling ---------------------------------------------------------------------

    def sample(self, rng: np.random.Generator) -> SampledTokenizer:
        """Draw one tokenizer from the window's statistics.

        Args:
            rng: the only source of randomness (vocabulary size, σ, per-piece noise): the
                same observations and generator state give the same tokenizer.

        Returns:
            The :class:`SampledTokenizer`.
        """
        cfg = self.config
        freq = self._frequency_array()  # (Q,)
        num_bytes = np.asarray(self._piece_bytes, dtype=np.float64)
        candidates = np.flatnonzero((freq > 0) & np.asarray(self._piece_learnable, dtype=bool))

        sigma = cfg.noise_median * math.exp(cfg.noise_spread * rng.standard_normal())
        vocab_size = int(np.clip(round(rng.normal(cfg.vocab_size_mean, cfg.vocab_size_std)), cfg.vocab_size_min, cfg.vocab_size_max))
        noise = sigma * rng.standard_normal(candidates.shape[0])
        log_freq = np.log(freq[candidates]) + noise
        score = log_freq + np.log(num_bytes[candidates])
        n_learned = min(max(vocab_size - len(self._specials) - len(self._fixed), 0), candidates.shape[0])
        chosen = np.argpartition(-score, n_learned - 1)[:n_learned] if 0 < n_learned < score.shape[0] else np.arange(n_learned)
        chosen = chosen[np.lexsort((chosen, -score[chosen]))]  # best first; ties by table order

        learned = [(self._pieces[candidates[i]], float(log_freq[i])) for i in chosen]
        fixed_freq = [freq[self._piece_id[p]] if p in self._piece_id else 0.0 for p in self._fixed]
        floor = min([lp for _, lp in learned] + [math.log(f) for f in fixed_freq if f > 0] + [0.0]) - 1.0
        fixed_pieces = [(p, math.log(f) if f > 0 else floor) for p, f in zip(self._fixed, fixed_freq, strict=True)]
        scored = fixed_pieces + learned
        norm = _logsumexp([s for _, s in scored])
        vocab = [(name, _SPECIAL_SCORE) for name in self._specials] + [(p, s - norm) for p, s in scored]
        tokenizer = self._build(vocab, f"sampled(V={len(vocab)}, sigma={sigma:.3g})")
        return SampledTokenizer(tokenizer, num_learned=n_learned, noise_std=sigma, num_candidates=int(candidates.shape[0]))

    def _build(self, vocab: list[tuple[str, float]], name: str) -> ByteTokenizer:
        from tokenizers import AddedToken, Tokenizer, decoders, models

        backend = Tokenizer(models.Unigram(vocab, unk_id=None, byte_fallback=False))
        backend.pre_tokenizer = _pretokenizer()
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in self._specials])
        return ByteTokenizer(wrap_backend(backend, **self._roles), name)


def _special_tokens(base: ByteTokenizer) -> tuple[list[str], dict[str, str | None]]:
    """The base tokenizer's special-token strings (id order) and their roles."""
    names = [str(base.hf.convert_ids_to_tokens(int(i))) for i in base.special_ids]

    def name_of(ident: int | None) -> str | None:
        return None if ident is None or ident not in base.special_ids else str(base.hf.convert_ids_to_tokens(ident))

    unk = getattr(base.hf, "unk_token_id", None)
    roles = {
        "bos_token": name_of(base.bos_id),
        "eos_token": name_of(base.eos_id),
        "pad_token": name_of(base.pad_id),
        "unk_token": name_of(unk),
    }
    return names, roles


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
