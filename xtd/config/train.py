"""Settings of ``xtd train`` (:class:`TrainConfig`) and the sections it shares with the layers
that read them: :class:`ALMSettings` (the data path and the loss), :class:`DataSettings`
(the data path), :class:`OptimSettings` (the optimizer and the schedule).

Defaults are the recommended configuration (docs/method.md, "Defaults"): ALM on
unconstrained chunks, merged by teacher boundary probability with γ = 0.1, debiased,
binary_ce with τ = 100, plus SFT, GradMag, LoRA r = 64, lr 1e-5, 64 texts of 512 tokens
per step, linear warm-up then linear decay.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xtd.config._base import ConfigBase, device_problem, flag, option, section
from xtd.errors import ConfigError
from xtd.tokenization import BOUNDARY_CLASSES

__all__ = [
    "ALM_DISTANCES",
    "ALMSettings",
    "DataSettings",
    "OptimSettings",
    "TrainConfig",
    "TRAIN_ALM_DISTANCES",
    "parse_eval_text",
]

ALM_DISTANCES = (
    "binary_ce",
    "binary_kl",
    "abs",
    "abs_exp",
    "reverse_binary_kl",
    "binary_kl_temp_limit",
    "renyi",
    "joschu_k2",
    "joschu_k3",
)
"""Every distance :func:`xtd.losses.alm_distance` computes (docs/method.md, "The distance")."""
TRAIN_ALM_DISTANCES = tuple(d for d in ALM_DISTANCES if d != "renyi")
"""``--distance`` choices: all but ``renyi``, whose order alpha the CLI does not expose."""


def _require(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ALMSettings(ConfigBase):
    """How ALM chunks, merges, debiases and compares (docs/method.md): read by the data path
    (chunk kind, boundary classes) and by the loss (all of it)."""

    chunks: str = option(
        "unconstrained", flag="alm_chunks", metavar="unconstrained|space",
        help="ALM chunks: unconstrained (greedy, merged in the loss) or space.",
    )  # fmt: skip
    merge: bool = option(
        True, help="Merge chunks forward until the teacher's boundary probability exceeds --merge-threshold."
    )
    merge_threshold: float = option(
        0.1, metavar="γ", help="γ: a chunk may end only where the teacher's boundary probability exceeds this."
    )
    debias: bool = option(True, help="Add the boundary log-mass to each chunk log-likelihood.")
    tau: float = option(100.0, metavar="τ", help="Binarisation temperature τ of the ALM distance.")
    distance: str = option("binary_ce", metavar="NAME", help=f"ALM distance: {', '.join(TRAIN_ALM_DISTANCES)}.")
    boundary_classes: tuple[str, ...] = option(
        BOUNDARY_CLASSES, sep=",", metavar="CLASSES",
        help=f"Comma-separated boundary classes whose mass debiases and merges: {', '.join(BOUNDARY_CLASSES)}.",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.boundary_classes, str):
            object.__setattr__(self, "boundary_classes", tuple(c.strip() for c in self.boundary_classes.split(",") if c.strip()))
        problems: list[str] = []
        _require(problems, self.chunks in ("unconstrained", "space"),
                 f"{flag('alm_chunks')} must be unconstrained or space, not {self.chunks!r}")  # fmt: skip
        _require(problems, self.distance in TRAIN_ALM_DISTANCES,
                 f"{flag('distance')} must be one of {', '.join(TRAIN_ALM_DISTANCES)}, not {self.distance!r}")  # fmt: skip
        unknown = [c for c in self.boundary_classes if c not in BOUNDARY_CLASSES]
        _require(
            problems, not unknown and bool(self.boundary_classes),
            f"{flag('boundary_classes')} must be a non-empty subset of {', '.join(BOUNDARY_CLASSES)}"
            + (f", not {', '.join(map(repr, unknown))}" if unknown else ""),
        )  # fmt: skip
        _require(problems, 0.0 <= self.merge_threshold < 1.0,
                 f"{flag('merge_threshold')} ({self.merge_threshold}) must be in [0, 1)")  # fmt: skip
        _require(problems, self.tau > 0, f"{flag('tau')} ({self.tau}) must be positive")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings(ConfigBase):
    """How a step's texts are cut, tokenised, aligned and packed (read by :mod:`xtd.train_data`)."""

    batch_size: int = option(64, metavar="N", help="Texts per optimizer step, over all ranks.")
    micro_batch_size: int | None = option(
        None, metavar="N", help="Texts per forward pass (gradient accumulation); default: all of a rank's texts at once."
    )
    micro_batch_tokens: int | None = option(
        None, metavar="N",
        help="Padded student tokens per forward pass: texts packed longest first (a longer text goes alone).",
    )  # fmt: skip
    max_student_length: int = option(
        512, metavar="N", help="Student tokens per text; longer texts are split or truncated (--long-documents)."
    )
    long_documents: str = option(
        "split", metavar="split|truncate",
        help="Documents longer than --max-student-length: split into pieces of equal teacher rows, or truncate.",
    )  # fmt: skip
    max_teacher_length: int | None = option(
        None, metavar="N", help="Teacher rows per text (default: all stored rows the student's bytes reach)."
    )
    num_workers: int = option(
        0, metavar="N", help="DataLoader worker processes for tokenisation and alignment (0: the main process)."
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        _require(problems, self.long_documents in ("split", "truncate"),
                 f"{flag('long_documents')} must be split or truncate, not {self.long_documents!r}")  # fmt: skip
        _require(problems, self.num_workers >= 0, f"{flag('num_workers')} ({self.num_workers}) must be ≥ 0")
        for name in ("batch_size", "max_student_length"):
            _require(problems, getattr(self, name) >= 1, f"{flag(name)} ({getattr(self, name)}) must be ≥ 1")
        for name in ("micro_batch_size", "micro_batch_tokens", "max_teacher_length"):
            value = getattr(self, name)
            _require(problems, value is None or value >= 1, f"{flag(name)} ({value}) must be ≥ 1")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            problems.append(
                f"{flag('micro_batch_size')} ({self.micro_batch_size}) must not exceed "
                f"{flag('batch_size')} ({self.batch_size})"
            )
        if problems:
            raise ConfigError("; ".join(problems))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSettings(ConfigBase):
    """AdamW and its learning-rate schedule (read by the training loop)."""

    lr: float = option(1e-5, metavar="LR", help="Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, metavar="X", help="AdamW weight decay.")
    adam_beta1: float = option(0.9, metavar="β1", help="AdamW β1.")
    adam_beta2: float = option(0.999, metavar="β2", help="AdamW β2.")
    warmup_steps: int | None = option(None, metavar="N", help="Linear warm-up steps; default: a tenth of --max-steps.")
    schedule: str = option("linear", metavar="linear|cosine", help="Decay after warm-up, to 0 at --max-steps.")
    max_grad_norm: float = option(1.0, metavar="X", help="Clip the global gradient norm to this; 0 disables clipping.")

    def __post_init__(self) -> None:
        problems: list[str] = []
        _require(problems, self.schedule in ("linear", "cosine"),
                 f"{flag('schedule')} must be linear or cosine, not {self.schedule!r}")  # fmt: skip
        _require(problems, self.lr > 0, f"{flag('lr')} ({self.lr}) must be positive")
        _require(problems, self.weight_decay >= 0, f"{flag('weight_decay')} ({self.weight_decay}) must be ≥ 0")
        for name in ("adam_beta1", "adam_beta2"):
            _require(problems, 0.0 <= getattr(self, name) < 1.0, f"{flag(name)} ({getattr(self, name)}) must be in [0, 1)")
        _require(problems, self.max_grad_norm >= 0,
                 f"{flag('max_grad_norm')} ({self.max_grad_norm}) must be ≥ 0 (0 disables clipping)")  # fmt: skip
        _require(problems, self.warmup_steps is None or self.warmup_steps >= 0,
                 f"{flag('warmup_steps')} ({self.warmup_steps}) must be ≥ 0")  # fmt: skip
        if problems:
            raise ConfigError("; ".join(problems))

    def warmup(self, max_steps: int) -> int:
        """``warmup_steps``, or a tenth of ``max_steps`` when unset (the paper: 2k of 20k)."""
        return self.warmup_steps if self.warmup_steps is not None else max_steps // 10


def parse_eval_text(spec: str) -> tuple[str, str]:
    """An evaluation-set flag value: ``NAME=FILE`` → (NAME, FILE); a bare ``FILE`` is named
    after its stem.

    Raises:
        ConfigError: an empty file part or a name outside ``[A-Za-z0-9_.-]``.
    """
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    name, path = name.strip(), path.strip()
    if not path or not name or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in name):
        raise ConfigError(
            f"{flag('eval_text')} {spec!r} must be NAME=FILE (NAME of letters, digits, '_', '.', '-') or a FILE"
        )
    return name, path


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigBase):
    """Settings of ``xtd train``: a student trained from one or more teacher stores."""

    store: tuple[str, ...] = option(
        metavar="STORE", help="Teacher store (path or fsspec URL); repeat to mix several in proportion to their size."
    )
    out: str = option(short="-o", metavar="DIR", help="Run folder: the final Hugging Face model, metrics.jsonl, checkpoints/.")
    student: str = option(
        "embedded:smollm2", metavar="MODEL", help="Student model: HF id, folder, or embedded:smollm2 (packaged SmolLM2-135M-Instruct)."
    )
    tokenizer: str | None = option(
        None, metavar="TOKENIZER",
        help="Move the student to this tokenizer (HF id, folder, tokenizer.json, bytes, embedded:NAME); FVT init.",
    )  # fmt: skip
    model_config: str | None = option(
        None, metavar="PATH", help="Train a fresh model from this HF config.json or folder (--student is then unused)."
    )
    init: str = option(
        "fvt", metavar="fvt|hypernet:DIR",
        help="How the embeddings of a new --tokenizer start: fvt, or hypernet:DIR (predicted by a hypernetwork for --student, e.g. from xtd hypernet train).",
    )  # fmt: skip
    losses: str = option(
        "alm+sft", metavar="LOSSES", help="Losses joined by '+' (an unknown name is an error listing every loss)."
    )
    loss_weights: str = option(
        "", metavar="LOSS=W,...", help="Fixed weights, e.g. alm=1,sft=0.5 (default 1; they cancel out under GradMag)."
    )
    gradmag: bool = option(
        True, help="Weight each loss by the inverse norm of its gradient on the last block, per micro-batch."
    )
    alm: ALMSettings = section(ALMSettings, help="ALM: chunks, merging, debiasing, distance, boundary classes.")
    data: DataSettings = section(DataSettings, help="Texts per step, lengths, packing, long documents.")
    optim: OptimSettings = section(OptimSettings, help="AdamW and its schedule.")
    lora_rank: int = option(64, metavar="N", help="LoRA rank (alpha = rank); 0 = full fine-tuning.")
    untie: bool = option(False, help="Split tied input/output embeddings of the student.")
    max_steps: int = option(20000, metavar="N", help="Optimizer steps; 0 writes the initialised, untrained student.")
    seed: int = option(0, metavar="N", help="Seed of the data order, initialisation and dropout.")
    checkpoint_every: int = option(500, metavar="N", help="Write a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = option(2, metavar="N", help="Keep this many most recent checkpoints.")
    log_every: int = option(1, metavar="N", help="Log a line (and a metrics.jsonl record) every N steps.")
    resume: bool = option(
        False, help="Continue the run in --out from its latest checkpoint, with its saved settings."
    )
    overwrite: bool = option(False, help="Start afresh in an --out that holds a previous run.")
    amp: bool = option(True, help="bf16 autocast on CUDA (the output layer stays fp32; ignored on CPU).")
    device: str = option("auto", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (auto: the local rank's GPU when present).")
    eval_text: tuple[str, ...] = option(
        (), metavar="NAME=FILE", help="Evaluation set (.txt/.jsonl), repeatable: its bits per byte goes to metrics.jsonl."
    )
    eval_every: int = option(0, metavar="N", help="Score the --eval-text sets every N steps (0: after the last step only).")
    eval_max_length: int | None = option(
        None, metavar="N", help="Student tokens per scoring window of --eval-text (default: --max-student-length)."
    )

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("store", "eval_text"):
            if isinstance(getattr(self, name), str):  # a single value given as a string
                object.__setattr__(self, name, (getattr(self, name),))
        _require(problems, bool(self.store), f"{flag('store')} needs at least one teacher store")
        _require(problems, bool(self.out), f"{flag('out')} must name a folder")
        try:
            self.loss_weight_map()  # validates --losses first, then --loss-weights
        except ConfigError as exc:
            problems.append(str(exc))
        for name in ("lora_rank", "max_steps", "checkpoint_every", "keep_checkpoints"):
            _require(problems, getattr(self, name) >= 0, f"{flag(name)} ({getattr(self, name)}) must be ≥ 0")
        _require(problems, self.log_every >= 1, f"{flag('log_every')} ({self.log_every}) must be ≥ 1")
        warmup = self.optim.warmup_steps
        if warmup is not None and self.max_steps > 0 and warmup >= self.max_steps:
            problems.append(
                f"{flag('warmup_steps')} ({warmup}) must be smaller than {flag('max_steps')} ({self.max_steps})"
            )
        _require(problems, not (self.resume and self.overwrite),
                 f"{flag('resume')} and {flag('overwrite')} exclude each other; pick one")  # fmt: skip
        problems.extend(self._init_problems())
        problems.extend(self._eval_problems())
        problems.extend(device_problem(self.device))
        if problems:
            raise ConfigError("; ".join(problems))

    def _init_problems(self) -> list[str]:
        if self.init == "fvt":
            return []
        if not self.init.startswith("hypernet:") or not self.init.removeprefix("hypernet:").strip():
            return [f"{flag('init')} must be fvt or hypernet:DIR, not {self.init!r}"]
        if self.model_config is not None or self.tokenizer is None:
            return [f"{flag('init')} hypernet:DIR needs {flag('tokenizer')} (the new tokenizer) and a --student (not {flag('model_config')})"]
        return []

    def _eval_problems(self) -> list[str]:
        problems: list[str] = []
        names = []
        for spec in self.eval_text:
            try:
                names.append(parse_eval_text(spec)[0])
            except ConfigError as exc:
                problems.append(str(exc))
        if len(set(names)) != len(names):
            problems.append(f"{flag('eval_text')} names a set twice; give each set its own NAME=FILE")
        _require(problems, self.eval_every >= 0, f"{flag('eval_every')} ({self.eval_every}) must be ≥ 0")
        _require(problems, not (self.eval_every and not self.eval_text),
                 f"{flag('eval_every')} needs at least one {flag('eval_text')} NAME=FILE")  # fmt: skip
        if self.eval_max_length is not None and self.eval_max_length < 2:
            problems.append(f"{flag('eval_max_length')} ({self.eval_max_length}) must be ≥ 2")
        return problems

    def loss_names(self) -> tuple[str, ...]:
        """The losses as a tuple in the order given, validated against the loss registry."""
        from xtd.losses.registry import (
            LOSSES,  # torch: imported when a run is checked, not at CLI start
        )

        names = tuple(part.strip() for part in self.losses.split("+"))
        unknown = [n for n in names if n not in LOSSES]
        if unknown or not self.losses.strip():
            raise ConfigError(
                f"{flag('losses')} {self.losses!r}: unknown loss "
                f"{', '.join(map(repr, unknown)) or 'list'}; choose from {', '.join(LOSSES)} "
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
        """The warm-up steps of this run (:meth:`OptimSettings.warmup`)."""
        return self.optim.warmup(self.max_steps)
