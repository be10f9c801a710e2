"""Named evaluation sets scored during training: learning curves in ``metrics.jsonl``.

``xtd train --eval-text NAME=FILE --eval-every N`` scores the student on each file
every N optimizer steps (and after the last) with :func:`xtd.evaluate.bits_per_byte`,
the same code path as ``xtd eval --text FILE``, and adds ``eval_<NAME>_bits_per_byte``
to that step's metrics record. Windows are at most ``--eval-max-length`` student tokens
(default: ``--max-student-length``), so no scored token sits at a position the student
never trained at; each later window carries the larger half of the previous one over as context.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xtd.config import flag, parse_eval_text
from xtd.errors import ConfigError
from xtd.evaluate import bits_per_byte
from xtd.texts import read_texts
from xtd.tokenization import ByteTokenizer

__all__ = ["EvalSet", "parse_eval_text", "load_eval_sets", "score_eval_sets", "TrainEvaluator", "metric_key"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSet:
    """Texts scored together under one name."""

    name: str
    texts: tuple[str, ...]


def metric_key(name: str) -> str:
    """The metrics-record key of an evaluation set: ``eval_<name>_bits_per_byte``."""
    return f"eval_{name}_bits_per_byte"


def load_eval_sets(specs: Sequence[str]) -> list[EvalSet]:
    """Read every ``--eval-text`` file (.txt: one text; .jsonl: field ``text`` per line).

    Raises:
        ConfigError: two sets share a name.
        DataError: a missing, empty or malformed file (:func:`xtd.texts.read_texts`).
    """
    sets: list[EvalSet] = []
    for spec in specs:
        name, path = parse_eval_text(spec)
        if any(s.name == name for s in sets):
            raise ConfigError(f"{flag('eval_text')} names {name!r} twice; give each set its own NAME=FILE")
        sets.append(EvalSet(name, tuple(read_texts(path))))
    return sets


def score_eval_sets(
    model: torch.nn.Module,
    tokenizer: ByteTokenizer,
    sets: Sequence[EvalSet],
    *,
    max_length: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """Bits per byte of ``model`` on each set: ``{eval_<name>_bits_per_byte: value}``.

    Windows of ``max_length`` tokens, each later one carrying ``(max_length + 1) // 2``
    tokens of context over.
    """
    stride = (max_length + 1) // 2
    return {
        metric_key(s.name): bits_per_byte(
            model, tokenizer, s.texts, max_length=max_length, stride=stride, batch_size=batch_size, name=s.name
        ).bits_per_byte
        for s in sets
    }


class TrainEvaluator:
    """What the training loop calls after each step: scores the sets when one is due."""

    def __init__(self, sets: Sequence[EvalSet], tokenizer: ByteTokenizer, *, every: int, max_steps: int, max_length: int) -> None:
        self.sets, self.tokenizer = list(sets), tokenizer
        self.every, self.max_steps, self.max_length = every, max_steps, max_length

    @classmethod
    def from_files(
        cls, specs: Sequence[str], tokenizer: ByteTokenizer, *, every: int, max_steps: int, max_length: int
    ) -> TrainEvaluator | None:
        """None without ``--eval-text`` specs; reads the files now, before any training."""
        if not specs:
            return None
        return cls(load_eval_sets(specs), tokenizer, every=every, max_steps=max_steps, max_length=max_length)

    def due(self, step: int) -> bool:
        """Every ``every`` steps (0: only the last) and always after the last step."""
        return step == self.max_steps or (self.every > 0 and step % self.every == 0)

    def __call__(self, step: int, model: torch.nn.Module) -> dict[str, float]:
        """The set scores after optimizer step ``step`` (1-based), or ``{}`` when not due."""
        if not self.due(step):
            return {}
        scores = score_eval_sets(model, self.tokenizer, self.sets, max_length=self.max_length)
        logger.info(
            "step %d eval | %s", step,
            ", ".join(f"{s.name} {scores[metric_key(s.name)]:.4f} bits/byte" for s in self.sets),
        )
        return scores
