"""Build a student: load a causal LM, move it to a new tokenizer with FVT, add LoRA, save it.

Four ways to get a student (:func:`load_student`):

(a) a Hugging Face causal LM (id or folder) with its own tokenizer;
(b) the same model moved to another tokenizer (``tokenizer=``: any spec of
    :func:`xtd.tokenization.load_tokenizer`, ``"bytes"`` included), its embeddings
    initialised by FVT (docs/method.md, "FVT initialisation", :func:`xtd.fvt.fvt_init`);
(c) a fresh, randomly initialised model from a config (``model_config=``) with a given
    tokenizer, for distilling into a small model from scratch;
(d) the embedded default ``embedded:smollm2`` (:func:`xtd.assets.embedded_teacher_dir`).

Byte-level students (docs/method.md, "Byte students") are case (b) with ``tokenizer="bytes"``: the
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from xtd.assets import embedded_teacher_dir
from xtd.errors import ConfigError, ModelLoadError, TokenizerError
from xtd.fvt import (
    FVT_RULES,
    embedding_params,
    fvt_init,
    is_tied,
    set_special_ids,
    untie_embeddings,
)
from xtd.model_parts import LINEAR_TYPES, decoder_blocks
from xtd.tokenization import load_tokenizer

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
    "find_lora_targets",
    "save_student",
    "write_folder",
    "check_out_folder",
]

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

        return str(embedded_teacher_dir())
    return text


def load_causal_lm(spec: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
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


def load_student(
    model: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Any = None,
    model_config: str | os.PathLike[str] | None = None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    untie: bool = False,
    train_embeddings: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    init: str = "fvt",
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
        init: how a new tokenizer's embeddings start: ``fvt``, or ``hypernet:DIR`` (predicted
            by the hypernetwork saved in DIR for this model, :func:`xtd.hypernet.apply.hypernet_init`).

    Returns:
        The :class:`Student`.

    Raises:
        ConfigError: bad combinations (both or neither of ``model``/``model_config``,
            ``lora_rank < 0``, no LoRA targets found).
        ModelLoadError, TokenizerError: the model or tokenizer cannot be loaded.
    """

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
        if new_tok.digest != original.digest and init.startswith("hypernet:"):
            from xtd.hypernet.apply import hypernet_init

            folder = init.removeprefix("hypernet:")
            counts = hypernet_init(built, str(model), new_tok, folder, untie=untie)
            report.update(tokenizer_changed=True, init=f"the hypernetwork {folder}", **counts)
        elif new_tok.digest != original.digest:
            counts = fvt_init(built, original, new_tok, untie=untie, seed=seed)
            report.update(tokenizer_changed=True, **counts)
        else:
            report["tokenizer_changed"] = False
            if untie:
                untie_embeddings(built)
    if untie and model_config is not None:
        untie_embeddings(built)
    report["tied"] = is_tied(built)
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
        for param in embedding_params(built):
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


def _fresh_model(config: Any, tok: ByteTokenizer, *, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    config.vocab_size = tok.vocab_size
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_id, tok.eos_id, tok.pad_id
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise ConfigError(f"config of model type {config.model_type!r} is not a causal LM: {exc}") from None
    set_special_ids(model, tok)
    return model


# --------------------------------------------------------------------------- LoRA


def find_lora_targets(model: nn.Module) -> list[str]:
    """Full names of the attention and MLP linears inside the decoder blocks.

    Found structurally: every ``nn.Linear`` (or GPT-2 ``Conv1D``) inside the decoder blocks
    (:func:`xtd.model_parts.decoder_blocks`, the rule GradMag uses too) is a target — q/k/v/o and gate/up/down for Llama, Qwen, Mistral and
    Gemma; ``c_attn``/``c_proj``/``c_fc`` for GPT-2.

    Raises:
        ConfigError: no decoder blocks or no linears in them.
    """
    found = decoder_blocks(model)
    if found is None:
        raise ConfigError(
            f"no LoRA targets in {type(model).__name__}: found no list of decoder blocks with "
            "linear layers; train without --lora-rank (full fine-tuning)"
        )
    prefix, _ = found
    return [
        name
        for name, module in model.named_modules()
        if name.startswith(prefix + ".") and isinstance(module, LINEAR_TYPES)
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
        for param in embedding_params(wrapped.get_base_model()):
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
        # init_report["init"] names another initialisation (e.g. a hypernetwork) and
        # init_report["init_rules"] its count keys; FVT's otherwise.
        rules = student.init_report.get("init_rules", FVT_RULES)
        counts = ", ".join(f"{r} {student.init_report.get(r, 0)}" for r in rules)
        how = student.init_report.get("init", "FVT")
        lines.append(f"- moved from `{student.original_tokenizer.name}` by {how}: {counts}")
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


def check_out_folder(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """``out_dir`` as a Path, after checking that it may be written.

    Raises:
        ConfigError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output folder {str(out)!r} exists and is not empty; pass --overwrite or choose another --out")
    return out


def write_folder(
    out_dir: str | os.PathLike[str], fill: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Create a folder whole or not at all: ``fill`` writes into a temporary sibling, then a rename.

    Args:
        out_dir: the folder to create.
        fill: writes the files, given the temporary folder.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: ``out_dir`` exists, is not empty and ``overwrite`` is False.
    """
    out = check_out_folder(out_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fill(staging)
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
    return out


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
    def fill(staging: Path) -> None:
        model = _merged_model(student.model)
        model.save_pretrained(staging)
        student.tokenizer.save(staging)
        (staging / "README.md").write_text(_card_text(student, card, model.config.model_type))
        sidecar = {"card": card, "init_report": student.init_report}
        (staging / "xtd_student.json").write_text(json.dumps(sidecar, indent=2, default=str) + "\n")

    out = write_folder(out_dir, fill, overwrite=overwrite)
    logger.info("saved student to %s", out)
    return out
