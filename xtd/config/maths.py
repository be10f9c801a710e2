"""Settings of ``xtd maths`` (:class:`MathsConfig`): generated word problems written as data
and task files (:mod:`xtd.maths`)."""

from __future__ import annotations

import dataclasses

from xtd.config._base import ConfigBase, flag, option
from xtd.errors import ConfigError

__all__ = ["MathsConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MathsConfig(ConfigBase):
    """Settings of ``xtd maths``: write generated word problems as data and task files."""

    out: str = option(short="-o", metavar="DIR", help="Folder for train.jsonl, validation.jsonl, test.jsonl (chat records) and test-tasks.jsonl.")
    train: int = option(800, metavar="N", help="Training problems.")
    validation: int = option(100, metavar="N", help="Validation problems (same wordings as training, other questions).")
    test: int = option(100, metavar="N", help="Test problems (half in held-out wordings, half new questions in seen ones).")
    seed: int = option(0, metavar="N", help="Seed of every split's stream.")
    chat_tokenizer: str = option(
        "embedded:smollm2", metavar="TOKENIZER",
        help="Tokenizer whose chat template renders the records for the teacher (it defines the task prompts); "
        "none = precompute's plain 'role: content' lines (--chat-template never).",
    )
    overwrite: bool = option(False, help="Replace files that exist.")

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.out:
            problems.append(f"{flag('out')} must name a folder")
        for name in ("train", "validation", "test"):
            if getattr(self, name) < 0:
                problems.append(f"{flag(name)} ({getattr(self, name)}) must be >= 0")
        if not self.chat_tokenizer:
            problems.append(f"{flag('chat_tokenizer')} must name a tokenizer or be 'none'")
        if problems:
            raise ConfigError("; ".join(problems))
