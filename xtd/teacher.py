"""Load a teacher LM: resolve a name to a folder, tokenizer and weights digest, and load
it for scoring (:mod:`xtd.scoring` runs it over documents).

Names are Hugging Face ids or folders, or ``embedded:smollm2`` (the packaged
SmolLM2-135M-Instruct, converted once from GGUF). The loaded :class:`Teacher` keeps the
output-layer rows of the tokenizer's ids (padded embedding rows dropped), so scoring can
apply the head to gathered positions only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xtd.assets import DEFAULT_TEACHER, embedded_teacher_dir
from xtd.config import canonical_dtype
from xtd.errors import ModelLoadError, TokenizerMismatchError
from xtd.runtime import resolve_device, resolve_dtype, torch_dtype
from xtd.tokenization import BOUNDARY_CLASSES, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "Teacher",
    "TeacherSource",
    "resolve_teacher",
    "load_teacher",
    "weights_digest",
]

_EMBEDDED_PREFIX = "embedded:"


@dataclass
class TeacherSource:
    """A resolved teacher before its weights are loaded (cheap: config, tokenizer, digest).

    Attributes:
        name: what the user asked for (``embedded:smollm2``, a hub id or a folder).
        folder: the local folder that holds config, tokenizer and weights.
        revision: the requested revision, or the hub snapshot commit; None for folders.
        tokenizer: the teacher tokenizer as a :class:`~xtd.tokenization.ByteTokenizer`.
        weights_digest: 16 hex chars identifying the weights (see :func:`weights_digest`).
        config: the transformers config.
    """

    name: str
    folder: Path
    revision: str | None
    tokenizer: Any
    weights_digest: str
    config: Any

    @property
    def vocab_size(self) -> int:
        """The softmax width: the tokenizer's number of ids."""
        return int(self.tokenizer.vocab_size)

    @property
    def hidden_size(self) -> int | None:
        """The model's hidden size from its config."""
        try:
            return int(self.config.get_text_config().hidden_size)
        except (AttributeError, TypeError, ValueError):
            return None

    def describe(self, dtype: str) -> dict[str, Any]:
        """The ``teacher`` store attribute (known before the weights load)."""
        architectures = getattr(self.config, "architectures", None) or [None]
        return {
            "name": self.name,
            "revision": self.revision,
            "weights_digest": self.weights_digest,
            "dtype": dtype,
            "vocab_size": self.vocab_size,
            "model_vocab_size": getattr(self.config.get_text_config(), "vocab_size", None),
            "hidden_size": self.hidden_size,
            "architecture": architectures[0],
            "tokenizer_digest": self.tokenizer.digest,
        }

    @property
    def max_positions(self) -> int | None:
        """The model's context length from its config, when it states one."""
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


@dataclass
class Teacher:
    """A loaded teacher: the model, its byte-view tokenizer and what the store records.

    Attributes:
        source: the :class:`TeacherSource` it was loaded from.
        model: the transformers causal LM, in eval mode.
        device: where it runs.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the precision of the forward pass.
        autocast_dtype: the torch autocast dtype, or None (weights already in ``dtype``).
        split_head: True when the output layer is applied by xtd to gathered positions
            (checked equal to the model's own logits at load); False: the model's full
            forward is used.
        head_weight: (V, H) output-layer rows of the tokenizer's ids.
        head_bias: (V,) its bias, or None.
        class_matrix: (V, 1 + C) float32 ones column, then one indicator column per
            boundary class (the normaliser and class masses in one product).
    """

    source: TeacherSource
    model: Any
    device: torch.device
    dtype: str
    autocast_dtype: torch.dtype | None
    split_head: bool
    head_weight: torch.Tensor = field(repr=False)
    head_bias: torch.Tensor | None = field(repr=False)
    class_matrix: torch.Tensor = field(repr=False)

    @property
    def tokenizer(self) -> Any:
        """The teacher's :class:`~xtd.tokenization.ByteTokenizer`."""
        return self.source.tokenizer

    @property
    def vocab_size(self) -> int:
        """Softmax width (tokenizer ids; padded model vocabulary rows excluded)."""
        return self.source.vocab_size

    @property
    def hidden_size(self) -> int:
        """Width of the stored hidden state."""
        return int(self.head_weight.shape[1])

    def describe(self) -> dict[str, Any]:
        """The ``teacher`` store attribute."""
        return self.source.describe(self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the forward pass (a no-op when weights are in ``dtype``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def base_model(self) -> Any:
        """The model without its output layer (``model.<base_model_prefix>``), or None."""
        prefix = getattr(self.model, "base_model_prefix", "")
        return getattr(self.model, prefix, None) if prefix else None

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, H) final-norm outputs → (n, V) logits of the tokenizer's ids."""
        w = self.head_weight
        if h.dtype != w.dtype and self.autocast_dtype is None:
            h = h.to(w.dtype)
        out = h @ w.T
        if self.head_bias is not None:
            out = out + self.head_bias
        return out


def resolve_teacher(spec: str | None, *, revision: str | None = None) -> TeacherSource:
    """Find a teacher's folder, config, tokenizer and weights digest without loading weights.

    Args:
        spec: ``None``/``"embedded:smollm2"`` (the embedded SmolLM2-135M-Instruct), a local
            folder, or a Hugging Face id already in the local cache (we run offline).
        revision: a hub revision (branch, tag or commit).

    Raises:
        ModelLoadError: nothing loadable under that name (raised fast, before any weights).
        TokenizerError: the teacher's tokenizer has no exact byte view.
    """

    name = spec or DEFAULT_TEACHER
    if name.startswith(_EMBEDDED_PREFIX):
        if name != DEFAULT_TEACHER:
            raise ModelLoadError(f"unknown embedded teacher {name!r}; the embedded teacher is {DEFAULT_TEACHER!r}")

        logger.info("teacher: the embedded SmolLM2-135M-Instruct (converted from its GGUF on first use)")
        folder = embedded_teacher_dir()
        resolved_revision = revision
    else:
        folder, resolved_revision = _local_folder(name, revision)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for bad configs
        raise ModelLoadError(f"cannot read the model config of teacher {name!r} in {str(folder)!r}: {_first_line(exc)}") from None
    tokenizer = load_tokenizer(str(folder))
    return TeacherSource(
        name=name,
        folder=folder,
        revision=resolved_revision,
        tokenizer=tokenizer,
        weights_digest=weights_digest(folder),
        config=config,
    )


def load_teacher(
    spec: str | TeacherSource | None = None,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str | torch.device | None = None,
) -> Teacher:
    """Load a teacher ready to score texts.

    Args:
        spec: as for :func:`resolve_teacher`, or an already resolved source.
        revision: hub revision.
        dtype: ``auto`` (bf16 on CUDA when supported, else fp16; fp32 on CPU), ``bf16``,
            ``fp16`` or ``fp32`` (:func:`xtd.runtime.resolve_dtype`). On CUDA the weights are
            loaded in that dtype; on CPU the weights stay fp32 and a 16-bit dtype means autocast.
        device: as :func:`xtd.runtime.resolve_device` (``None`` = CUDA when present, else CPU).

    Raises:
        ModelLoadError: unknown model, weights that do not load, a vocabulary smaller than
            the tokenizer's.
        ConfigError: an unknown dtype.
    """
    dtype = canonical_dtype(dtype)  # a bad spelling fails before anything loads
    source = spec if isinstance(spec, TeacherSource) else resolve_teacher(spec, revision=revision)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    load_dtype = torch_dtype(dtype) if dev.type == "cuda" else torch.float32
    autocast_dtype = torch_dtype(dtype) if (dev.type != "cuda" and dtype != "fp32") else None
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # xtd draws its own progress; no tqdm over it
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=load_dtype)
    except Exception as exc:  # many types: OSError, ValueError, RuntimeError (bad shapes)
        raise ModelLoadError(f"cannot load teacher {source.name!r} as a causal LM: {_first_line(exc)}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(dev).eval()
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelLoadError(f"teacher {source.name!r} ({type(model).__name__}) has no output embedding layer")
    model_vocab = int(head.weight.shape[0])
    vocab = source.vocab_size
    if model_vocab < vocab:
        raise TokenizerMismatchError(
            f"teacher {source.name!r} has {model_vocab} output rows but its tokenizer has {vocab} ids; "
            "they do not belong together"
        )
    if model_vocab > vocab:
        logger.info("teacher vocabulary padded to %d rows; softmax over the tokenizer's %d ids", model_vocab, vocab)
    weight = head.weight[:vocab].detach()
    bias = head.bias[:vocab].detach() if getattr(head, "bias", None) is not None else None
    classes = torch.as_tensor(source.tokenizer.boundary_class.astype(np.int64))

    # (V, 1 + C): column 0 sums everything (the softmax normaliser), column 1 + c class c.
    class_matrix = torch.zeros(vocab, 1 + len(BOUNDARY_CLASSES), dtype=torch.float32)
    class_matrix[:, 0] = 1.0
    has_class = classes >= 0
    class_matrix[torch.nonzero(has_class).squeeze(1), 1 + classes[has_class]] = 1.0
    teacher = Teacher(
        source=source,
        model=model,
        device=dev,
        dtype=dtype,
        autocast_dtype=autocast_dtype,
        split_head=True,
        head_weight=weight,
        head_bias=bias,
        class_matrix=class_matrix.to(dev),
    )
    teacher.split_head = _split_head_matches(teacher)
    if not teacher.split_head:
        logger.info("teacher %s post-processes its logits; using its full forward pass", type(model).__name__)
    logger.info(
        "teacher %s loaded in %.1f s on %s (%s, vocab %d)", source.name, time.perf_counter() - started, dev, dtype, vocab
    )
    return teacher


def weights_digest(folder: str | Path) -> str:
    """16 hex chars identifying a model's weights.

    sha256 over the names and sha256 digests of the ``*.safetensors`` files (a file in
    the Hugging Face cache is a link to a blob named by its sha256, which is reused
    rather than re-hashed); falls back to ``*.bin``/``*.pt`` files. Cheap relative to
    a precompute run: a 540 MB file hashes in about a second.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + _file_sha256(path).encode() + b"\0")
    if not files:
        h.update(b"no weight files")
    return h.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    if path.is_symlink():
        blob = Path(path.resolve()).name
        if re.fullmatch(r"[0-9a-f]{64}", blob):
            return blob
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _local_folder(name: str, revision: str | None) -> tuple[Path, str | None]:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"teacher folder {name!r} has no config.json; give a Hugging Face model folder")
        return path, revision
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix in (".gguf", ".safetensors")
    if looks_like_path:
        raise ModelLoadError(f"teacher {name!r} does not exist; give a model folder or a cached Hugging Face id")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, …
        raise ModelLoadError(
            f"teacher {name!r} is not a local folder and not in the Hugging Face cache "
            f"({type(exc).__name__}); xtd runs offline here: download it first or pass its folder"
        ) from None
    return folder, revision or folder.name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@torch.inference_mode()
def _split_head_matches(teacher: Teacher) -> bool:
    """Whether ``head(final_norm_output)`` equals the model's own logits (no soft-capping etc.)."""
    model = teacher.model
    base = teacher.base_model()
    if base is None:
        return False
    ids = torch.arange(min(teacher.vocab_size, 12), device=teacher.device).unsqueeze(0)
    with teacher.autocast():
        full = model(input_ids=ids, use_cache=False).logits[..., : teacher.vocab_size].float()
        h = base(input_ids=ids, use_cache=False).last_hidden_state
        mine = teacher.head_logits(h[0]).float()
    scale = float(full.abs().max()) + 1.0
    return bool(torch.allclose(full[0], mine, atol=1e-3 * scale, rtol=1e-3))
