"""Zero-shot tokenizer transfer: the base model with hypernetwork-predicted embeddings.

:func:`apply_hypernet` (``xtd hypernet apply``) loads a saved hypernetwork and its base
model, predicts the embedding row of every token of the target tokenizer
(:meth:`~xtd.hypernet.model.HypernetBundle.predict`), puts them into the base model
(:func:`xtd.fvt.set_embedding_table`, the surgery FVT uses) and saves a Hugging Face
folder with :func:`xtd.student.save_student`, like ``xtd train``'s output.
:func:`hypernet_init` does the same surgery on a student in memory (``xtd train --init
hypernet:DIR``, in place of FVT).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xtd.config import HypernetApplyConfig
from xtd.fvt import is_tied, set_embedding_table
from xtd.hypernet.decomposition import DECOMPOSITION_RULES
from xtd.hypernet.model import load_hypernet, read_hypernet_record
from xtd.runtime import resolve_device
from xtd.student import Student, check_out_folder, save_student
from xtd.tokenization import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from xtd.tokenization import ByteTokenizer

logger = logging.getLogger(__name__)

__all__ = ["ApplyResult", "apply_hypernet", "hypernet_init"]


@dataclass(frozen=True)
class ApplyResult:
    """What ``xtd hypernet apply`` wrote.

    Attributes:
        out: the Hugging Face model folder.
        vocab_size: ids of the target tokenizer.
        counts: target tokens per decomposition rule, and ``truncated``.
    """

    out: Path
    vocab_size: int
    counts: dict[str, int]


def apply_hypernet(
    config: HypernetApplyConfig, *, progress: Callable[[int, int], None] | None = None
) -> ApplyResult:
    """Move the hypernetwork's base model to ``config.tokenizer`` zero-shot and save it.

    Args:
        config: the settings (:class:`~xtd.config.HypernetApplyConfig`).
        progress: called with (tokens embedded, tokens in total).

    Returns:
        The :class:`ApplyResult`.

    Raises:
        ConfigError: a non-empty ``--out`` without ``--overwrite``, or a bad ``--device``.
        ModelLoadError, TokenizerError: the hypernetwork, base model or tokenizer cannot
            be loaded.
    """

    out = check_out_folder(config.out, overwrite=config.overwrite)
    device = resolve_device(config.device)
    read_hypernet_record(config.hypernet)  # a wrong folder fails before anything loads
    target = load_tokenizer(config.tokenizer)
    bundle = load_hypernet(config.hypernet)
    bundle.hypernet.to(device)
    rows, decomposition = bundle.predict(target, batch_tokens=config.batch_tokens, progress=progress)
    model = bundle.model
    set_embedding_table(model, rows.cpu(), bundle.layout, target)
    counts = dict(decomposition.counts)
    report = {
        "source": str(bundle.base_model),
        "init": f"the hypernetwork {config.hypernet}",
        "init_rules": [*DECOMPOSITION_RULES, "byte_rows", "truncated"],
        "tokenizer_changed": True,
        "tokenizer": target.name,
        "tied": is_tied(model),
        **counts,
    }
    student = Student(model=model, tokenizer=target, original_tokenizer=bundle.tokenizer, init_report=report)
    card = {**config.to_dict(), "base_model": bundle.base_model, "method": "zero-shot transfer by hypernetwork"}
    saved = save_student(student, out, card=card, overwrite=config.overwrite)
    logger.info("moved %s to %s with hypernetwork %s: %s", bundle.base_model, target.name, config.hypernet, counts)
    return ApplyResult(out=saved, vocab_size=target.vocab_size, counts=counts)


def hypernet_init(
    model: PreTrainedModel,
    base_model: str,
    target: ByteTokenizer,
    folder: str,
    *,
    untie: bool = False,
    batch_tokens: int = 4096,
) -> dict[str, int]:
    """Move ``model`` in place to ``target`` with embeddings a hypernetwork predicts.

    The rows are those :func:`apply_hypernet` writes (the same prediction, on the CPU);
    ``model`` must be the hypernetwork's base model (checked by its tokenizer and
    embedding layout, loaded from ``base_model``).

    Args:
        model: the student, still with the base tokenizer's embeddings.
        base_model: the spec ``model`` was loaded from.
        target: the new tokenizer.
        folder: the saved hypernetwork.
        untie: give the student separate input and output embeddings.
        batch_tokens: target tokens per hypernetwork forward pass.

    Returns:
        Target tokens per decomposition rule, and ``truncated``.

    Raises:
        ModelLoadError: no hypernetwork in ``folder``.
        TokenizerMismatchError: it was trained for another base model.
    """
    from xtd.fvt import is_tied, set_embedding_table, untie_embeddings
    from xtd.hypernet.model import load_hypernet, read_hypernet_record

    read_hypernet_record(folder)
    bundle = load_hypernet(folder, base_model=base_model)
    rows, decomposition = bundle.predict(target, batch_tokens=batch_tokens)
    set_embedding_table(model, rows.cpu(), bundle.layout, target)
    if untie and is_tied(model):
        untie_embeddings(model)
    return dict(decomposition.counts)
