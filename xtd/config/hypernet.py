"""Settings of the hypernetwork pieces (:mod:`xtd.hypernet`): the tokenizer sampler, the
architecture, ``xtd hypernet train`` and ``xtd hypernet apply``."""

from __future__ import annotations

import dataclasses

from xtd.config._base import ConfigBase, device_problem, flag, option, section
from xtd.config.train import ALMSettings, DataSettings, OptimSettings
from xtd.errors import ConfigError

__all__ = ["SamplerConfig", "HypernetConfig", "HypernetApplyConfig", "HypernetTrainConfig", "HYPERNET_LOSSES", "RESIDUALS"]

HYPERNET_LOSSES = ("alm", "sft", "alm+sft")
"""``xtd hypernet train --losses`` choices: ALM against the store, SFT (the ZeTT baseline), or both."""

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class HypernetTrainConfig(ConfigBase):
    """Settings of ``xtd hypernet train``: a hypernetwork trained from teacher stores.

    Every step samples a tokenizer (or uses ``fixed_tokenizer``), predicts the embeddings
    of the tokens it needs and runs the frozen base model with them; only the
    hypernetwork trains (docs/method.md, "Hypernetworks").
    """

    store: tuple[str, ...] = option(
        metavar="STORE", help="Teacher store (path or fsspec URL); repeat to mix several in proportion to their size."
    )
    model: str = option(metavar="MODEL", help="Base model (frozen): HF id, folder, or embedded:smollm2.")
    out: str = option(short="-o", metavar="DIR", help="Run folder: the hypernetwork (hypernet.json, hypernet.safetensors), metrics.jsonl, checkpoints/.")
    losses: str = option("alm", metavar="LOSSES", help=f"Losses: {', '.join(HYPERNET_LOSSES)} (sft is the ZeTT baseline).")
    fixed_tokenizer: str | None = option(
        None, metavar="TOKENIZER", help="Train on this one tokenizer instead of sampling one per step (a check, or single-tokenizer transfer)."
    )
    max_vocab: int | None = option(
        8192, metavar="N", help="Tokens whose embeddings a step predicts: every used one and the specials, then random others up to N (the softmax's vocabulary); 0: the whole vocabulary."
    )
    architecture: HypernetConfig = section(HypernetConfig, help="The hypernetwork's architecture.")
    sampler: SamplerConfig = section(SamplerConfig, help="How training tokenizers are sampled.")
    alm: ALMSettings = section(ALMSettings, help="ALM: chunks, merging, debiasing, distance, boundary classes.")
    data: DataSettings = section(DataSettings, help="Texts per step, lengths, packing, long documents.")
    optim: OptimSettings = section(OptimSettings, help="AdamW and its schedule.")
    max_steps: int = option(1000, metavar="N", help="Optimizer steps; 0 saves the identity-initialised hypernetwork.")
    seed: int = option(0, metavar="N", help="Seed of the data order, the sampled tokenizers and the initialisation.")
    checkpoint_every: int = option(500, metavar="N", help="Write a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = option(2, metavar="N", help="Keep this many most recent checkpoints.")
    log_every: int = option(1, metavar="N", help="Log a line (and a metrics.jsonl record) every N steps.")
    resume: bool = option(False, help="Continue the run in --out from its latest checkpoint, with its saved settings.")
    overwrite: bool = option(False, help="Start afresh in an --out that holds a previous run.")
    amp: bool = option(True, help="bf16 autocast on CUDA for the base model's body (ignored on CPU).")
    device: str = option("auto", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (auto: the local rank's GPU when present).")

    def __post_init__(self) -> None:
        if isinstance(self.store, str):
            object.__setattr__(self, "store", (self.store,))
        problems: list[str] = []
        if not self.store:
            problems.append(f"{flag('store')} needs at least one teacher store")
        for name in ("model", "out"):
            if not str(getattr(self, name)).strip():
                problems.append(f"{flag(name)} must not be empty")
        if self.losses not in HYPERNET_LOSSES:
            problems.append(f"{flag('losses')} must be one of {', '.join(HYPERNET_LOSSES)}, not {self.losses!r}")
        if self.max_vocab is not None and self.max_vocab < 0:
            problems.append(f"{flag('max_vocab')} ({self.max_vocab}) must be ≥ 0 (0: the whole vocabulary)")
        for name in ("max_steps", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                problems.append(f"{flag(name)} ({getattr(self, name)}) must be ≥ 0")
        if self.log_every < 1:
            problems.append(f"{flag('log_every')} ({self.log_every}) must be ≥ 1")
        warmup = self.optim.warmup_steps
        if warmup is not None and self.max_steps > 0 and warmup >= self.max_steps:
            problems.append(f"{flag('warmup_steps')} ({warmup}) must be smaller than {flag('max_steps')} ({self.max_steps})")
        if self.resume and self.overwrite:
            problems.append(f"{flag('resume')} and {flag('overwrite')} exclude each other; pick one")
        problems.extend(device_problem(self.device))
        if problems:
            raise ConfigError("; ".join(problems))

    def loss_names(self) -> tuple[str, ...]:
        """The chosen losses, in order."""
        return tuple(self.losses.split("+"))

    @property
    def vocab_budget(self) -> int | None:
        """``max_vocab`` with 0 as None (the whole vocabulary)."""
        return self.max_vocab or None
