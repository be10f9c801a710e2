"""Settings of ``xtd precompute`` (:class:`PrecomputeConfig`): run a teacher once over a
dataset into a shard store (:mod:`xtd.precompute`)."""

from __future__ import annotations

import dataclasses

from xtd.config._base import ConfigBase, canonical_dtype, device_problem, flag, option
from xtd.errors import ConfigError

__all__ = ["PrecomputeConfig", "PRECOMPUTE_CHAT_TEMPLATES", "PRECOMPUTE_ERRORS", "PRECOMPUTE_TOPK_CODECS"]

PRECOMPUTE_CHAT_TEMPLATES = ("auto", "never")
PRECOMPUTE_ERRORS = ("strict", "replace")
PRECOMPUTE_TOPK_CODECS = ("q8", "fp16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecomputeConfig(ConfigBase):
    """Settings of ``xtd precompute``: run a teacher once over a dataset into a shard store."""

    out: str = option(short="-o", metavar="STORE", help="Store path or fsspec URL to write (resumed when it exists with the same settings).")
    teacher: str = option("embedded:smollm2", metavar="MODEL", help="Teacher: HF id (cached; we run offline) or folder; embedded:smollm2 = packaged SmolLM2-135M-Instruct.")
    data: str | None = option(None, metavar="DATA", help="Data: .txt/.jsonl/.parquet file or glob, a datasets folder or name; default: the embedded corpus.")
    revision: str | None = option(None, metavar="REV", help="Hub revision of the teacher (branch, tag or commit).")
    dtype: str = option("auto", metavar="DTYPE", help="Forward precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32.")
    top_k: int = option(32, metavar="K", help="Top-k next-token log-probs stored per token (0: none).")
    max_length: int = option(
        2048, metavar="N",
        help="Window length in teacher tokens. Longer documents are scored in windows: each later window repeats the "
        "last --stride tokens of the previous one as context and scores only its new tokens, so every token is "
        "scored exactly once, with context; nothing is truncated.",
    )  # fmt: skip
    stride: int = option(512, metavar="N", help="Context tokens each later window repeats from the previous one (1 <= stride < max_length).")
    batch_tokens: int = option(8192, metavar="N", help="Padded tokens per forward batch.")
    hidden: bool = option(False, help="Also store the teacher's last hidden state (after the final norm), fp16.")
    chat_template: str = option("auto", metavar="auto|never", help="Conversations: auto = the teacher's chat template; never = plain 'role: content' lines.")
    rank: int | None = option(None, metavar="N", help="This process's rank (default: $RANK from torchrun, else 0).")
    world_size: int | None = option(None, metavar="N", help="Number of ranks (default: $WORLD_SIZE from torchrun, else 1); document d goes to rank d % world_size.")
    limit: int | None = option(None, metavar="N", help="Read at most this many records (empty ones included): a record is one line of a .jsonl file, one row of a dataset, one whole .txt file, or one Shakespeare scene or Bible chapter of the embedded corpus. Raising it on a finished store extends the store.")
    split: str = option("train", metavar="SPLIT", help="Split of a datasets dataset.")
    text_field: str | None = option(None, metavar="FIELD", help="Field holding the text or the messages (default: text, messages or conversations).")
    errors: str = option("strict", metavar="strict|replace", help="Invalid UTF-8 in files: strict = an error naming file and byte offset; replace = U+FFFD.")
    overwrite: bool = option(False, help="Replace a store written with other settings (default: refuse).")
    shard_tokens: int | None = option(None, metavar="N", help="Token rows per committed shard (default: the storage default).")
    topk_codec: str = option("q8", metavar="q8|fp16", help="On-disk codec of the top-k log-probs: q8 or fp16.")
    resume: bool = option(False, help="Finish or extend the store at --out with the settings saved in it (no other flag needed).")
    device: str = option("auto", metavar="DEVICE", help="cpu, cuda, cuda:N; auto = CUDA when present (the local rank's GPU under torchrun).")

    def __post_init__(self) -> None:
        problems = []
        if not self.out:
            problems.append(f"{flag('out')} must name a store path or URL")
        try:
            object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        except ConfigError as exc:
            problems.append(str(exc))
        for name, value, choices in (
            ("chat_template", self.chat_template, PRECOMPUTE_CHAT_TEMPLATES),
            ("errors", self.errors, PRECOMPUTE_ERRORS),
            ("topk_codec", self.topk_codec, PRECOMPUTE_TOPK_CODECS),
        ):
            if value not in choices:
                problems.append(f"{flag(name)} {value!r}: choose from {', '.join(choices)}")
        if self.top_k < 0:
            problems.append(f"{flag('top_k')} ({self.top_k}) must be 0 or more")
        if self.max_length < 2:
            problems.append(f"{flag('max_length')} ({self.max_length}) must be at least 2")
        if not 1 <= self.stride < self.max_length:
            problems.append(
                f"{flag('stride')} ({self.stride}) must be at least 1 and smaller than {flag('max_length')} ({self.max_length})"
            )
        if self.batch_tokens < 1:
            problems.append(f"{flag('batch_tokens')} ({self.batch_tokens}) must be at least 1")
        if self.limit is not None and self.limit < 1:
            problems.append(f"{flag('limit')} ({self.limit}) must be at least 1 (it counts records)")
        if self.shard_tokens is not None and self.shard_tokens < 1:
            problems.append(f"{flag('shard_tokens')} ({self.shard_tokens}) must be at least 1")
        if (self.rank is None) != (self.world_size is None):
            problems.append(f"give both {flag('rank')} and {flag('world_size')}, or neither")
        elif self.rank is not None and self.world_size is not None and not 0 <= self.rank < self.world_size:
            problems.append(f"{flag('rank')} ({self.rank}) must be in [0, {flag('world_size')} ({self.world_size}))")
        problems.extend(device_problem(self.device))
        if problems:
            raise ConfigError("; ".join(problems))
