"""Settings of the hypernetwork pieces: the tokenizer sampler, the architecture, ``apply``.

Frozen dataclasses on :class:`xtd.config.ConfigBase` (dict/JSON round trip, every
unknown key reported at once); ``__post_init__`` names the flag of a bad value. They
live here until ``xtd hypernet train`` joins the shared training configuration.
"""

from __future__ import annotations

import dataclasses

from xtd.config import ConfigBase, device_problem, flag
from xtd.errors import ConfigError

__all__ = ["SamplerConfig", "HypernetConfig", "HypernetApplyConfig", "RESIDUALS"]

RESIDUALS = ("first", "mean")
"""What the hypernetwork's output is added to: the first piece's embedding (ZeTT) or the
mean of the pieces' embeddings (FVT)."""


def _positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{flag(name)} ({value}) must be positive")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig(ConfigBase):
    """How :class:`~xtd.hypernet.sampler.TokenizerSampler` draws training tokenizers.

    Every sampled tokenizer is a byte-level UnigramLM: the base tokenizer's special
    tokens at ids ``0..k-1``, then all 256 bytes, whitespace runs, then learned pieces:
    substrings of the pretokens of the last ``window_batches`` observed batches, ranked
    by frequency × length in bytes with log-normal noise (docs/method.md, "Hypernetworks").
    """

    vocab_size_mean: int = 32768
    """Mean of the vocabulary size (specials, bytes and whitespace runs included)."""
    vocab_size_std: int = 8192
    """Standard deviation of the vocabulary size (0: always the mean)."""
    vocab_size_min: int = 1024
    """Smallest vocabulary drawn."""
    vocab_size_max: int = 49152
    """Largest vocabulary drawn."""
    max_piece_bytes: int = 16
    """Longest learned piece, in bytes."""
    max_whitespace_run: int = 16
    """Runs of 2..N spaces, tabs and newlines are always in the vocabulary."""
    noise_median: float = 0.3
    """Median σ of the per-piece noise σ·ε added to log(frequency × length); σ itself is
    drawn log-normally per tokenizer, so some tokenizers are nearly frequency-ranked and
    others far from it."""
    noise_spread: float = 1.0
    """Standard deviation of log σ (0: every tokenizer has σ = noise_median)."""
    window_batches: int = 64
    """Substring statistics cover the pretokens of this many most recent batches."""

    def __post_init__(self) -> None:
        _positive(self, "vocab_size_mean", "vocab_size_min", "vocab_size_max", "max_piece_bytes", "window_batches")
        if self.vocab_size_std < 0:
            raise ConfigError(f"--vocab-size-std ({self.vocab_size_std}) must be ≥ 0")
        if not self.vocab_size_min <= self.vocab_size_mean <= self.vocab_size_max:
            raise ConfigError(
                f"--vocab-size-mean ({self.vocab_size_mean}) must lie between --vocab-size-min "
                f"({self.vocab_size_min}) and --vocab-size-max ({self.vocab_size_max})"
            )
        if self.max_piece_bytes < 2:
            raise ConfigError(f"--max-piece-bytes ({self.max_piece_bytes}) must be at least 2")
        if self.max_whitespace_run < 1:
            raise ConfigError(f"--max-whitespace-run ({self.max_whitespace_run}) must be at least 1")
        if self.noise_median < 0 or self.noise_spread < 0:
            raise ConfigError(
                f"--noise-median ({self.noise_median}) and --noise-spread ({self.noise_spread}) must be ≥ 0"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class HypernetConfig(ConfigBase):
    """Architecture of the embedding-prediction hypernetwork (saved with its weights).

    A pre-norm transformer encoder over the frozen base embeddings of a token's pieces;
    its first position, projected, is added to the residual (docs/method.md, "Hypernetworks").
    """

    max_pieces: int = 8
    """Pieces per token fed to the hypernetwork (longer decompositions are cut)."""
    num_layers: int = 3
    """Transformer layers."""
    num_heads: int = 16
    """Attention heads (must divide the model width)."""
    model_dim: int | None = None
    """Transformer width; default: the width of a token's embedding row (H tied, 2H untied)."""
    ffn_multiplier: int = 2
    """Feed-forward width = ffn_multiplier × model width."""
    residual: str = "first"
    """``first`` (E = E_in[0] + H(E_in), as ZeTT) or ``mean`` (E = mean(E_in) + H(E_in),
    which starts at FVT)."""

    def __post_init__(self) -> None:
        _positive(self, "max_pieces", "num_layers", "num_heads", "model_dim", "ffn_multiplier")
        if self.residual not in RESIDUALS:
            raise ConfigError(f"--residual must be one of {', '.join(RESIDUALS)}, not {self.residual!r}")
        if self.model_dim is not None and self.model_dim % self.num_heads:
            raise ConfigError(f"--num-heads ({self.num_heads}) must divide --model-dim ({self.model_dim})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HypernetApplyConfig(ConfigBase):
    """Settings of ``xtd hypernet apply``: zero-shot transfer of the base model to a tokenizer."""

    hypernet: str
    """Folder written by :func:`~xtd.hypernet.model.save_hypernet` (or ``xtd hypernet train``)."""
    tokenizer: str
    """Target tokenizer: HF id or folder, tokenizer.json, ``bytes``, ``embedded:<name>``."""
    out: str
    """Output folder: a Hugging Face model that AutoModelForCausalLM / AutoTokenizer load."""
    batch_tokens: int = 4096
    """Target tokens per hypernetwork forward pass (bounds memory)."""
    overwrite: bool = False
    """Replace a non-empty ``--out``."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N``; ``auto`` = CUDA when present."""

    def __post_init__(self) -> None:
        _positive(self, "batch_tokens")
        for name in ("hypernet", "tokenizer", "out"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{flag(name)} must not be empty")
        for problem in device_problem(self.device):
            raise ConfigError(problem)
