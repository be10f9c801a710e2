"""Settings of ``xtd eval`` (:class:`EvalConfig`): bits per byte, ensembles, exact match,
teacher samples (:mod:`xtd.evaluate`, :mod:`xtd.sampling`)."""

from __future__ import annotations

import dataclasses

from xtd.config._base import ConfigBase, canonical_dtype, device_problem, flag, option
from xtd.errors import ConfigError

__all__ = ["EvalConfig", "EVAL_COMBINE_RULES", "EVAL_DEFAULT_HELD_OUT"]

EVAL_COMBINE_RULES = ("p", "logp")
"""Ensemble rules (docs/method.md, "Ensembles"): log of the mean probability; renormalised mean log-prob."""
EVAL_DEFAULT_HELD_OUT = 8
"""Held-out documents scored when neither --text nor --held-out is given (and no --task)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(ConfigBase):
    """Settings of ``xtd eval``: bits per byte, ensembles and exact match (xtd/evaluate.py)."""

    model: tuple[str, ...] = option((), short="-m", metavar="MODEL", help="Model to score (HF id, folder, embedded:smollm2); repeat for one row each.")
    tokenizer: tuple[str, ...] = option((), metavar="TOKENIZER", help="Tokenizer override: once for all models, or once per --model (default: each model's own).")
    text: str | None = option(None, metavar="FILE", help="Text to score: a .txt file (one text) or a .jsonl file (field \"text\" per line).")
    held_out: int | None = option(None, metavar="N", help="Score the last N documents of the embedded corpus (default 8 without --text/--task).")
    ensemble: tuple[str, ...] = option((), metavar="M1,M2,...", help="Comma-separated models sharing one tokenizer, scored as an ensemble (one row per --combine rule); repeatable.")
    combine: tuple[str, ...] = option(EVAL_COMBINE_RULES, sep=",", metavar="p,logp", help="Ensemble rules: p (mean probability) and/or logp (mean log-probability).")
    task: str | None = option(None, metavar="FILE", help="JSON-lines file of {\"prompt\", \"answer\"}: exact-match accuracy of greedy generation.")
    max_new_tokens: int = option(32, metavar="N", help="Generation budget per task prompt.")
    max_length: int = option(1024, metavar="N", help="Tokens per scoring window (including the BOS).")
    stride: int = option(512, metavar="N", help="Context tokens each later scoring window carries over from the previous one (1 <= stride < max_length).")
    batch_size: int = option(1, metavar="N", help="Windows per forward pass.")
    dtype: str = option("fp32", metavar="DTYPE", help="Model dtype: fp32, bf16, fp16 or auto (bf16 on CUDA, fp32 on CPU).")
    device: str = option("auto", metavar="DEVICE", help="cpu, cuda, cuda:N; auto = CUDA when present.")
    sample_from: str | None = option(None, metavar="TEACHER", help="Teacher whose seeded samples (temperature 1) become the text to score: a student's bits per byte on them is the teacher's entropy plus KL(teacher ‖ student) per byte.")
    num_samples: int = option(32, metavar="N", help="Teacher samples to draw (--sample-from).")
    sample_tokens: int = option(256, metavar="N", help="Token budget of each teacher sample (it stops earlier at EOS).")
    sample_seed: int = option(0, metavar="N", help="Seed of the teacher samples: same teacher, prompts and seed → the same file.")
    prompts: str | None = option(None, metavar="FILE", help="Prompts the samples continue (cycled): .txt (one per line) or .jsonl (field text); default none.")
    samples_out: str | None = option(None, metavar="FILE", help="Write the teacher samples here as JSON lines (--text scores the file later).")
    tasks: tuple[str, ...] = option((), sep=",", metavar="TASK,...", help="lm-eval tasks, comma-separated: xtd_next_verse, xtd_next_line (offline), any lm-eval task, or a task YAML file (pip install 'xtd[eval]').")
    task_limit: int | None = option(None, metavar="N", help="At most this many documents per --tasks task.")

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.model and not self.ensemble and not (self.sample_from and self.samples_out):
            problems.append(
                f"nothing to evaluate: pass {flag('model')} or {flag('ensemble')} (or {flag('sample_from')} "
                f"with {flag('samples_out')} to only write teacher samples)"
            )
        if self.sample_from is not None:
            if self.text is not None or self.held_out is not None:
                problems.append(f"{flag('sample_from')} makes the text to score: drop {flag('text')}/{flag('held_out')}")
            for name in ("num_samples", "sample_tokens"):
                if getattr(self, name) < 1:
                    problems.append(f"{flag(name)} ({getattr(self, name)}) must be at least 1")
        elif self.prompts is not None or self.samples_out is not None:
            problems.append(f"{flag('prompts')} and {flag('samples_out')} need {flag('sample_from')} TEACHER")
        if len(self.tokenizer) not in (0, 1, len(self.model)) or (len(self.tokenizer) > 1 and not self.model):
            problems.append(
                f"{flag('tokenizer')} given {len(self.tokenizer)} times for {len(self.model)} "
                f"{flag('model')} flags: give it once (for all models) or once per model"
            )
        if len(self.tokenizer) > 1 and self.ensemble:
            problems.append(f"{flag('ensemble')} takes at most one {flag('tokenizer')} (shared by its members)")
        if self.text is not None and self.held_out is not None:
            problems.append(f"give {flag('text')} or {flag('held_out')}, not both")
        if self.held_out is not None and self.held_out < 1:
            problems.append(f"{flag('held_out')} ({self.held_out}) must be at least 1")
        for group in self.ensemble:
            if len([m for m in group.split(",") if m.strip()]) < 2:
                problems.append(f"{flag('ensemble')} {group!r} must list at least two models, comma-separated")
        if self.task_limit is not None and self.task_limit < 1:
            problems.append(f"{flag('task_limit')} ({self.task_limit}) must be at least 1")
        if self.ensemble and self.text is None and self.held_out_documents() is None and self.sample_from is None \
                and not self.tasks:
            problems.append(f"{flag('ensemble')} scores text: pass {flag('text')} or {flag('held_out')}")
        bad = [c for c in self.combine if c not in EVAL_COMBINE_RULES]
        if bad or not self.combine:
            problems.append(f"{flag('combine')} {','.join(self.combine)!r}: choose from {', '.join(EVAL_COMBINE_RULES)}")
        if self.max_new_tokens < 1:
            problems.append(f"{flag('max_new_tokens')} ({self.max_new_tokens}) must be at least 1")
        if self.max_length < 2:
            problems.append(f"{flag('max_length')} ({self.max_length}) must be at least 2")
        if not 1 <= self.stride < self.max_length:
            problems.append(
                f"{flag('stride')} ({self.stride}) must be at least 1 and smaller than {flag('max_length')} ({self.max_length})"
            )
        if self.batch_size < 1:
            problems.append(f"{flag('batch_size')} ({self.batch_size}) must be at least 1")
        problems.extend(device_problem(self.device))
        try:
            object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))

    def held_out_documents(self) -> int | None:
        """How many held-out documents to score, or None (score --text, or only run --task)."""
        if self.held_out is not None:
            return self.held_out
        if self.text is None and self.task is None and self.sample_from is None and not self.tasks:
            return EVAL_DEFAULT_HELD_OUT
        return None

    def tokenizer_for(self, index: int) -> str | None:
        """The --tokenizer override of the index-th --model, or None for its own tokenizer."""
        if not self.tokenizer:
            return None
        return self.tokenizer[0] if len(self.tokenizer) == 1 else self.tokenizer[index]
