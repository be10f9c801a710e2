"""The embedding-prediction hypernetwork, its frozen base model, saving and loading.

:class:`Hypernet` predicts a target token's embedding row — input embedding, output
embedding when the base model's are untied, output bias when it has one: the layout of
:func:`xtd.fvt.embedding_table` — from the frozen base rows of its pieces
(:mod:`xtd.hypernet.decomposition`), as ZeTT does (Minixhofer, Ponti and Vulić 2024;
docs/method.md, "Hypernetworks"):

    E(t) = R(E_base[p_1..p_n]) + σ ⊙ W_out · LN(h_1),
    h = Transformer(W_in · (E_base[p_1..p_n] − μ) / σ + P)

where ``R`` is the first piece's row (``residual="first"``, ZeTT's E_in[0]) or the mean
of the rows (``"mean"``, where FVT starts), μ and σ the per-column mean and standard
deviation of the base table, ``P`` learned position embeddings, and the transformer a
pre-norm encoder with a padding mask. A byte the base vocabulary lacks is read through a
learned byte row (:mod:`xtd.hypernet.decomposition`). ``W_out`` starts at zero, so a new hypernetwork is
the identity on single-piece tokens: for the base tokenizer itself it reproduces the
base embeddings exactly.

A saved hypernetwork is a folder with ``hypernet.json`` (format, version, the
architecture config, the base model and its tokenizer digest and embedding layout) and
``hypernet.safetensors`` (the trainable weights; the base table is rebuilt from the base
model, which is named, not copied).

Dimension letters: ``N`` target tokens, ``L`` pieces per token, ``W`` embedding-row
width, ``D`` hypernetwork width, ``V`` base vocabulary.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from xtd.config import HypernetConfig
from xtd.errors import ConfigError, ModelLoadError, TokenizerError, TokenizerMismatchError
from xtd.fvt import EmbeddingLayout, embedding_table
from xtd.hypernet.decomposition import Decomposer, Decomposition
from xtd.student import load_causal_lm, model_tokenizer, write_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from xtd.tokenization import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "HYPERNET_FORMAT",
    "HYPERNET_FORMAT_VERSION",
    "Hypernet",
    "HypernetBundle",
    "build_hypernet",
    "save_hypernet",
    "load_hypernet",
]

HYPERNET_FORMAT = "xtd-hypernet"
HYPERNET_FORMAT_VERSION = 1
_CONFIG_FILE = "hypernet.json"
_WEIGHTS_FILE = "hypernet.safetensors"


class Hypernet(nn.Module):
    """Predicts embedding rows of target tokens from the frozen base rows of their pieces.

    Args:
        config: the architecture.
        source: (V, W) the base model's embedding table (:func:`xtd.fvt.embedding_table`);
            kept as a frozen, non-persistent buffer.
        layout: the column layout of ``source`` (and of the predictions).

    Raises:
        ConfigError: ``config.num_heads`` does not divide the width.
    """

    def __init__(self, config: HypernetConfig, source: torch.Tensor, layout: EmbeddingLayout) -> None:
        super().__init__()
        width = layout.width
        if source.ndim != 2 or source.shape[1] != width:
            raise ValueError(f"source table has shape {tuple(source.shape)}, expected (V, {width})")
        dim = config.model_dim or layout.hidden_size * (2 if layout.separate_output else 1)
        if dim % config.num_heads:
            raise ConfigError(
                f"--num-heads ({config.num_heads}) must divide the hypernetwork width {dim} "
                "(--model-dim; default: the base model's embedding width)"
            )
        self.config = config
        self.layout = layout
        source = source.detach().float()
        self.register_buffer("source", source, persistent=False)  # (V, W)
        self.register_buffer("source_mean", source.mean(0), persistent=False)  # (W,)
        self.register_buffer("source_std", source.std(0, unbiased=False).clamp(min=1e-6), persistent=False)
        self.num_base = source.shape[0]
        # Byte rows (pieces V + b): learned rows for bytes the base vocabulary lacks,
        # drawn around the base table's per-column statistics.
        self.byte_rows = nn.Parameter(torch.randn(256, width) * self.source_std + self.source_mean)  # (256, W)
        self.in_proj = nn.Linear(width, dim)
        self.position = nn.Parameter(torch.randn(config.max_pieces, dim) * 0.02)  # (L_max, D)
        layer = nn.TransformerEncoderLayer(
            dim,
            config.num_heads,
            dim_feedforward=config.ffn_multiplier * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, width)
        nn.init.zeros_(self.out_proj.weight)  # identity at initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, pieces: torch.Tensor) -> torch.Tensor:
        """Embedding rows of target tokens.

        Args:
            pieces: (N, L) int64 base ids (``V + b`` for the byte row of byte ``b``), ``-1``
                after a token's last piece; every token has at least one piece and
                ``L ≤ config.max_pieces``.

        Returns:
            (N, W) float32 rows in the layout of the base table.
        """
        pad = pieces < 0  # (N, L)
        ids = pieces.clamp(min=0)
        is_byte_row = (ids >= self.num_base).unsqueeze(-1)  # (N, L, 1)
        rows = torch.where(
            is_byte_row,
            self.byte_rows[(ids - self.num_base).clamp(0, 255)],
            self.source[ids.clamp(max=self.num_base - 1)],
        )  # (N, L, W)
        h = self.in_proj((rows - self.source_mean) / self.source_std) + self.position[: pieces.shape[1]]  # (N, L, D)
        h = self.encoder(h, src_key_padding_mask=pad)
        delta = self.out_proj(self.norm(h[:, 0])) * self.source_std  # (N, W)
        if self.config.residual == "first":
            residual = rows[:, 0]
        else:
            keep = (~pad).unsqueeze(-1).to(rows.dtype)  # (N, L, 1)
            residual = (rows * keep).sum(1) / keep.sum(1)
        return residual + delta


@dataclass
class HypernetBundle:
    """A hypernetwork with the frozen base model and tokenizer it belongs to.

    Attributes:
        hypernet: the :class:`Hypernet` (trainable).
        model: the base causal LM (frozen; its own embeddings are the hypernetwork's source).
        tokenizer: the base model's tokenizer (the pieces are its ids).
        base_model: the spec the base model is loaded from (saved with the hypernetwork).
        decomposer: decomposes target tokens into the base's ids (``max_pieces`` of the
            config), caching by byte view across calls.
    """

    hypernet: Hypernet
    model: PreTrainedModel
    tokenizer: ByteTokenizer
    base_model: str

    def __post_init__(self) -> None:
        self.decomposer = Decomposer(self.tokenizer, max_pieces=self.hypernet.config.max_pieces)

    @property
    def layout(self) -> EmbeddingLayout:
        """Column layout of the predicted rows."""
        return self.hypernet.layout

    def decompose(self, target: ByteTokenizer, ids: Sequence[int] | np.ndarray | None = None) -> Decomposition:
        """Base-token pieces of ``target`` tokens, cut at the hypernetwork's ``max_pieces``."""
        return self.decomposer(target, ids)

    @torch.no_grad()
    def predict(
        self,
        target: ByteTokenizer,
        ids: Sequence[int] | np.ndarray | None = None,
        *,
        batch_tokens: int = 4096,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, Decomposition]:
        """Predicted embedding rows of ``target`` tokens (inference; training calls the module).

        Tokens are run in batches of ``batch_tokens``, shortest decompositions together,
        each batch padded only to its own longest decomposition.

        Args:
            target: the tokenizer whose tokens are embedded.
            ids: target ids; ``None`` for ``0..V-1``.
            batch_tokens: tokens per forward pass.
            progress: called with (tokens done, tokens in total) after each batch.

        Returns:
            ``(rows, decomposition)``: rows (N, W) float32 on the hypernetwork's device.
        """
        dec = self.decompose(target, ids)
        device = self.hypernet.source.device
        was_training = self.hypernet.training
        self.hypernet.eval()
        out = torch.empty(len(dec), self.layout.width, device=device)
        order = np.argsort(dec.num_pieces, kind="stable")
        try:
            for start in range(0, len(dec), batch_tokens):
                idx = order[start : start + batch_tokens]
                width = int(dec.num_pieces[idx].max())
                pieces = torch.from_numpy(np.ascontiguousarray(dec.pieces[idx, :width])).to(device)
                out[torch.from_numpy(idx).to(device)] = self.hypernet(pieces)
                if progress is not None:
                    progress(min(start + batch_tokens, len(dec)), len(dec))
        finally:
            self.hypernet.train(was_training)
        return out, dec


def build_hypernet(
    base_model: str | os.PathLike[str], config: HypernetConfig | None = None, *, seed: int = 0
) -> HypernetBundle:
    """A new hypernetwork for a base model, identity on single-piece tokens.

    Args:
        base_model: HF id, folder or ``embedded:smollm2``; loaded in float32 and frozen.
        config: the architecture (defaults: :class:`HypernetConfig`).
        seed: seeds the hypernetwork's initialisation (the global RNG is left untouched).

    Raises:
        ModelLoadError, TokenizerError: the base model or its tokenizer cannot be loaded.
        ConfigError: an architecture that does not fit the base model.
    """

    spec = _portable_spec(base_model)
    model = load_causal_lm(spec)
    tokenizer = model_tokenizer(spec)
    source, layout = _frozen_source(model, tokenizer, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hypernet = Hypernet(config or HypernetConfig(), source, layout)
    return HypernetBundle(hypernet=hypernet, model=model, tokenizer=tokenizer, base_model=spec)


def _portable_spec(spec: str | os.PathLike[str]) -> str:
    """A local folder as an absolute path (the saved hypernetwork must find it again)."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def _frozen_source(model: PreTrainedModel, tokenizer: ByteTokenizer, spec: str) -> tuple[torch.Tensor, EmbeddingLayout]:
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > rows:
        raise TokenizerError(
            f"base model {spec!r} has {rows} embedding rows but its tokenizer has {tokenizer.vocab_size} ids"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    return embedding_table(model, tokenizer.vocab_size)


def save_hypernet(
    bundle: HypernetBundle,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the hypernetwork (config and weights, not the base model) as a folder, whole or not at all.

    Args:
        bundle: what :func:`build_hypernet` or :func:`load_hypernet` returned.
        out_dir: the folder to create.
        overwrite: replace a non-empty ``out_dir``.
        metadata: JSON-able facts to record (e.g. the training config).

    Raises:
        ConfigError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    from xtd import __version__

    record = {
        "format": HYPERNET_FORMAT,
        "format_version": HYPERNET_FORMAT_VERSION,
        "xtd_version": __version__,
        "config": bundle.hypernet.config.to_dict(),
        "base": {
            "model": bundle.base_model,
            "tokenizer_digest": bundle.tokenizer.digest,
            "vocab_size": bundle.tokenizer.vocab_size,
            **_layout_dict(bundle.layout),
        },
        "metadata": metadata or {},
    }
    weights = {k: v.detach().cpu().contiguous() for k, v in bundle.hypernet.state_dict().items()}

    def fill(staging: Path) -> None:
        save_file(weights, str(staging / _WEIGHTS_FILE))
        (staging / _CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")

    out = write_folder(out_dir, fill, overwrite=overwrite)
    logger.info("saved hypernetwork to %s", out)
    return out


def _layout_dict(layout: EmbeddingLayout) -> dict[str, Any]:
    return {
        "hidden_size": layout.hidden_size,
        "separate_output": layout.separate_output,
        "output_bias": layout.output_bias,
    }


def read_hypernet_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``hypernet.json`` of a saved hypernetwork, checked for format and version.

    Raises:
        ModelLoadError: no hypernetwork there, or one of another format or version.
    """
    path = Path(folder) / _CONFIG_FILE
    if not path.is_file() or not (Path(folder) / _WEIGHTS_FILE).is_file():
        raise ModelLoadError(
            f"no hypernetwork at {str(folder)!r}: it needs {_CONFIG_FILE} and {_WEIGHTS_FILE}; pass a "
            "folder written by xtd hypernet train (or xtd.hypernet.save_hypernet)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != HYPERNET_FORMAT:
        raise ModelLoadError(f"{str(path)!r} is not an xtd hypernetwork (format {HYPERNET_FORMAT!r} expected)")
    if record.get("format_version") != HYPERNET_FORMAT_VERSION:
        raise ModelLoadError(
            f"hypernetwork {str(folder)!r} is format_version {record.get('format_version')}; this xtd "
            f"reads version {HYPERNET_FORMAT_VERSION} — use the xtd that wrote it"
        )
    return record


def load_hypernet(folder: str | os.PathLike[str], *, base_model: str | None = None) -> HypernetBundle:
    """Load a saved hypernetwork with its base model (frozen, float32, on the CPU).

    Args:
        folder: what :func:`save_hypernet` wrote.
        base_model: load the base model from here instead of the recorded spec (a moved
            folder); its tokenizer and embedding layout must match the recorded ones.

    Raises:
        ModelLoadError: not a hypernetwork folder, or weights that do not fit.
        TokenizerMismatchError: the base model's tokenizer is not the one it was built on.
        ConfigError: an invalid recorded config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    record = read_hypernet_record(folder)
    config = HypernetConfig.from_dict(record["config"])
    base = record["base"]
    spec = base_model if base_model is not None else base["model"]
    model = load_causal_lm(spec)
    tokenizer = model_tokenizer(spec)
    if tokenizer.digest != base["tokenizer_digest"]:
        raise TokenizerMismatchError(
            f"base model {spec!r} has tokenizer digest {tokenizer.digest}, but hypernetwork "
            f"{str(folder)!r} was built on {base['tokenizer_digest']}; pass the base model it was trained with"
        )
    source, layout = _frozen_source(model, tokenizer, spec)
    want = {k: base[k] for k in ("hidden_size", "separate_output", "output_bias")}
    if _layout_dict(layout) != want:
        raise ModelLoadError(
            f"base model {spec!r} lays out its embeddings as {_layout_dict(layout)}, but hypernetwork "
            f"{str(folder)!r} predicts {want}"
        )
    hypernet = Hypernet(config, source, layout)
    try:
        hypernet.load_state_dict(load_file(str(Path(folder) / _WEIGHTS_FILE)))
    except (RuntimeError, OSError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"hypernetwork weights in {str(folder)!r} do not fit its config: {first}") from None
    return HypernetBundle(hypernet=hypernet, model=model, tokenizer=tokenizer, base_model=str(spec))
