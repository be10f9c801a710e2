"""Typed configuration: one frozen dataclass per command, holding every default.

The CLI reads its defaults from these classes and builds them; the Python API takes
the same objects (``xtd.precompute(PrecomputeConfig(...))``). ``__post_init__``
validates and names the flag the user typed. Each config round-trips through
``to_dict``/``from_dict`` and is saved with every output (store attributes,
checkpoint ``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Self

from xtd.errors import ConfigError
from xtd.tokenization import BOUNDARY_CLASSES

__all__ = ["ConfigBase", "flag"]


def flag(field_name: str) -> str:
    """The command-line flag of a config field: ``batch_tokens`` → ``--batch-tokens``."""
    return "--" + field_name.replace("_", "-")


class ConfigBase:
    """Shared behaviour of the config dataclasses: dict/JSON round trip with full validation."""

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-able values (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict, reporting every unknown key at once.

        Raises:
            ConfigError: unknown keys, or a value that fails validation.
        """
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} keys: {', '.join(map(repr, unknown))}; "
                f"known keys are {', '.join(sorted(names))}"
            )
        kwargs = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a missing required field
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        """Read a config file written by :meth:`to_dict` (or by hand).

        Raises:
            ConfigError: the file is missing, is not a JSON object, or has duplicate keys.
        """

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    raise ConfigError(f"config {str(path)!r} sets {key!r} twice")
                seen[key] = value
            return seen

        try:
            data = json.loads(Path(path).read_text(), object_pairs_hook=no_duplicates)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
        return cls.from_dict(data)


# Each command's config class follows, in its own section, named <Verb>Config and
# declared as @dataclass(frozen=True, kw_only=True) subclassing ConfigBase.


# ---------------------------------------------------------------------------------------
# TrainConfig (xtd train; owned by xtd/train.py)
# ---------------------------------------------------------------------------------------

TRAIN_LOSSES = ("alm", "sft", "kd", "uld", "mined", "latents")
"""Loss names ``--losses`` accepts (joined with ``+``); spec/ALM.md §9 items 11–12."""
TRAIN_BOUNDARY_CLASSES = BOUNDARY_CLASSES
"""Every boundary class of the teacher store can be enabled (xtd.tokenization owns the list)."""
TRAIN_ALM_DISTANCES = (
    "binary_ce",
    "binary_kl",
    "abs",
    "abs_exp",
    "reverse_binary_kl",
    "binary_kl_temp_limit",
    "joschu_k2",
    "joschu_k3",
)
"""``--distance`` choices: :data:`xtd.losses.ALM_DISTANCES` without ``renyi``, whose order
alpha the CLI does not expose. Listed here rather than imported because xtd.losses
imports torch and this module must stay light; tests/test_losses.py checks the two agree."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigBase):
    """Settings of ``xtd train``: a student trained from one or more teacher stores.

    Defaults are the recommended configuration of spec/ALM.md §4.6 (ALM on
    unconstrained chunks, merged by teacher boundary probability with γ = 0.1,
    debiased, binary_ce with τ = 100, plus SFT, GradMag, LoRA r = 64, lr 1e-5,
    64 texts of 512 tokens per step, linear warm-up then linear decay).
    """

    store: tuple[str, ...]
    """Teacher store path(s) or fsspec URL(s); several are mixed in proportion to their size."""
    out: str
    """Run folder: the final Hugging Face model, ``metrics.jsonl`` and ``checkpoints/``."""
    student: str = "embedded:smollm2"
    """Student model: HF id or folder (``embedded:smollm2`` = the packaged SmolLM2-135M-Instruct)."""
    tokenizer: str | None = None
    """Move the student to this tokenizer (HF id, folder, tokenizer.json, ``bytes``, ``embedded:<name>``); FVT init."""
    model_config: str | None = None
    """Train a fresh model from this HF config (config.json or folder; --student is then unused)."""
    losses: str = "alm+sft"
    """Losses joined by ``+``, from alm, sft, kd, uld, mined, latents."""
    loss_weights: str = ""
    """Fixed weights, e.g. ``alm=1,sft=0.5`` (unnamed losses weigh 1; GradMag makes fixed weights cancel)."""
    gradmag: bool = True
    """Weight each loss by the inverse norm of its gradient on the last block (spec §4.5),
    per micro-batch (so with accumulation the step's gradient depends on the cut)."""
    alm_chunks: str = "unconstrained"
    """ALM chunk kind: ``unconstrained`` (greedy chunks, merged in the loss) or ``space`` (spec §3.2)."""
    merge: bool = True
    """Merge chunks forward until the teacher's boundary probability exceeds --merge-threshold (spec §4.2 step 5)."""
    merge_threshold: float = 0.1
    """γ: a chunk may end only where the teacher's boundary probability exceeds this."""
    debias: bool = True
    """Append the boundary log-mass to each chunk log-likelihood (``append_space``, spec §4.2 step 6)."""
    tau: float = 100.0
    """Binarisation temperature τ of the ALM distance."""
    distance: str = "binary_ce"
    """ALM distance (spec §4.2 step 7)."""
    boundary_classes: tuple[str, ...] = TRAIN_BOUNDARY_CLASSES
    """Boundary classes whose mass debiases and merges (teacher columns and student mask)."""
    lora_rank: int = 64
    """LoRA rank (alpha = rank); 0 = full fine-tuning."""
    untie: bool = False
    """Split tied input/output embeddings of the student."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.999
    """AdamW β2."""
    warmup_steps: int | None = None
    """Linear warm-up steps; default: a tenth of --max-steps (spec: 2k of 20k)."""
    max_steps: int = 20000
    """Optimizer steps; 0 writes the initialised, untrained student."""
    schedule: str = "linear"
    """Decay after warm-up: ``linear`` or ``cosine`` (to 0 at --max-steps)."""
    batch_size: int = 64
    """Texts per optimizer step, over all ranks."""
    micro_batch_size: int | None = None
    """Texts per forward pass (gradient accumulation); default: all of a rank's texts at once."""
    micro_batch_tokens: int | None = None
    """Padded student tokens per forward pass: texts are packed, longest first, into
    micro-batches of at most this many (a longer text goes alone); combines with
    --micro-batch-size. Default: no token budget."""
    max_student_length: int = 512
    """Student tokens per text; longer texts are truncated (teacher rows cut at the same bytes)."""
    long_documents: str = "split"
    """Documents longer than --max-student-length tokens: ``split`` into pieces of equal
    teacher rows, each a text of its own, or ``truncate`` (only their start is trained on)."""
    max_teacher_length: int | None = None
    """Teacher rows per text (default: all stored rows that the student's bytes reach)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    seed: int = 0
    """Seed of the data order, initialisation and dropout."""
    checkpoint_every: int = 500
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep this many most recent checkpoints."""
    log_every: int = 1
    """Log a line (and a metrics.jsonl record) every N steps."""
    resume: bool = False
    """Continue from the latest checkpoint in --out (same data order, optimizer and RNG state)."""
    overwrite: bool = False
    """Start afresh even if --out holds a previous run."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    device: str | None = None
    """``cpu``, ``cuda`` or ``cuda:N``; default: CUDA when present (the local rank's GPU under torchrun)."""
    num_workers: int = 0
    """DataLoader worker processes for tokenisation and alignment (0: in the main process)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.store, str):  # a single path given as a string
            object.__setattr__(self, "store", (self.store,))
        if not self.store:
            problems.append(f"{flag('store')} needs at least one teacher store")
        if not self.out:
            problems.append(f"{flag('out')} must name a folder")
        try:
            self.loss_weight_map()  # validates --losses first, then --loss-weights
        except ConfigError as exc:
            problems.append(str(exc))
        if self.alm_chunks not in ("unconstrained", "space"):
            problems.append(f"{flag('alm_chunks')} must be unconstrained or space, not {self.alm_chunks!r}")
        if self.distance not in TRAIN_ALM_DISTANCES:
            problems.append(f"{flag('distance')} must be one of {', '.join(TRAIN_ALM_DISTANCES)}, not {self.distance!r}")
        unknown = [c for c in self.boundary_classes if c not in TRAIN_BOUNDARY_CLASSES]
        if unknown or not self.boundary_classes:
            problems.append(
                f"{flag('boundary_classes')} must be a non-empty subset of {', '.join(TRAIN_BOUNDARY_CLASSES)}"
                + (f", not {', '.join(map(repr, unknown))}" if unknown else "")
            )
        if not 0.0 <= self.merge_threshold < 1.0:
            problems.append(f"{flag('merge_threshold')} ({self.merge_threshold}) must be in [0, 1)")
        if self.tau <= 0:
            problems.append(f"{flag('tau')} ({self.tau}) must be positive")
        if self.long_documents not in ("split", "truncate"):
            problems.append(f"{flag('long_documents')} must be split or truncate, not {self.long_documents!r}")
        if self.schedule not in ("linear", "cosine"):
            problems.append(f"{flag('schedule')} must be linear or cosine, not {self.schedule!r}")
        for name in ("lora_rank", "max_steps", "num_workers", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                problems.append(f"{flag(name)} ({getattr(self, name)}) must be ≥ 0")
        for name in ("batch_size", "max_student_length", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{flag(name)} ({getattr(self, name)}) must be ≥ 1")
        for name in ("micro_batch_size", "micro_batch_tokens", "max_teacher_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{flag(name)} ({value}) must be ≥ 1")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            problems.append(
                f"{flag('micro_batch_size')} ({self.micro_batch_size}) must not exceed "
                f"{flag('batch_size')} ({self.batch_size})"
            )
        if self.lr <= 0:
            problems.append(f"{flag('lr')} ({self.lr}) must be positive")
        if self.weight_decay < 0:
            problems.append(f"{flag('weight_decay')} ({self.weight_decay}) must be ≥ 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{flag(name)} ({getattr(self, name)}) must be in [0, 1)")
        if self.max_grad_norm < 0:
            problems.append(f"{flag('max_grad_norm')} ({self.max_grad_norm}) must be ≥ 0 (0 disables clipping)")
        if self.warmup_steps is not None:
            if self.warmup_steps < 0:
                problems.append(f"{flag('warmup_steps')} ({self.warmup_steps}) must be ≥ 0")
            elif self.max_steps > 0 and self.warmup_steps >= self.max_steps:
                problems.append(
                    f"{flag('warmup_steps')} ({self.warmup_steps}) must be smaller than "
                    f"{flag('max_steps')} ({self.max_steps})"
                )
        if self.resume and self.overwrite:
            problems.append(f"{flag('resume')} and {flag('overwrite')} exclude each other; pick one")
        if problems:
            raise ConfigError("; ".join(problems))

    def loss_names(self) -> tuple[str, ...]:
        """The losses as a tuple in the order given, validated (no unknown or repeated names)."""
        names = tuple(part.strip() for part in self.losses.split("+"))
        unknown = [n for n in names if n not in TRAIN_LOSSES]
        if unknown or not self.losses.strip():
            raise ConfigError(
                f"{flag('losses')} {self.losses!r}: unknown loss "
                f"{', '.join(map(repr, unknown)) or 'list'}; choose from {', '.join(TRAIN_LOSSES)} "
                "joined with '+' (e.g. alm+sft)"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"{flag('losses')} {self.losses!r} names a loss twice")
        return names

    def loss_weight_map(self) -> dict[str, float]:
        """``--loss-weights`` as ``{loss: weight}`` for every chosen loss (default weight 1)."""
        names = self.loss_names()
        weights = dict.fromkeys(names, 1.0)
        for item in filter(None, (p.strip() for p in self.loss_weights.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not sep or key not in names or not number >= 0:
                raise ConfigError(
                    f"{flag('loss_weights')} item {item!r} must be LOSS=WEIGHT with LOSS one of "
                    f"{', '.join(names)} and WEIGHT ≥ 0 (e.g. alm=1,sft=0.5)"
                )
            weights[key] = number
        return weights

    def resolved_warmup_steps(self) -> int:
        """``warmup_steps``, or a tenth of ``max_steps`` when unset (spec §4.6: 2k of 20k)."""
        return self.warmup_steps if self.warmup_steps is not None else self.max_steps // 10


# ---------------------------------------------------------------------------------------
# EvalConfig (xtd eval; owned by xtd/evaluate.py)
# ---------------------------------------------------------------------------------------

EVAL_COMBINE_RULES = ("p", "logp")
"""Ensemble rules (spec/ALM.md §7.3): log of the mean probability; renormalised mean log-prob."""
EVAL_DTYPES = ("float32", "bfloat16", "float16", "auto")
EVAL_DEFAULT_HELD_OUT = 8
"""Held-out documents scored when neither --text nor --held-out is given (and no --task)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(ConfigBase):
    """Settings of ``xtd eval``: bits per byte, ensembles and exact match (xtd/evaluate.py)."""

    model: tuple[str, ...] = ()
    """Models to score, one table row each: HF id, folder or ``embedded:smollm2``."""
    tokenizer: tuple[str, ...] = ()
    """Tokenizer override: none (each model's own), one for every model, or one per --model."""
    text: str | None = None
    """Text to score: a .txt file (one text) or .jsonl file (field ``text`` per line)."""
    held_out: int | None = None
    """Score the last N documents of the embedded corpus (default 8 when no --text)."""
    ensemble: tuple[str, ...] = ()
    """Ensembles of models sharing a tokenizer, each ``m1,m2,...``; one row per --combine rule."""
    combine: tuple[str, ...] = EVAL_COMBINE_RULES
    """Ensemble rules: ``p`` (mean probability) and/or ``logp`` (mean log-probability)."""
    task: str | None = None
    """JSON-lines file of ``{"prompt", "answer"}``: exact-match accuracy of greedy generation."""
    max_new_tokens: int = 32
    """Generation budget per task prompt."""
    max_length: int = 1024
    """Tokens per scoring window (including the BOS)."""
    stride: int = 512
    """Window advance; each token is scored once with ≥ max_length − stride tokens of context."""
    batch_size: int = 1
    """Windows per forward pass."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16, float16 or auto."""
    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N``; ``auto`` = CUDA when present."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.model and not self.ensemble:
            problems.append(f"nothing to evaluate: pass {flag('model')} or {flag('ensemble')}")
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
        if self.ensemble and self.text is None and self.held_out_documents() is None:
            problems.append(f"{flag('ensemble')} scores text: pass {flag('text')} or {flag('held_out')}")
        bad = [c for c in self.combine if c not in EVAL_COMBINE_RULES]
        if bad or not self.combine:
            problems.append(f"{flag('combine')} {','.join(self.combine)!r}: choose from {', '.join(EVAL_COMBINE_RULES)}")
        if self.max_new_tokens < 1:
            problems.append(f"{flag('max_new_tokens')} ({self.max_new_tokens}) must be at least 1")
        if self.max_length < 2:
            problems.append(f"{flag('max_length')} ({self.max_length}) must be at least 2")
        if not 1 <= self.stride <= self.max_length:
            problems.append(f"{flag('stride')} ({self.stride}) must be between 1 and {flag('max_length')} ({self.max_length})")
        if self.batch_size < 1:
            problems.append(f"{flag('batch_size')} ({self.batch_size}) must be at least 1")
        if self.dtype not in EVAL_DTYPES:
            problems.append(f"{flag('dtype')} {self.dtype!r}: choose from {', '.join(EVAL_DTYPES)}")
        if problems:
            raise ConfigError("; ".join(problems))

    def held_out_documents(self) -> int | None:
        """How many held-out documents to score, or None (score --text, or only run --task)."""
        if self.held_out is not None:
            return self.held_out
        if self.text is None and self.task is None:
            return EVAL_DEFAULT_HELD_OUT
        return None

    def tokenizer_for(self, index: int) -> str | None:
        """The --tokenizer override of the index-th --model, or None for its own tokenizer."""
        if not self.tokenizer:
            return None
        return self.tokenizer[0] if len(self.tokenizer) == 1 else self.tokenizer[index]


# ---------------------------------------------------------------------------------------
# PrecomputeConfig (xtd precompute; owned by xtd/precompute.py)
# ---------------------------------------------------------------------------------------

PRECOMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
PRECOMPUTE_CHAT_TEMPLATES = ("auto", "never")
PRECOMPUTE_ERRORS = ("strict", "replace")
PRECOMPUTE_TOPK_CODECS = ("q8", "fp16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecomputeConfig(ConfigBase):
    """Settings of ``xtd precompute``: run a teacher once over a dataset into a shard store."""

    out: str
    """Store path or fsspec URL to write (resumed when it exists with the same settings)."""
    teacher: str = "embedded:smollm2"
    """Teacher: HF id (cached; we run offline) or folder; ``embedded:smollm2`` = packaged SmolLM2-135M-Instruct."""
    data: str | None = None
    """Data: .txt/.jsonl/.parquet file or glob, a datasets folder or name; None = the embedded corpus."""
    revision: str | None = None
    """Hub revision of the teacher (branch, tag or commit)."""
    dtype: str = "auto"
    """Forward precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32."""
    top_k: int = 32
    """Top-k next-token log-probs stored per token (0: none)."""
    max_length: int = 2048
    """Window length in teacher tokens; longer documents are scored in overlapping windows."""
    stride: int = 512
    """Context tokens each later window repeats from the previous one (1 <= stride < max_length)."""
    batch_tokens: int = 8192
    """Padded tokens per forward batch."""
    hidden: bool = False
    """Also store the teacher's last hidden state (after the final norm), fp16."""
    chat_template: str = "auto"
    """Conversations: auto = the teacher's chat template; never = plain 'role: content' lines."""
    rank: int | None = None
    """This process's rank (default: $RANK from torchrun, else 0)."""
    world_size: int | None = None
    """Number of ranks (default: $WORLD_SIZE from torchrun, else 1); document d goes to rank d % world_size."""
    limit: int | None = None
    """Read at most this many records (empty ones included)."""
    split: str = "train"
    """Split of a datasets dataset."""
    text_field: str | None = None
    """Field holding the text or the messages (default: text, messages or conversations)."""
    errors: str = "strict"
    """Invalid UTF-8 in files: strict = an error naming file and byte offset; replace = U+FFFD."""
    overwrite: bool = False
    """Replace a store written with other settings (default: refuse)."""
    shard_tokens: int | None = None
    """Token rows per committed shard (default: the storage default)."""
    topk_codec: str = "q8"
    """On-disk codec of the top-k log-probs: q8 or fp16."""

    def __post_init__(self) -> None:
        problems = []
        if not self.out:
            problems.append(f"{flag('out')} must name a store path or URL")
        for name, value, choices in (
            ("dtype", self.dtype, PRECOMPUTE_DTYPES),
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
        if self.limit is not None and self.limit < 0:
            problems.append(f"{flag('limit')} ({self.limit}) must be 0 or more")
        if self.shard_tokens is not None and self.shard_tokens < 1:
            problems.append(f"{flag('shard_tokens')} ({self.shard_tokens}) must be at least 1")
        if (self.rank is None) != (self.world_size is None):
            problems.append(f"give both {flag('rank')} and {flag('world_size')}, or neither")
        elif self.rank is not None and self.world_size is not None and not 0 <= self.rank < self.world_size:
            problems.append(f"{flag('rank')} ({self.rank}) must be in [0, {flag('world_size')} ({self.world_size}))")
        if problems:
            raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------------------------------
# AlignConfig (xtd align; owned by xtd/cli/align.py)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlignConfig(ConfigBase):
    """Settings of ``xtd align``: chunk two tokenizations, or cache a student's alignment in a store."""

    student_tokenizer: str
    """Student tokenizer: HF id or folder, tokenizer.json path, ``bytes`` or ``embedded:<name>``."""
    teacher_tokenizer: str | None = None
    """Teacher tokenizer (same forms); with --cache it defaults to the one embedded in the store."""
    add_special_tokens: bool = False
    """Let each tokenizer add its own special tokens (bos/eos) to the texts."""
    allow_strip_unicode_normalizer: bool = False
    """Remove an NFC/NFKC normaliser (with a warning) instead of refusing the tokenizer."""
    overwrite: bool = False
    """With --cache: replace an existing cached alignment for this student tokenizer."""
    report: bool = False
    """Audit the pair over a corpus (chunks, digits, numbers, merged groups) instead of listing chunks."""
    merge_threshold: float = 0.1
    """γ of the --report merge statistics: chunks merge until the teacher's boundary probability exceeds it."""

    def __post_init__(self) -> None:
        if not self.student_tokenizer:
            raise ConfigError(f"{flag('student_tokenizer')} must name a tokenizer")
        if not 0.0 <= self.merge_threshold < 1.0:
            raise ConfigError(f"{flag('merge_threshold')} ({self.merge_threshold}) must be in [0, 1)")
        if self.teacher_tokenizer == "":
            raise ConfigError(f"{flag('teacher_tokenizer')} must name a tokenizer")


# ---------------------------------------------------------------------------------------
# MathsConfig (xtd maths; owned by xtd/cli/maths.py, data from xtd/maths.py)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MathsConfig(ConfigBase):
    """Settings of ``xtd maths``: write generated word problems as data and task files."""

    out: str
    """Folder for train.jsonl, validation.jsonl, test.jsonl (chat records) and test-tasks.jsonl."""
    train: int = 800
    """Training problems."""
    validation: int = 100
    """Validation problems (same wordings as training, other questions)."""
    test: int = 100
    """Test problems (half in held-out wordings, half new questions in seen ones)."""
    seed: int = 0
    """Seed of every split's stream."""
    chat_tokenizer: str = "embedded:smollm2"
    """Tokenizer whose chat template the teacher renders the records with (it defines the task
    prompts); ``none`` for precompute's plain 'role: content' rendering (--chat-template never)."""
    overwrite: bool = False
    """Replace files that exist."""

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
