"""What one training step optimises: a model and a micro-batch in, the loss terms out.

:class:`Objective` holds the chosen losses (entries of :mod:`xtd.losses.registry`), their
settings and per-run states, and the weighting (GradMag or fixed weights). It takes *a
model and a batch*: :meth:`Objective.outputs` runs any causal LM on the micro-batch —
a plain student, or one whose embeddings a hypernetwork predicted for this step — and
:meth:`Objective.terms` turns its outputs into every chosen loss, each a sum divided by
its global count. :mod:`xtd.train` drives the loop.

**Fused or materialised.** When no chosen loss needs the full logits (the registry's
``needs_logits``: ALM, SFT, KD and latents do not) and the model's output layer is a
linear head that :mod:`xtd.model_parts` can express (:func:`choose_fused`), the forward
runs the decoder alone and the losses read ℓ^S, σ^S and gathered log-probs from the final
hidden states and the :class:`~xtd.losses.OutputLayer` in row slabs
(:func:`xtd.losses.fused_output`): the (B, S, V') logits never exist. Otherwise the model's
own forward materialises them. A caller that has final hidden states and an output layer
of its own (a hypernetwork's predicted embeddings) passes them to
:meth:`Objective.hidden_outputs`.

**Packed or padded.** A micro-batch is padded to its longest text. With ``packed`` (the
fused path on a model that passes :func:`choose_packing`), the decoder instead runs on
:class:`PackedRows`: the texts side by side in rows of that width (first fit, longest
first), no attention mask and position ids restarting at 0 for each text, from which
transformers builds a block-diagonal causal mask (SDPA/eager) or varlen attention (flash),
so no text attends to another. The final hidden states are scattered back to the padded
layout the losses read; padding rows hold zeros. The padding share of each step is in
the metrics (``padding_share``).

Dimension letters: ``B`` texts, ``S`` student tokens, ``T`` teacher rows, ``V`` vocab,
``H`` hidden size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from xtd.config import ALMSettings
from xtd.errors import ConfigError
from xtd.losses import OutputLayer, gradmag_weights
from xtd.losses.registry import Batch, LossInputs, LossSpec, LossState, RunInfo, StudentOutputs
from xtd.model_parts import check_output_layer, final_hidden_states, output_layer
from xtd.packing import pack_rows

__all__ = ["Objective", "PackedRows", "build_objective", "choose_fused", "choose_packing", "student_forward"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Objective:
    """The losses of a run and how they combine (built once by :func:`build_objective`).

    Attributes:
        losses: the chosen registry entries, in ``--losses`` order.
        alm: the ALM settings.
        weights: fixed weight per loss (cancel out under GradMag).
        boundary_mask: (V,) bool, the student's boundary tokens B_S; its length is the
            real vocabulary.
        states: per-run states of the losses that have a setup.
        amp: bf16 autocast on CUDA (the output layer stays fp32).
        fused: skip the model's lm_head and compute the losses from the final hidden
            states and the output layer (:func:`choose_fused` decides).
        packed: with ``fused``, run the decoder on :class:`PackedRows` (:func:`choose_packing`).
    """

    losses: tuple[LossSpec, ...]
    alm: ALMSettings
    weights: Mapping[str, float]
    boundary_mask: Tensor
    states: Mapping[str, LossState] = field(default_factory=dict)
    amp: bool = False
    fused: bool = False
    packed: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.losses)

    def modules(self) -> dict[str, nn.Module]:
        """Trained parameters that belong to the losses (e.g. the latents projection), by name."""
        return {f"{name}_projection": s.module for name, s in self.states.items() if s.module is not None}

    def outputs(self, model: nn.Module, batch: Batch) -> StudentOutputs:
        """Run ``model`` on the micro-batch: its final hidden states and output layer (fused),
        or its logits (and final hidden states when a loss needs them)."""
        amp = self.amp and batch["input_ids"].device.type == "cuda"
        autocast_dtype = torch.bfloat16 if amp else None
        if self.fused:
            hidden = student_hidden_states(
                model, batch, autocast_dtype=autocast_dtype, packed=self.packed
            )  # (B, S, H) float32
            return self.hidden_outputs(hidden, output_layer(model, vocab_size=self.vocab_size), batch)
        want_hidden = any(spec.needs_hidden_states for spec in self.losses)
        logits, hidden = student_forward(
            model, batch, autocast_dtype=autocast_dtype, output_hidden_states=want_hidden
        )  # (B, S, V') float32 under autocast (docs/method.md, "Scoring a chunk": losses see fp32 logits)
        return StudentOutputs(
            input_ids=batch["input_ids"],
            boundary_mask=self.boundary_mask,
            logits_=logits,
            hidden=hidden[-1] if want_hidden and hidden is not None else None,
        )

    def hidden_outputs(self, hidden: Tensor, layer: OutputLayer, batch: Batch) -> StudentOutputs:
        """The student's outputs from final hidden states (B, S, H) and an output layer
        whose ``vocab_size`` is the boundary mask's length (no logits are materialised)."""
        return StudentOutputs(
            input_ids=batch["input_ids"], boundary_mask=self.boundary_mask, hidden=hidden, output_layer=layer,
            rows=batch["attention_mask"].bool(),  # the output layer runs on real tokens only
        )

    def forward_tokens(self, batch: Batch) -> int:
        """Token positions the decoder runs on for ``batch`` (real tokens plus padding)."""
        ids = batch["input_ids"]
        if self.fused and self.packed:
            return PackedRows.layout_size(batch["attention_mask"])
        return int(ids.numel())

    @property
    def vocab_size(self) -> int:
        """V, the student's real vocabulary (the boundary mask's length)."""
        return int(self.boundary_mask.numel())

    def terms(
        self, outputs: StudentOutputs, batch: Batch, normalizers: Mapping[str, float]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Every chosen loss of one micro-batch, each divided by its global count.

        Args:
            outputs: the student's outputs (:meth:`outputs`, or from hidden states).
            batch: the padded micro-batch, on the model's device.
            normalizers: global count per loss (summed over the step's micro-batches and ranks).

        Returns:
            (terms, stats): 0-dim float32 tensors with gradients, and float statistics for the log.
        """
        inputs = LossInputs(batch, self.alm, student=outputs, states=self.states)
        terms: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        for spec in self.losses:
            terms[spec.name], extra = spec.compute(inputs, normalizers[spec.name])
            stats.update(extra)
        return terms, stats

    def __call__(
        self, model: nn.Module, batch: Batch, normalizers: Mapping[str, float]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """:meth:`terms` of ``model`` on ``batch``."""
        return self.terms(self.outputs(model, batch), batch, normalizers)

    def combine(
        self, terms: Mapping[str, Tensor], counts: Mapping[str, int], last_block: Sequence[nn.Parameter]
    ) -> tuple[Tensor, dict[str, float]]:
        """The micro-batch objective: GradMag-weighted (docs/method.md, "GradMag") or
        fixed-weighted sum of terms.

        A term with nothing to score in this micro-batch (local count 0) is left out: its
        gradient is zero, and GradMag's 1/‖G‖ would otherwise swamp the other terms.

        Args:
            terms: from :meth:`terms`.
            counts: this micro-batch's local count per loss.
            last_block: the last decoder block's trainable parameters (GradMag), or empty
                for fixed weights.

        Returns:
            (objective, GradMag weights for the log).
        """
        live = {n: t for n, t in terms.items() if t.requires_grad and counts.get(n, 1) > 0}
        if not live:
            return next(iter(terms.values())) * 0.0, {}
        if last_block and len(live) > 1:
            gm = gradmag_weights(live, list(last_block))
            return sum(gm[n] * live[n] for n in live), {n: float(gm[n]) for n in live}  # type: ignore[return-value]
        return sum(self.weights[n] * live[n] for n in live), {}  # type: ignore[return-value]


def build_objective(
    losses: Sequence[LossSpec],
    *,
    alm: ALMSettings,
    weights: Mapping[str, float],
    boundary_mask: Tensor,
    run: RunInfo,
    amp: bool = False,
    fused: bool = False,
    packed: bool = False,
) -> Objective:
    """Run every chosen loss's per-run setup once and hold the result."""
    states = {spec.name: spec.setup(run) for spec in losses if spec.setup is not None}
    return Objective(
        losses=tuple(losses), alm=alm, weights=dict(weights), boundary_mask=boundary_mask, states=states, amp=amp,
        fused=fused, packed=fused and packed,
    )  # fmt: skip


def choose_fused(losses: Sequence[LossSpec], model: nn.Module, *, vocab_size: int, sample_ids: Tensor) -> bool:
    """Whether a run can use the fused output layer (module docstring).

    True when no chosen loss needs the full logits, the model's head is one
    :func:`xtd.model_parts.output_layer` expresses (tied/untied, bias, one LoRA adapter
    without dropout, scale, soft-cap), and that layer on the decoder's final hidden states
    reproduces the model's own logits on ``sample_ids``.

    Args:
        losses: the chosen losses.
        model: the student, in the mode it trains in.
        vocab_size: V, the student's real vocabulary.
        sample_ids: (B, S) a few token ids for the check.
    """
    needing = [spec.name for spec in losses if spec.needs_logits]
    if needing:
        logger.info("materialised logits: %s read the full logits", "+".join(needing))
        return False
    try:
        check_output_layer(model, output_layer(model, vocab_size=vocab_size), sample_ids)
    except ConfigError as exc:
        logger.info("materialised logits: %s", exc)
        return False
    return True


def choose_packing(model: nn.Module, *, vocab_size: int, atol: float = 1e-4) -> bool:
    """Whether the decoder honours packed rows (:class:`PackedRows`): two texts packed into
    one row must give the final hidden states they give padded, on a few tokens.

    Args:
        model: the student (dropout is switched off for the check, the mode restored).
        vocab_size: V, to draw ids from.
        atol: tolerance on the hidden states (float32).
    """
    ids = (torch.arange(1, 13) * 7919 % vocab_size).reshape(2, 6)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[1, 2:] = 0  # lengths 4 and 2: one packed row of width 6
    device = next(model.parameters()).device
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            padded = student_hidden_states(model, batch)
            packed = student_hidden_states(model, batch, packed=True)
    except Exception as exc:  # noqa: BLE001 - any model that cannot take position ids falls back
        logger.info("padded micro-batches: the decoder failed on packed rows (%s)", exc)
        return False
    finally:
        model.train(was_training)
    keep = mask.bool().to(device)
    diff = float((padded[keep] - packed[keep]).abs().max())
    if not diff <= atol * (1.0 + float(padded[keep].abs().max())):
        logger.info("padded micro-batches: packed rows change the hidden states by %.3g", diff)
        return False
    return True


@dataclass(frozen=True, eq=False)
class PackedRows:
    """A micro-batch's texts side by side in rows (module docstring, "Packed or padded").

    Attributes:
        input_ids: (R, S) ids; the tail of a row is padding (id 0) forming its own block.
        position_ids: (R, S) 0, 1, … for each text and for each row's padding tail.
        source: (N,) flat indices into R·S of the real tokens.
        target: (N,) their flat indices into B·S (the padded layout).
    """

    input_ids: Tensor
    position_ids: Tensor
    source: Tensor
    target: Tensor

    @staticmethod
    def plan(attention_mask: Tensor) -> list[list[int]]:
        """Texts per row, from the (B, S) mask of a right-padded micro-batch."""
        return pack_rows(attention_mask.sum(1).tolist(), int(attention_mask.shape[1]))

    @classmethod
    def layout_size(cls, attention_mask: Tensor) -> int:
        """R·S, the positions the packed decoder runs on."""
        return max(1, len(cls.plan(attention_mask))) * int(attention_mask.shape[1])

    @classmethod
    def of(cls, input_ids: Tensor, attention_mask: Tensor) -> PackedRows:
        """Pack a right-padded (B, S) micro-batch (one row of padding when every text is empty)."""
        width = int(input_ids.shape[1])
        lengths = attention_mask.sum(1).tolist()
        rows = cls.plan(attention_mask)
        rows = rows or [[]]
        ids = torch.zeros(len(rows), width, dtype=input_ids.dtype)
        positions = torch.empty(len(rows), width, dtype=torch.long)
        source, target = [], []
        flat_ids = input_ids.reshape(-1).cpu()
        for r, texts in enumerate(rows):
            offset = 0
            for b in texts:
                n = int(lengths[b])
                src = torch.arange(r * width + offset, r * width + offset + n)
                dst = torch.arange(b * width, b * width + n)
                ids.view(-1)[src] = flat_ids[dst]
                positions[r, offset : offset + n] = torch.arange(n)
                source.append(src)
                target.append(dst)
                offset += n
            positions[r, offset:] = torch.arange(width - offset)
        device = input_ids.device
        empty = torch.zeros(0, dtype=torch.long)
        return cls(
            input_ids=ids.to(device),
            position_ids=positions.to(device),
            source=torch.cat(source or [empty]).to(device),
            target=torch.cat(target or [empty]).to(device),
        )

    def unpack(self, hidden: Tensor, batch_size: int) -> Tensor:
        """(R, S, H) hidden states of the packed rows → (B, S, H), zeros at padding."""
        rows, width, size = hidden.shape
        flat = hidden.reshape(rows * width, size)
        out = flat.new_zeros(batch_size * width, size)
        return out.index_copy(0, self.target, flat.index_select(0, self.source)).reshape(batch_size, width, size)


def student_hidden_states(
    model: nn.Module,
    batch: Batch,
    *,
    autocast_dtype: torch.dtype | None = None,
    packed: bool = False,
) -> Tensor:
    """(B, S, H) final hidden states of one micro-batch, without the lm_head.

    The decoder runs under autocast when ``autocast_dtype`` is given, and the states are
    then cast to float32 for the output layer (docs/method.md, "Scoring a chunk"). With
    ``packed`` it runs on :class:`PackedRows` and the states are scattered back to the
    padded layout (zeros at padding).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"].long()
    rows = PackedRows.of(ids, mask) if packed else None
    amp = torch.autocast(ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with amp:
        if rows is None:
            hidden = final_hidden_states(model, ids, mask)
        else:  # no mask: transformers reads the text boundaries from the restarting position ids
            hidden = final_hidden_states(model, rows.input_ids, None, position_ids=rows.position_ids)
    if autocast_dtype is not None:
        hidden = hidden.float()
    return hidden if rows is None else rows.unpack(hidden, int(ids.shape[0]))


def student_forward(
    model: nn.Module,
    batch: Batch,
    *,
    autocast_dtype: torch.dtype | None = None,
    output_hidden_states: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """The student's logits (and hidden states) for one micro-batch.

    Without ``autocast_dtype`` this is the model's own forward. With it, the transformer
    body runs under autocast and the output layer runs outside it on the float32 final
    hidden states, so ℓ^S and σ^S come from float32 logits as the method requires
    (a bf16 output layer would round every logit to 8 bits of mantissa before the
    softmax). Models whose logits the body-plus-head split would not reproduce (a final
    soft-cap or logit scale, or no ``base_model_prefix`` body) run whole under autocast
    and their logits are cast to float32.

    Args:
        model: a causal LM, or a ``peft`` model around one.
        batch: ``input_ids`` (B, S) and ``attention_mask`` (B, S).
        autocast_dtype: e.g. ``torch.bfloat16``; None runs without autocast.
        output_hidden_states: also return the per-layer hidden states (latents loss).

    Returns:
        ``(logits, hidden_states)``: (B, S, V') logits (float32 under autocast) and the
        hidden-state tuple or None.
    """
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"].long(),
        "output_hidden_states": output_hidden_states,
        "use_cache": False,  # a training forward never reuses keys and values
    }
    if autocast_dtype is None:
        out = model(**kwargs)
        return out.logits, out.hidden_states
    device_type = batch["input_ids"].device.type
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", "") or "_no_body", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    post_processed = any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale"))
    if body is None or head is None or post_processed:
        with torch.autocast(device_type, dtype=autocast_dtype):
            out = model(**kwargs)
        return out.logits.float(), out.hidden_states
    with torch.autocast(device_type, dtype=autocast_dtype):
        out = body(**kwargs)
    with torch.autocast(device_type, enabled=False):
        logits = head(out.last_hidden_state.float())  # (B, S, V') float32
    return logits, out.hidden_states
