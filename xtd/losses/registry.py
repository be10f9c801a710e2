"""The loss registry: one entry per loss, and the only place that says what a loss needs.

An entry (:class:`LossSpec`) holds a loss's name, what it needs from the teacher store
(top-k, hidden states, boundary classes, the teacher's own tokenizer), whether it reads the
aligned chunks, its data-only count (the global normaliser of an optimizer step, summed
before any forward pass; docs/method.md, "Normalisation"), its compute function and an
optional per-run setup. Everything else iterates the registry: config validation (known
names), the data path (which teacher arrays to read, which counts to report), the input
checks before training, and the objective (one term per chosen loss).

**How to add a loss.** Write its function in a module of :mod:`xtd.losses` (pure tensors,
a ``normalizer=`` argument), then add one entry here::

    register(LossSpec(
        name="myloss", summary="what it compares",
        count=lambda data: count_scored_chunks(data.targets),
        compute=lambda inputs, n: (my_loss(inputs.student.logits(), inputs.targets, normalizer=n), {}),
        needs_topk=True,
    ))

``xtd train --losses alm+myloss`` then reads the top-k it needs, refuses stores without
them, counts its normaliser per step and trains with it (tests/test_registry.py registers
a toy loss this way).

Dimension letters: ``B`` texts, ``S`` student tokens, ``T`` teacher rows, ``V'`` output
columns, ``H`` hidden size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import Protocol

import torch
from torch import Tensor, nn

from xtd.assets import cache_dir
from xtd.config import ALMSettings, flag
from xtd.errors import ConfigError, StoreFormatError, TokenizerMismatchError
from xtd.losses._alm import (
    ALMChunks,
    ALMTargets,
    alm_chunks,
    alm_loss,
    count_alm_groups,
    student_path,
)
from xtd.losses._baselines import (
    count_kd_rows,
    count_mined_terms,
    count_sft_tokens,
    kd_topk_loss,
    kd_topk_loss_from_logprob,
    mined_loss,
    sft_loss,
    uld_loss,
)
from xtd.losses._fused import OutputLayer, fused_output, fused_student_path
from xtd.losses._latents import count_scored_chunks, latents_loss, make_latent_projection
from xtd.losses._mined_map import build_mined_map
from xtd.tokenization import ByteTokenizer, tokenizer_from_json

__all__ = [
    "Batch",
    "LOSSES",
    "LossData",
    "LossInputs",
    "LossSpec",
    "LossState",
    "RunInfo",
    "StudentOutputs",
    "check_stores",
    "count_normalizers",
    "loss_specs",
    "register",
]

Batch = dict[str, Tensor]
"""A padded micro-batch: ``input_ids``/``attention_mask``/``student_*``/``sft_mask`` (B, S),
``teacher_*`` (B, T[, K or H])."""


class TeacherStore(Protocol):
    """What the checks and setups read of a teacher store (:class:`xtd.storage.StoreReader`)."""

    @property
    def tokenizer_json(self) -> str: ...
    @property
    def hidden_size(self) -> int | None: ...
    @property
    def top_k(self) -> int: ...
    @property
    def boundary_classes(self) -> tuple[str, ...]: ...


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a loss's per-run setup may read: the stores, the student, where it runs.

    Attributes:
        stores: ``(url, reader)`` of every ``--store``, in order.
        student_tokenizer: the student's tokenizer.
        student_hidden_size: H_S of the student.
        device: where the student runs.
    """

    stores: tuple[tuple[str, TeacherStore], ...]
    student_tokenizer: ByteTokenizer
    student_hidden_size: int
    device: torch.device


@dataclasses.dataclass(frozen=True, eq=False)
class LossState:
    """What a loss's per-run setup built (:attr:`LossSpec.setup`).

    Attributes:
        module: trained parameters of the loss itself (saved in checkpoints), or None.
        tensors: fixed tensors on the student's device, by name.
        numbers: fixed integers, by name.
    """

    module: nn.Module | None = None
    tensors: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)
    numbers: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class StudentOutputs:
    """The student's outputs on one micro-batch: its logits, or its final hidden states and
    output layer (the fused path computes ℓ^S and σ^S without (B, S, V') logits).

    Attributes:
        input_ids: (B, S) the student tokens.
        boundary_mask: (V,) bool, the student's boundary tokens; its length is the real vocabulary.
        logits_: (B, S, V') float32 logits, or None.
        hidden: (B, S, H) final hidden states (after the last norm), or None.
        output_layer: the head, to use with ``hidden`` when ``logits_`` is None.
        rows: (B, S) bool, the rows the fused path computes (real tokens), or None for all.
    """

    input_ids: Tensor
    boundary_mask: Tensor
    logits_: Tensor | None = None
    hidden: Tensor | None = None
    output_layer: OutputLayer | None = None
    rows: Tensor | None = None

    @cached_property
    def path(self) -> tuple[Tensor, Tensor]:
        """``(ℓ^S, σ^S)``, each (B, S) float32 (docs/method.md, "Scoring a chunk"); computed once."""
        if self.logits_ is not None:
            return student_path(self.logits_, self.input_ids, self.boundary_mask)
        if self.hidden is None or self.output_layer is None:
            raise ConfigError("the student's outputs hold neither logits nor hidden states with an output layer")
        return fused_student_path(self.hidden, self.output_layer, self.input_ids, self.boundary_mask, rows=self.rows)

    def logits(self) -> Tensor:
        """(B, S, V') logits; materialised from the hidden states when only those were kept."""
        if self.logits_ is not None:
            return self.logits_
        if self.hidden is None or self.output_layer is None:
            raise ConfigError("the student's outputs hold neither logits nor hidden states with an output layer")
        return self.output_layer.logits(self.hidden)

    @property
    def vocab_size(self) -> int:
        return int(self.boundary_mask.numel())


@dataclasses.dataclass(eq=False)
class LossData:
    """One micro-batch's data as the losses read it; the chunk structure is derived once.

    Attributes:
        batch: the padded micro-batch.
        alm: the run's ALM settings.
    """

    batch: Batch
    alm: ALMSettings

    @cached_property
    def targets(self) -> ALMTargets:
        """The teacher data and alignment of the batch (:class:`xtd.losses.ALMTargets`)."""
        return ALMTargets.from_batch(self.batch)

    @cached_property
    def chunks(self) -> ALMChunks:
        """Chunks without merging: the positions the baselines and ``latents`` compare."""
        return alm_chunks(self.targets, merge=False)


@dataclasses.dataclass(eq=False)
class LossInputs(LossData):
    """:class:`LossData` plus the student's outputs and every loss's per-run state."""

    student: StudentOutputs | None = None
    states: Mapping[str, LossState] = dataclasses.field(default_factory=dict)

    def outputs(self) -> StudentOutputs:
        if self.student is None:  # pragma: no cover - the objective always sets it
            raise ConfigError("a loss was computed without the student's outputs")
        return self.student


CountFn = Callable[[LossData], int]
ComputeFn = Callable[[LossInputs, float], tuple[Tensor, Mapping[str, float]]]
SetupFn = Callable[[RunInfo], LossState]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss: everything the rest of xtd needs to know about it.

    Attributes:
        name: the word in ``--losses`` (``alm+sft``).
        summary: one line for documentation and messages.
        count: data-only local count of a micro-batch (summed over the step, all-reduced).
        compute: ``(inputs, normalizer) → (term, stats)``: the 0-dim term (a sum divided by
            ``normalizer``) and float statistics for the log.
        needs_topk: reads the teacher's stored top-k (``--top-k`` at precompute).
        needs_hidden: reads the teacher's hidden states (``--hidden`` at precompute).
        needs_boundary: reads the teacher's boundary mass of the enabled classes.
        needs_chunks: reads the aligned chunks (every cross-tokenizer loss).
        same_tokenizer: only for a student with the teacher's tokenizer.
        needs_hidden_states: compares the student's final hidden states.
        needs_logits: reads the student's full (B, S, V') logits; without it the objective
            may skip the model's lm_head and pass final hidden states and the output layer
            (the fused path: :func:`xtd.losses.fused_output`, no logits held in full).
        setup: builds the loss's per-run state once, before training, or None.
    """

    name: str
    summary: str
    count: CountFn
    compute: ComputeFn
    needs_topk: bool = False
    needs_hidden: bool = False
    needs_boundary: bool = False
    needs_chunks: bool = True
    same_tokenizer: bool = False
    needs_hidden_states: bool = False
    needs_logits: bool = False
    setup: SetupFn | None = None


LOSSES: dict[str, LossSpec] = {}
"""Every loss ``--losses`` accepts, by name, in registration order."""


def register(spec: LossSpec) -> LossSpec:
    """Add a loss to :data:`LOSSES` (its name must be new and free of ``+``)."""
    if spec.name in LOSSES or not spec.name or "+" in spec.name:
        raise ConfigError(f"cannot register loss {spec.name!r}: the name is taken or not a single word")
    LOSSES[spec.name] = spec
    return spec


def loss_specs(names: Sequence[str]) -> tuple[LossSpec, ...]:
    """The registry entries of ``names``, in order.

    Raises:
        ConfigError: an unknown name (listing every known one).
    """
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ConfigError(
            f"{flag('losses')}: unknown loss {', '.join(map(repr, unknown))}; choose from "
            f"{', '.join(LOSSES)} joined with '+' (e.g. alm+sft)"
        )
    return tuple(LOSSES[n] for n in names)


def count_normalizers(batch: Batch, specs: Sequence[LossSpec], alm: ALMSettings) -> dict[str, int]:
    """Data-only local counts of one micro-batch, per loss (docs/method.md, "Normalisation").

    Summed over the micro-batches of a step and all-reduced over ranks, they are the
    global normalisers passed to each loss.
    """
    data = LossData(batch, alm)
    return {spec.name: int(spec.count(data)) for spec in specs}


def check_stores(
    specs: Sequence[LossSpec], stores: Sequence[tuple[str, TeacherStore]], student_tokenizer: ByteTokenizer,
    alm: ALMSettings,
) -> None:
    """Raise before any training if a store cannot serve the chosen losses.

    Raises:
        StoreFormatError: a loss that needs top-k or hidden states from a store without
            them; a boundary class the store does not hold.
        TokenizerMismatchError: a same-tokenizer loss (``kd``) with another student tokenizer.
    """
    for url, reader in stores:
        missing = [c for c in alm.boundary_classes if c not in tuple(reader.boundary_classes)]
        if missing and any(s.needs_boundary for s in specs):
            raise StoreFormatError(
                f"store {url!r} holds no boundary mass for {', '.join(missing)} (it has "
                f"{', '.join(reader.boundary_classes)}); drop them from {flag('boundary_classes')}"
            )
        topk = "+".join(s.name for s in specs if s.needs_topk)
        if topk and not reader.top_k:
            raise StoreFormatError(
                f"{flag('losses')} {topk} needs teacher top-k log-probs, but store {url!r} has none; "
                f"re-run xtd precompute with --top-k 64 or drop {topk}"
            )
        hidden = "+".join(s.name for s in specs if s.needs_hidden)
        if hidden and not reader.hidden_size:
            raise StoreFormatError(
                f"{flag('losses')} {hidden} needs teacher hidden states, but store {url!r} has none; "
                f"re-run xtd precompute with --hidden or drop {hidden}"
            )
        same = "+".join(s.name for s in specs if s.same_tokenizer)
        if same:
            teacher_digest = tokenizer_from_json(reader.tokenizer_json).digest
            if teacher_digest != student_tokenizer.digest:
                raise TokenizerMismatchError(
                    f"{flag('losses')} {same} needs the student to use the teacher's tokenizer, but store "
                    f"{url!r} has tokenizer {teacher_digest} and the student {student_tokenizer.digest}; "
                    f"use alm (any tokenizer) instead of {same}"
                )


# --------------------------------------------------------------------------------------
# The entries
# --------------------------------------------------------------------------------------


def _numbers(stats: Mapping[str, Tensor | float]) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items() if not isinstance(v, Tensor) or v.numel() == 1}


def _alm(inputs: LossInputs, normalizer: float) -> tuple[Tensor, Mapping[str, float]]:
    logprob, sigma = inputs.outputs().path
    s = inputs.alm
    term, stats = alm_loss(
        logprob, sigma, inputs.targets, tau=s.tau, distance=s.distance, merge=s.merge,
        merge_threshold=s.merge_threshold, debias=s.debias, normalizer=normalizer,
    )  # fmt: skip
    return term, _numbers(stats)


def _sft(inputs: LossInputs, normalizer: float) -> tuple[Tensor, Mapping[str, float]]:
    return sft_loss(inputs.outputs().path[0], inputs.batch["sft_mask"], normalizer=normalizer), {}


def _kd(inputs: LossInputs, normalizer: float) -> tuple[Tensor, Mapping[str, float]]:
    out, b = inputs.outputs(), inputs.batch
    if out.logits_ is None and out.hidden is not None and out.output_layer is not None:
        # Fused: the student's log-probs of the teacher's top-k ids, slab by slab.
        student_topk = fused_output(out.hidden, out.output_layer, gather_ids=b["teacher_topk_ids"]).gathered_logprob
        term = kd_topk_loss_from_logprob(
            student_topk, b["teacher_topk_logprobs"], b["teacher_tail_logmass"], b["sft_mask"], normalizer=normalizer
        )
        return term, {}
    term = kd_topk_loss(
        out.logits(), b["teacher_topk_ids"], b["teacher_topk_logprobs"], b["teacher_tail_logmass"], b["sft_mask"],
        normalizer=normalizer, vocab_size=out.vocab_size,
    )  # fmt: skip
    return term, {}


def _uld(inputs: LossInputs, normalizer: float) -> tuple[Tensor, Mapping[str, float]]:
    out, b = inputs.outputs(), inputs.batch
    term = uld_loss(
        out.logits(), inputs.targets, b["teacher_topk_logprobs"], b["teacher_tail_logmass"], normalizer=normalizer,
        chunks=inputs.chunks, vocab_size=out.vocab_size,
    )  # fmt: skip
    return term, {}


def _mined(inputs: LossInputs, normalizer: float) -> tuple[Tensor, Mapping[str, float]]:
    out, b, state = inputs.outputs(), inputs.batch, inputs.states["mined"]
    term = mined_loss(
        out.logits(), out.path[0], inputs.targets, b["teacher_topk_ids"], b["teacher_topk_logprobs"],
        b["teacher_tail_logmass"], state.tensors["map"], teacher_vocab_size=state.numbers["teacher_vocab_size"],
        normalizer=normalizer, chunks=inputs.chunks, vocab_size=out.vocab_size,
    )  # fmt: skip
    return term, {}


def _mined_setup(run: RunInfo) -> LossState:
    """The MinED student → teacher id map (docs/method.md, "Baselines"), built once per run."""
    teachers = {reader.tokenizer_json for _, reader in run.stores}
    if len(teachers) > 1:
        raise TokenizerMismatchError(f"{flag('losses')} mined needs every --store to share one teacher tokenizer")
    teacher = tokenizer_from_json(teachers.pop())
    # Built once per tokenizer pair and cached (≈ 30 s for two 50k vocabularies).
    mapping = build_mined_map(teacher.token_bytes, run.student_tokenizer.token_bytes, cache_path=cache_dir() / "mined")
    return LossState(
        tensors={"map": torch.as_tensor(mapping, dtype=torch.long, device=run.device)},
        numbers={"teacher_vocab_size": teacher.vocab_size},
    )


def _latents(inputs: LossInputs, normalizer: float) -> tuple[Tensor, Mapping[str, float]]:
    out = inputs.outputs()
    if out.hidden is None:  # pragma: no cover - the objective keeps them when a loss needs them
        raise ConfigError("latents needs the student's hidden states")
    term = latents_loss(
        out.hidden, inputs.batch["teacher_hidden"], inputs.targets, projection=inputs.states["latents"].module,
        normalizer=normalizer, chunks=inputs.chunks,
    )  # fmt: skip
    return term, {}


def _latents_setup(run: RunInfo) -> LossState:
    """A trained H_S → H_T linear map when the hidden sizes differ (docs/method.md, "Hidden-state loss")."""
    sizes = {int(reader.hidden_size or 0) for _, reader in run.stores}
    if len(sizes) > 1:
        raise ConfigError(f"{flag('losses')} latents needs stores of one hidden size; the --store values differ")
    teacher_size = sizes.pop()
    if run.student_hidden_size == teacher_size:
        return LossState()
    return LossState(module=make_latent_projection(run.student_hidden_size, teacher_size).to(run.device))


def _count_groups(data: LossData) -> int:
    return count_alm_groups(data.targets, merge=data.alm.merge, merge_threshold=data.alm.merge_threshold)


def _count_sft_rows(data: LossData) -> int:
    return count_sft_tokens(data.batch["sft_mask"])


def _count_kd_rows(data: LossData) -> int:
    return count_kd_rows(data.batch["sft_mask"])


def _count_scored_chunks(data: LossData) -> int:
    return count_scored_chunks(data.targets)


def _count_mined_terms(data: LossData) -> int:
    return count_mined_terms(data.targets)


register(LossSpec(
    name="alm", summary="approximate likelihood matching of aligned chunks (the method)",
    count=_count_groups, compute=_alm, needs_boundary=True,
))  # fmt: skip
register(LossSpec(
    name="sft", summary="the student's own next-token cross-entropy (no teacher)",
    count=_count_sft_rows, compute=_sft, needs_chunks=False,
))  # fmt: skip
register(LossSpec(
    name="kd", summary="forward KL against the stored top-k (same tokenizer only)",
    count=_count_kd_rows, compute=_kd, needs_topk=True, needs_chunks=False, same_tokenizer=True,
))  # fmt: skip
register(LossSpec(
    name="uld", summary="universal logit distillation at aligned chunk ends",
    count=_count_scored_chunks, compute=_uld, needs_topk=True, needs_logits=True,
))  # fmt: skip
register(LossSpec(
    name="mined", summary="MinED: top-k through a minimum-edit-distance vocabulary map",
    count=_count_mined_terms, compute=_mined, needs_topk=True, needs_logits=True, setup=_mined_setup,
))  # fmt: skip
register(LossSpec(
    name="latents", summary="final hidden states at chunk ends",
    count=_count_scored_chunks, compute=_latents, needs_hidden=True, needs_hidden_states=True,
    setup=_latents_setup,
))  # fmt: skip
