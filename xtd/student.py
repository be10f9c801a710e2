"""Build a student: load a causal LM, move it to a new tokenizer with FVT, add LoRA, save it.

Four ways to get a student (:func:`load_student`):

(a) a Hugging Face causal LM (id or folder) with its own tokenizer;
(b) the same model moved to another tokenizer (``tokenizer=``: any spec of
    :func:`xtd.tokenization.load_tokenizer`, ``"bytes"`` included), its embeddings
    initialised by FVT (spec/ALM.md §7.1, :func:`fvt_init`);
(c) a fresh, randomly initialised model from a config (``model_config=``) with a given
    tokenizer, for distilling into a small model from scratch;
(d) the embedded default ``embedded:smollm2`` (:func:`xtd.assets.embedded_teacher_dir`).

Byte-level students (spec/ALM.md §7.2) are case (b) with ``tokenizer="bytes"``: the
vocabulary is the 256 bytes plus special tokens. Input-id expansion (BLT-style n-gram
embeddings) is not implemented in this version.

Dimension letters: ``V`` vocabulary (``V_old``/``V_new``), ``H`` hidden size.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xtd.errors import ConfigError, ModelLoadError, TokenizerError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from xtd.tokenization import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "Student",
    "load_student",
    "load_causal_lm",
    "resolve_model_path",
    "model_tokenizer",
    "fvt_init",
    "fvt_matrix",
    "find_lora_targets",
    "save_student",
    "FVT_RULES",
]

FVT_RULES = ("special", "exact", "decomposed", "random")
"""The rules of spec/ALM.md §7.1 in the order they are tried; keys of ``init_report``."""

_ROLES = ("bos", "eos", "pad", "unk")  # bos wins over pad (spec/ALM.md §7.1 rule 1)

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


@dataclass
class Student:
    """A student model with its tokenizer.

    Attributes:
        model: the ``PreTrainedModel`` (a ``peft.PeftModel`` wrapping it when LoRA is on).
        tokenizer: the student tokenizer; ids index ``model``'s embedding rows.
        original_tokenizer: the model's own tokenizer before the move (``None`` for a
            fresh model from a config).
        init_report: how the student was built: ``"source"``, ``"tokenizer_changed"``,
            per-rule counts of FVT (keys of :data:`FVT_RULES`) when the tokenizer
            changed, ``"lora_targets"``, ``"trainable_params"``, ``"total_params"``.
    """

    model: Any
    tokenizer: ByteTokenizer
    original_tokenizer: ByteTokenizer | None
    init_report: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_changed(self) -> bool:
        """Whether the embeddings were re-initialised for a new tokenizer (or built fresh)."""
        return bool(self.init_report.get("tokenizer_changed", False))


# --------------------------------------------------------------------------- loading


def resolve_model_path(spec: str | os.PathLike[str]) -> str:
    """Turn a model spec into what ``from_pretrained`` takes.

    ``embedded:smollm2`` (and ``embedded``) name the packaged SmolLM2-135M-Instruct;
    anything else (an HF id or a folder) is returned as a string.

    Raises:
        ConfigError: an unknown ``embedded:`` name.
    """
    text = str(spec)
    if text.startswith("embedded"):
        name = text.partition(":")[2] or "smollm2"
        if name != "smollm2":
            raise ConfigError(
                f"unknown embedded model {text!r}; the only embedded model is 'embedded:smollm2'"
            )
        from xtd.assets import embedded_teacher_dir

        return str(embedded_teacher_dir())
    return text


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        value = getattr(torch, str(dtype))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return value


def load_causal_lm(spec: str | os.PathLike[str], *, dtype: torch.dtype | str = torch.float32) -> PreTrainedModel:
    """Load a causal LM by HF id, folder or ``embedded:smollm2``.

    Raises:
        ModelLoadError: transformers cannot load it (the message names the spec).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    local = Path(path)
    if local.exists() and local.is_dir() and not (local / "config.json").exists():
        raise ModelLoadError(
            f"model folder {path!r} has no config.json; pass a Hugging Face model folder "
            "(config.json + weights) or an HF id"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local.exists():
            hint = "check that the folder holds a complete Hugging Face causal LM"
        else:
            hint = "no such folder, and no cached Hugging Face id of that name (is the hub offline?)"
        raise ModelLoadError(f"cannot load model {path!r}: {hint} ({first})") from None
    model.eval()
    return model


def model_tokenizer(spec: str | os.PathLike[str]) -> ByteTokenizer:
    """The tokenizer saved with a model (folder, HF id or ``embedded:smollm2``).

    Raises:
        TokenizerError: the model folder holds no tokenizer files (pass one explicitly).
    """
    from xtd.tokenization import load_tokenizer

    path = resolve_model_path(spec)
    local = Path(path)
    if local.is_file() and local.name == "config.json":  # a model config: its folder's tokenizer
        local = local.parent
        path = str(local)
    if local.is_dir() and not any((local / name).exists() for name in _TOKENIZER_FILES):
        raise TokenizerError(
            f"model folder {path!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "pass one with --tokenizer"
        )
    return load_tokenizer(path)


def _load_config(model_config: str | os.PathLike[str]) -> Any:
    from transformers import AutoConfig

    path = Path(resolve_model_path(model_config))
    try:
        if path.is_file():
            data = json.loads(path.read_text())
            model_type = data.pop("model_type", None)
            if not model_type:
                raise ConfigError(f"model config {str(path)!r} has no 'model_type'")
            return AutoConfig.for_model(model_type, **data)
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"cannot read model config {str(model_config)!r}: {exc}; pass a config.json file "
            "or a Hugging Face model folder"
        ) from None


def _set_special_ids(model: PreTrainedModel, tok: ByteTokenizer) -> None:
    """Point config and generation config at the new tokenizer's special ids."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    for key, value in ids.items():
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)


def load_student(
    model: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Any = None,
    model_config: str | os.PathLike[str] | None = None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    untie: bool = False,
    train_embeddings: bool = True,
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
) -> Student:
    """Build a student (see the module docstring for the four cases).

    Args:
        model: HF id, folder or ``embedded:smollm2``; ``None`` with ``model_config``.
        tokenizer: a spec for :func:`xtd.tokenization.load_tokenizer` (or a loaded
            ``ByteTokenizer``). With ``model``: move the model to it by FVT unless it is
            the model's own tokenizer. With ``model_config``: required unless the config
            folder holds a tokenizer.
        model_config: a ``config.json`` path or HF folder; builds a fresh random model
            whose vocabulary is the tokenizer's.
        lora_rank: > 0 wraps the model in peft LoRA on the attention and MLP linears of
            the decoder blocks (found structurally, :func:`find_lora_targets`).
        lora_alpha: LoRA scaling numerator; default ``2 * lora_rank``.
        untie: give tied models separate input and output embeddings.
        train_embeddings: embeddings (and the LM head) stay trainable: under LoRA only
            when the tokenizer changed; in full fine-tuning they are frozen when False.
        dtype: parameter dtype (``torch.float32`` for training on CPU).
        seed: seeds the random parts (FVT rule 4 draws, fresh models).

    Returns:
        The :class:`Student`.

    Raises:
        ConfigError: bad combinations (both or neither of ``model``/``model_config``,
            ``lora_rank < 0``, no LoRA targets found).
        ModelLoadError, TokenizerError: the model or tokenizer cannot be loaded.
    """
    from xtd.tokenization import load_tokenizer

    if lora_rank < 0:
        raise ConfigError(f"--lora-rank ({lora_rank}) must be 0 (full fine-tuning) or positive")
    if model is not None and model_config is not None:
        raise ConfigError(
            "give either a model to start from (--student) or a config for a fresh model "
            "(--config), not both"
        )
    if model is None and model_config is None:
        raise ConfigError("no student: pass a model (--student) or a model config (--config)")

    def as_tokenizer(spec: Any) -> ByteTokenizer:
        return spec if hasattr(spec, "token_bytes") and hasattr(spec, "digest") else load_tokenizer(spec)

    report: dict[str, Any] = {}
    if model_config is not None:
        config = _load_config(model_config)
        if tokenizer is None:
            try:
                new_tok = model_tokenizer(model_config)
            except TokenizerError:
                raise ConfigError(
                    f"a fresh model from {str(model_config)!r} needs a tokenizer and none is saved "
                    "next to that config: pass --tokenizer"
                ) from None
        else:
            new_tok = as_tokenizer(tokenizer)
        built = _fresh_model(config, new_tok, dtype=dtype, seed=seed)
        original = None
        report.update(source=f"config:{model_config}", tokenizer_changed=True, fresh=new_tok.vocab_size)
    else:
        assert model is not None
        built = load_causal_lm(model, dtype=dtype)
        original = model_tokenizer(model)
        report["source"] = str(model)
        new_tok = original if tokenizer is None else as_tokenizer(tokenizer)
        if new_tok.digest != original.digest:
            counts = fvt_init(built, original, new_tok, untie=untie, seed=seed)
            report.update(tokenizer_changed=True, **counts)
        else:
            report["tokenizer_changed"] = False
            if untie:
                _untie(built)
    if untie and model_config is not None:
        _untie(built)
    report["tied"] = _is_tied(built)
    report["tokenizer"] = new_tok.name

    if lora_rank > 0:
        built, targets = _apply_lora(
            built,
            rank=lora_rank,
            alpha=lora_alpha if lora_alpha is not None else 2.0 * lora_rank,
            train_embeddings=train_embeddings and report["tokenizer_changed"],
        )
        report["lora_targets"] = len(targets)
    elif not train_embeddings:
        for param in _embedding_params(built):
            param.requires_grad_(False)
    report["trainable_params"] = sum(p.numel() for p in built.parameters() if p.requires_grad)
    report["total_params"] = sum(p.numel() for p in built.parameters())
    logger.info(
        "student %s with tokenizer %s: %s",
        report["source"],
        new_tok.name,
        ", ".join(f"{k} {v}" for k, v in report.items() if k in FVT_RULES or k == "trainable_params"),
    )
    return Student(model=built, tokenizer=new_tok, original_tokenizer=original, init_report=report)


def _fresh_model(config: Any, tok: ByteTokenizer, *, dtype: torch.dtype | str, seed: int) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    config.vocab_size = tok.vocab_size
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
    except ValueError as exc:
        raise ConfigError(f"config of model type {config.model_type!r} is not a causal LM: {exc}") from None
    _set_special_ids(model, tok)
    return model


# --------------------------------------------------------------------------- FVT


def _is_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _embedding_params(model: nn.Module) -> list[nn.Parameter]:
    params = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not params[0]:
        params.append(out.weight)
    return params


def _untie(model: PreTrainedModel) -> None:
    """Give a tied model its own output matrix, a copy of the input one."""
    if not _is_tied(model):
        return
    weight = model.get_input_embeddings().weight
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)


def _role_ids(tok: ByteTokenizer) -> dict[str, int | None]:
    unk = getattr(tok.hf, "unk_token_id", None) if getattr(tok, "hf", None) is not None else None
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": unk}


def _special_strings(tok: ByteTokenizer) -> dict[int, str]:
    hf = getattr(tok, "hf", None)
    if hf is None:
        return {}
    out = {}
    for i in tok.special_ids.tolist():
        piece = hf.convert_ids_to_tokens(int(i))
        if isinstance(piece, str):
            out[int(i)] = piece
    return out


def _utf8_segments(data: bytes) -> list[str | int]:
    """Split bytes into valid UTF-8 runs (str) and the single bytes (int) between them."""
    out: list[str | int] = []
    pos = 0
    while pos < len(data):
        try:
            out.append(data[pos:].decode("utf-8"))
            break
        except UnicodeDecodeError as exc:
            if exc.start:
                out.append(data[pos : pos + exc.start].decode("utf-8"))
            out.extend(data[pos + exc.start : pos + exc.end])
            pos += exc.end
    return out


def fvt_matrix(
    old_tok: ByteTokenizer, new_tok: ByteTokenizer
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The FVT map from old to new ids (spec/ALM.md §7.1) as one sparse matrix.

    Rule per new token, in order: (1) ``special``: a token that plays a role (bos, eos,
    pad, unk; bos wins over pad) copies the old token of that role, and a special token
    whose string is an old special token copies it; (2) ``exact``: an identical byte view
    in the old vocabulary is copied (a non-byte-fallback id preferred); (3)
    ``decomposed``: the byte view is tokenized by the old tokenizer (its full pipeline;
    bytes that are not valid UTF-8 map to the old single-byte token) and the pieces'
    embeddings are averaged; (4) ``random``: otherwise.

    Returns:
        ``(matrix, is_random, counts)``: ``matrix`` a coalesced sparse COO float32 tensor
        (V_new, V_old) whose rows average old rows (all-zero for rule 4); ``is_random``
        (V_new,) bool; ``counts`` per rule.
    """
    old_roles, new_roles = _role_ids(old_tok), _role_ids(new_tok)
    old_special = {s: i for i, s in _special_strings(old_tok).items()}
    new_special = _special_strings(new_tok)
    old_unk = old_roles["unk"]

    # Byte view → old id, preferring ordinary tokens over <0xNN> byte-fallback pieces.
    old_by_bytes: dict[bytes, int] = {}
    old_specials = set(old_tok.special_ids.tolist())
    for i, view in enumerate(old_tok.token_bytes):
        if not view or i in old_specials:
            continue
        if view not in old_by_bytes or _is_byte_fallback(old_tok, old_by_bytes[view]):
            old_by_bytes[view] = i

    role_of_new: dict[int, str] = {}
    for role in reversed(_ROLES):  # earlier roles overwrite later ones: bos wins over pad
        idx = new_roles[role]
        if idx is not None and old_roles[role] is not None:
            role_of_new[int(idx)] = role

    rows: list[list[int]] = [[] for _ in range(new_tok.vocab_size)]
    counts = dict.fromkeys(FVT_RULES, 0)
    to_decompose: list[int] = []
    for j in range(new_tok.vocab_size):
        if j in role_of_new:
            rows[j] = [int(old_roles[role_of_new[j]])]  # type: ignore[arg-type]
            counts["special"] += 1
        elif j in new_special and new_special[j] in old_special:
            rows[j] = [old_special[new_special[j]]]
            counts["special"] += 1
        elif (view := new_tok.token_bytes[j]) and view in old_by_bytes:
            rows[j] = [old_by_bytes[view]]
            counts["exact"] += 1
        elif view:
            to_decompose.append(j)

    # Rule 3: one batched call of the old tokenizer over every valid-UTF-8 segment.
    segments = {j: _utf8_segments(new_tok.token_bytes[j]) for j in to_decompose}
    texts = sorted({s for segs in segments.values() for s in segs if isinstance(s, str)})
    encoded = dict(zip(texts, _encode_plain(old_tok, texts), strict=True)) if texts else {}
    for j in to_decompose:
        pieces: list[int] = []
        for seg in segments[j]:
            if isinstance(seg, str) and (ids := encoded[seg]) is not None:
                pieces.extend(ids)
            elif isinstance(seg, int) and (one := old_by_bytes.get(bytes([seg]))) is not None:
                pieces.append(one)
            else:
                pieces = []
                break
        if pieces and (old_unk is None or old_unk not in pieces):
            rows[j] = pieces
            counts["decomposed"] += 1
    counts["random"] = new_tok.vocab_size - sum(counts[r] for r in FVT_RULES[:3])

    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    row_idx = torch.repeat_interleave(torch.arange(new_tok.vocab_size), lengths)
    col_idx = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    val = torch.repeat_interleave(1.0 / lengths.clamp(min=1).float(), lengths)
    # COO sums repeated pieces on coalesce (a piece twice in a decomposition weighs 2/n).
    matrix = torch.sparse_coo_tensor(
        torch.stack([row_idx, col_idx]),
        val,
        size=(new_tok.vocab_size, old_tok.vocab_size),
        check_invariants=True,  # indices in range; also opts out of torch's per-call warning
    ).coalesce()
    return matrix, lengths == 0, counts


def _is_byte_fallback(tok: ByteTokenizer, idx: int) -> bool:
    hf = getattr(tok, "hf", None)
    if hf is None:
        return False
    piece = hf.convert_ids_to_tokens(int(idx))
    return isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _encode_plain(tok: ByteTokenizer, texts: list[str]) -> list[list[int] | None]:
    """Old-tokenizer ids of each text with no special tokens added (its whole pipeline).

    Special-token strings inside a text stay text (spec/ALM.md §2.3). A text whose byte
    views the tokenizer cannot reproduce gives ``None`` (FVT then falls back to rule 4).
    """
    from xtd.errors import ByteIdentityError

    try:
        return [enc.ids.tolist() for enc in tok.encode_batch(texts)]
    except ByteIdentityError:
        out: list[list[int] | None] = []
        for text in texts:
            try:
                out.append(tok.encode(text).ids.tolist())
            except ByteIdentityError:
                out.append(None)
        return out


def fvt_init(
    model: PreTrainedModel,
    old_tok: ByteTokenizer,
    new_tok: ByteTokenizer,
    *,
    untie: bool = False,
    seed: int = 0,
) -> dict[str, int]:
    """Move ``model`` in place from ``old_tok`` to ``new_tok`` (spec/ALM.md §7.1).

    Input and output embeddings (one matrix when tied; both when untied or ``untie``)
    and an output bias, if any, are initialised by the same rule: they are stacked as
    columns of one (V_old, n·H) matrix and multiplied once by the sparse FVT matrix of
    :func:`fvt_matrix`. Rule-4 rows are drawn from a normal with the old per-column mean
    and std. ``config.vocab_size`` and the bos/eos/pad ids follow the new tokenizer.

    Returns:
        Counts per rule (keys of :data:`FVT_RULES`).

    Raises:
        TokenizerError: ``old_tok`` has more ids than the model has embedding rows.
    """
    emb_in = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if old_tok.vocab_size > emb_in.weight.shape[0]:
        raise TokenizerError(
            f"old tokenizer {old_tok.name!r} has {old_tok.vocab_size} ids but the model has "
            f"{emb_in.weight.shape[0]} embedding rows; pass the model's own tokenizer"
        )
    tied = head is not None and head.weight is emb_in.weight
    dtype = emb_in.weight.dtype
    hidden = emb_in.weight.shape[1]
    v_old = old_tok.vocab_size
    blocks = [emb_in.weight.detach()[:v_old].float()]
    if head is not None and not tied:
        blocks.append(head.weight.detach()[:v_old].float())
    elif head is not None and untie:
        blocks.append(emb_in.weight.detach()[:v_old].float())
    bias = getattr(head, "bias", None) if head is not None else None
    if bias is not None:
        blocks.append(bias.detach()[:v_old, None].float())
    old = torch.cat(blocks, dim=1)  # (V_old, n·H [+1])

    matrix, is_random, counts = fvt_matrix(old_tok, new_tok)
    new = torch.sparse.mm(matrix, old)  # (V_new, n·H [+1]) dense: one sparse matmul for every rule
    if bool(is_random.any()):
        gen = torch.Generator().manual_seed(seed)
        mean, std = old.mean(0), old.std(0, unbiased=False)
        draws = torch.randn(int(is_random.sum()), old.shape[1], generator=gen) * std + mean
        new[is_random] = draws

    v_new = new_tok.vocab_size
    if untie and tied:
        _untie(model)
        tied = False
        head = model.get_output_embeddings()
    model.resize_token_embeddings(v_new, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new[:, :hidden].to(dtype))
        col = hidden
        out = model.get_output_embeddings()
        if out is not None and not tied:
            out.weight.copy_(new[:, col : col + hidden].to(dtype))
            col += hidden
        if out is not None and getattr(out, "bias", None) is not None:
            out.bias.copy_(new[:, col].to(out.bias.dtype))
    model.config.vocab_size = v_new
    _set_special_ids(model, new_tok)
    logger.info("FVT init over %d new tokens: %s", v_new, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


# --------------------------------------------------------------------------- LoRA


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of decoder blocks: the largest list of same-type blocks with linears."""
    linear = _linear_types()
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or isinstance(module[0], linear):
            continue
        if not any(isinstance(m, linear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def find_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the attention and MLP linears inside the decoder blocks.

    Found structurally (spec/ALM.md §9 item 12): the decoder blocks are the largest
    ``nn.ModuleList`` of same-type modules; every ``nn.Linear`` (or GPT-2 ``Conv1D``)
    inside them is a target — q/k/v/o and gate/up/down for Llama, Qwen, Mistral and
    Gemma; ``c_attn``/``c_proj``/``c_fc`` for GPT-2.

    Raises:
        ConfigError: no decoder blocks or no linears in them.
    """
    found = _decoder_blocks(model)
    if found is None:
        raise ConfigError(
            f"no LoRA targets in {type(model).__name__}: found no list of decoder blocks with "
            "linear layers; train without --lora-rank (full fine-tuning)"
        )
    prefix, _ = found
    linear = _linear_types()
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and isinstance(module, linear)
    ]


def _apply_lora(model: PreTrainedModel, *, rank: int, alpha: float, train_embeddings: bool) -> tuple[Any, list[str]]:
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = find_lora_targets(model)
    conv1d = any(isinstance(model.get_submodule(t), Conv1D) for t in targets)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, config)
    if train_embeddings:
        # Un-freezing (not peft's modules_to_save) keeps tied embeddings tied.
        for param in _embedding_params(wrapped.get_base_model()):
            param.requires_grad_(True)
    return wrapped, targets


# --------------------------------------------------------------------------- saving


def _merged_model(model: Any) -> PreTrainedModel:
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        # Merge a copy: the caller's model keeps its adapters and can train on.
        return copy.deepcopy(model).merge_and_unload()
    return model


def _card_text(student: Student, card: dict[str, Any], model_type: str) -> str:
    store = card.get("store") or card.get("teacher_store") or "(none)"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [xtd, distillation, cross-tokenizer, alm]",
        "---",
        "",
        f"# {card.get('name', 'xtd student')}",
        "",
        f"A `{model_type}` causal LM built with xtd (cross-tokenizer distillation with "
        "Approximate Likelihood Matching).",
        "",
        f"- teacher store: `{store}`",
        f"- student source: `{student.init_report.get('source', '?')}`",
        f"- tokenizer: `{student.tokenizer.name}` ({student.tokenizer.vocab_size} ids, digest "
        f"`{student.tokenizer.digest}`)",
    ]
    if student.original_tokenizer is not None and student.tokenizer_changed:
        counts = ", ".join(f"{r} {student.init_report.get(r, 0)}" for r in FVT_RULES)
        lines.append(f"- moved from `{student.original_tokenizer.name}` by FVT: {counts}")
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    for key in sorted(card):
        value = card[key]
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        shown = shown.replace("|", "\\|")
        lines.append(f"| {key} | `{shown}` |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
    ]
    return "\n".join(lines)


def save_student(
    student: Student, out_dir: str | os.PathLike[str], *, card: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write the student as a Hugging Face folder, whole or not at all.

    LoRA adapters are merged (into a copy; ``student.model`` is unchanged). The folder
    holds ``config.json``, safetensors weights, the student tokenizer, ``README.md`` (a
    model card naming the teacher store ``card["store"]`` and every setting in ``card``)
    and ``xtd_student.json`` (``card`` and ``init_report``). It is written under a
    temporary name next to ``out_dir`` and renamed into place.

    Args:
        student: what :func:`load_student` returned (possibly trained).
        out_dir: the folder to create.
        card: settings to record (JSON-able values), e.g. the train config's ``to_dict()``
            plus ``"store"``.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output folder {str(out)!r} exists and is not empty; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = _merged_model(student.model)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        student.tokenizer.save(staging)
        (staging / "README.md").write_text(_card_text(student, card, model.config.model_type))
        sidecar = {"card": card, "init_report": student.init_report}
        (staging / "xtd_student.json").write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
        staging.chmod(0o755)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            out.rename(trash / "old")
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved student to %s", out)
    return out
