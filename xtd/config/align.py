"""Settings of ``xtd align`` (:class:`AlignConfig`): chunk two tokenizations of texts, or cache
a student's alignment in a store (:mod:`xtd.alignment_cache`)."""

from __future__ import annotations

import dataclasses

from xtd.config._base import ConfigBase, flag, option
from xtd.errors import ConfigError

__all__ = ["AlignConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignConfig(ConfigBase):
    """Settings of ``xtd align``: chunk two tokenizations, or cache a student's alignment in a store."""

    student_tokenizer: str = option(
        metavar="TOKENIZER", help="Student tokenizer: HF id or folder, tokenizer.json, bytes or embedded:NAME."
    )
    teacher_tokenizer: str | None = option(
        None, metavar="TOKENIZER", help="Teacher tokenizer (same forms); with --cache, the one embedded in the store."
    )
    text: str | None = option(
        None, metavar="FILE", help="Texts to align: a .txt file (one text) or a .jsonl file (field \"text\" per line)."
    )
    cache: str | None = option(
        None, metavar="STORE", help="Teacher store: cache the student's alignment of every document in it."
    )
    add_special_tokens: bool = option(False, help="Let each tokenizer add its own special tokens (bos/eos) to the texts.")
    allow_strip_unicode_normalizer: bool = option(False, help="Remove an NFC/NFKC normaliser (with a warning) instead of refusing the tokenizer.")
    overwrite: bool = option(False, help="With --cache: replace an existing cached alignment for this student tokenizer.")
    report: bool = option(False, help="Audit the pair over a corpus (chunks, digits, numbers, merged groups) instead of listing chunks.")
    store: str | None = option(None, metavar="STORE", help="With --report: a teacher store as the corpus (adds the merge statistics).")
    merge_threshold: float = option(0.1, metavar="GAMMA", help="With --report --store: γ of the merge statistics (chunks merge until the teacher's boundary probability exceeds it).")

    def __post_init__(self) -> None:
        if not self.student_tokenizer:
            raise ConfigError(f"{flag('student_tokenizer')} must name a tokenizer")
        if not 0.0 <= self.merge_threshold < 1.0:
            raise ConfigError(f"{flag('merge_threshold')} ({self.merge_threshold}) must be in [0, 1)")
        if self.teacher_tokenizer == "":
            raise ConfigError(f"{flag('teacher_tokenizer')} must name a tokenizer")
        if self.text is not None and self.cache is not None:
            raise ConfigError(f"give {flag('text')} or {flag('cache')}, not both")
