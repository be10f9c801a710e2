"""Settings of the hypernetwork pieces (:mod:`xtd.hypernet`): the tokenizer sampler, the
architecture, and ``xtd hypernet apply``."""

from __future__ import annotations

import dataclasses

from xtd.config._base import ConfigBase, device_problem, flag, option
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

    vocab_size_mean: int = option(32768, metavar="N", help="Mean of the vocabulary size (specials, bytes and whitespace runs included).")
    vocab_size_std: int = option(8192, metavar="N", help="Standard deviation of the vocabulary size (0: always the mean).")
    vocab_size_min: int = option(1024, metavar="N", help="Smallest vocabulary drawn.")
    vocab_size_max: int = option(49152, metavar="N", help="Largest vocabulary drawn.")
    max_piece_bytes: int = option(16, metavar="N", help="Longest learned piece, in bytes.")
    max_whitespace_run: int = option(16, metavar="N", help="Runs of 2..N spaces, tabs and newlines are always in the vocabulary.")
    noise_median: float = option(0.3, metavar="X", help="Median σ of the per-piece noise σ·ε added to log(frequency × length); σ itself is drawn log-normally per tokenizer, so some tokenizers are nearly frequency-ranked and others far from it.")
    noise_spread: float = option(1.0, metavar="X", help="Standard deviation of log σ (0: every tokenizer has σ = noise_median).")
    window_batches: int = option(64, metavar="N", help="Substring statistics cover the pretokens of this many most recent batches.")

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

    max_pieces: int = option(8, metavar="N", help="Pieces per token fed to the hypernetwork (longer decompositions are cut).")
    num_layers: int = option(3, metavar="N", help="Transformer layers.")
    num_heads: int = option(16, metavar="N", help="Attention heads (must divide the model width).")
    model_dim: int | None = option(None, metavar="N", help="Transformer width; default: the width of a token's embedding row (H tied, 2H untied).")
    ffn_multiplier: int = option(2, metavar="N", help="Feed-forward width = ffn_multiplier × model width.")
    residual: str = option("first", help="first (E = E_in[0] + H(E_in), as ZeTT) or mean (E = mean(E_in) + H(E_in), which starts at FVT).")

    def __post_init__(self) -> None:
        _positive(self, "max_pieces", "num_layers", "num_heads", "model_dim", "ffn_multiplier")
        if self.residual not in RESIDUALS:
            raise ConfigError(f"--residual must be one of {', '.join(RESIDUALS)}, not {self.residual!r}")
        if self.model_dim is not None and self.model_dim % self.num_heads:
            raise ConfigError(f"--num-heads ({self.num_heads}) must divide --model-dim ({self.model_dim})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HypernetApplyConfig(ConfigBase):
    """Settings of ``xtd hypernet apply``: zero-shot transfer of the base model to a tokenizer."""

    hypernet: str = option(metavar="DIR", help="Folder written by :func:`~xtd.hypernet.model.save_hypernet` (or xtd hypernet train).")
    tokenizer: str = option(metavar="TOKENIZER", help="Target tokenizer: HF id or folder, tokenizer.json, bytes, embedded:<name>.")
    out: str = option(short="-o", metavar="DIR", help="Output folder: a Hugging Face model that AutoModelForCausalLM / AutoTokenizer load.")
    batch_tokens: int = option(4096, metavar="N", help="Target tokens per hypernetwork forward pass (bounds memory).")
    overwrite: bool = option(False, help="Replace a non-empty --out.")
    device: str = option("auto", metavar="DEVICE", help="cpu, cuda, cuda:N; auto = CUDA when present.")

    def __post_init__(self) -> None:
        _positive(self, "batch_tokens")
        for name in ("hypernet", "tokenizer", "out"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"{flag(name)} must not be empty")
        for problem in device_problem(self.device):
            raise ConfigError(problem)
