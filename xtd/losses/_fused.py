"""The student's output layer fused with what the losses read from it, in row slabs.

ALM and SFT read two numbers per student row from the output layer: the realised next
token's log-prob ℓ and the boundary log-mass σ (docs/method.md, "Scoring a chunk" and
"Debiasing"); KD reads the log-probs of the teacher's top-k ids and ULD the student's own
top-k. None of them needs the (B, S, V) logits at once. :func:`fused_output` computes
the logits of a slab of rows from the final hidden states and the output layer
(:class:`OutputLayer`: tied or untied weight, bias, LoRA factors, logit scale, soft-cap),
reduces the slab to those per-row quantities and drops it; its backward recomputes each
slab's logits and writes the gradients of the hidden states and of every output-layer
parameter. Peak memory is a few slabs of ``chunk_elements`` floats instead of the
logits, their log-softmax and their gradient, so it does not grow with the batch or the
vocabulary.

Cost: the backward recomputes each slab's logits, one extra (N × H × V) matmul (four
instead of the three of a materialised forward and its two gradients).

Arithmetic is float32 (float64 when the hidden states or the weight are float64, for
``gradcheck``); the matmuls run in the weight's dtype when it is bf16/fp16.

Dimension letters: ``N`` rows (B·S flattened), ``B`` batch, ``S`` student tokens, ``H``
hidden size, ``V`` real vocabulary, ``V'`` output columns (V' ≥ V; columns ≥ V are
vocabulary padding and never enter a softmax), ``K`` gathered ids per row, ``k`` own
top-k, ``r`` LoRA rank.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from xtd.errors import DataError
from xtd.losses._alm import LOGPROB_FLOOR, _compute_dtype

__all__ = ["FUSED_CHUNK_ELEMENTS", "FusedOutputs", "OutputLayer", "fused_output", "fused_student_path"]

FUSED_CHUNK_ELEMENTS = 1 << 24
"""Default rows × vocabulary per slab: 64 MB of float32 logits (341 rows at 49k, 65 at 256k);
a step's peak is about two slabs. Smaller slabs make the matmuls less efficient: for 640
rows at 49k × 576 on 2 CPU cores, forward + backward took 1.09–1.18× as long with 1 << 23
and 0.91–0.93× with 1 << 25 (a single slab there) as with 1 << 24."""


@dataclasses.dataclass(frozen=True, eq=False)  # tensors: identity, not element-wise equality
class OutputLayer:
    """A causal LM's output layer as tensors: ``z = softcap(scale · (h Wᵀ + b + s·(h Aᵀ) Bᵀ))``.

    Build it from a model with :func:`xtd.model_parts.output_layer`. The tensors are the
    model's own parameters (not copies), so gradients reach them.

    Attributes:
        weight: (V', H) output weight (the input embedding when tied).
        vocab_size: V ≤ V', the real vocabulary; columns ≥ V are padding.
        bias: (V',) or None.
        lora_a: (r, H) LoRA down-projection of the head, or None.
        lora_b: (V', r) LoRA up-projection, or None (both or neither).
        lora_scale: s, LoRA's alpha / r.
        logit_scale: multiplies the logits (Cohere's ``logit_scale``; 1 / Granite's
            ``logits_scaling``).
        softcap: c in ``c·tanh(z / c)`` (Gemma 2's ``final_logit_softcapping``), or None.
    """

    weight: Tensor
    vocab_size: int
    bias: Tensor | None = None
    lora_a: Tensor | None = None
    lora_b: Tensor | None = None
    lora_scale: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise DataError(f"OutputLayer weight must be (V', H), got shape {tuple(self.weight.shape)}")
        width, hidden = self.weight.shape
        if not 0 < self.vocab_size <= width:
            raise DataError(f"OutputLayer vocab_size {self.vocab_size} must be in 1..{width} (the weight's rows)")
        if self.bias is not None and tuple(self.bias.shape) != (width,):
            raise DataError(f"OutputLayer bias must be ({width},), got {tuple(self.bias.shape)}")
        if (self.lora_a is None) != (self.lora_b is None):
            raise DataError("OutputLayer needs both LoRA factors (lora_a and lora_b) or neither")
        if self.lora_a is not None and self.lora_b is not None:
            rank = self.lora_a.shape[0]
            if tuple(self.lora_a.shape) != (rank, hidden) or tuple(self.lora_b.shape) != (width, rank):
                raise DataError(
                    f"OutputLayer LoRA factors must be (r, {hidden}) and ({width}, r), got "
                    f"{tuple(self.lora_a.shape)} and {tuple(self.lora_b.shape)}"
                )
        if self.softcap is not None and not self.softcap > 0:
            raise DataError(f"OutputLayer softcap must be > 0, got {self.softcap!r}")

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., V') logits materialised, as the model computes them (reference and fallback)."""
        z = F.linear(hidden, self.weight, self.bias)
        if self.lora_a is not None and self.lora_b is not None:
            z = z + self.lora_scale * F.linear(F.linear(hidden, self.lora_a), self.lora_b)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


class FusedOutputs(NamedTuple):
    """Per-row quantities of :func:`fused_output` (leading dims ``...`` as the hidden states').

    Attributes:
        gathered_logprob: (..., K) log-softmax at ``gather_ids`` (K = 0 when none asked).
        boundary_logmass: (...) log of the softmax mass on the boundary mask (0 when none).
        topk_logprob: (..., k) the row's own k largest log-probs, descending (k = 0: none).
        topk_ids: (..., k) int64 their ids (no gradient).
    """

    gathered_logprob: Tensor
    boundary_logmass: Tensor
    topk_logprob: Tensor
    topk_ids: Tensor


class _Plan(NamedTuple):
    """The non-tensor settings of one fused call."""

    vocab: int
    rows: int
    topk: int
    lora_scale: float
    logit_scale: float
    softcap: float | None
    dtype: torch.dtype  # arithmetic
    matmul_dtype: torch.dtype


class _Weights(NamedTuple):
    """The output layer's real-vocabulary columns, cast once per pass."""

    w: Tensor  # (V, H)
    bias: Tensor | None  # (V,)
    a: Tensor | None  # (r, H)
    b: Tensor | None  # (V, r)

    @classmethod
    def of(cls, plan: _Plan, weight: Tensor, bias: Tensor | None, a: Tensor | None, b: Tensor | None) -> _Weights:
        v, mm = plan.vocab, plan.matmul_dtype
        return cls(
            weight[:v].to(mm),
            None if bias is None else bias[:v].to(plan.dtype),
            None if a is None else a.to(mm),
            None if b is None else b[:v].to(mm),
        )


def _slab_logits(h: Tensor, ws: _Weights, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    """(r, V) logits of a slab in ``plan.dtype``, and h Aᵀ (r, rank) when the head has LoRA."""
    z = (h @ ws.w.T).to(plan.dtype)
    u = None
    if ws.a is not None and ws.b is not None:
        u = h @ ws.a.T  # (r, rank)
        z.add_((u @ ws.b.T).to(plan.dtype), alpha=plan.lora_scale)
    if ws.bias is not None:
        z.add_(ws.bias)
    if plan.logit_scale != 1.0:
        z.mul_(plan.logit_scale)
    if plan.softcap is not None:
        z.div_(plan.softcap).tanh_().mul_(plan.softcap)
    return z, u


def _accumulate(out: Tensor, left: Tensor, right: Tensor, alpha: float = 1.0) -> None:
    """``out += alpha · left @ right`` without a temporary of ``out``'s size when dtypes agree."""
    if left.dtype == out.dtype:
        out.addmm_(left, right, alpha=alpha)
    else:
        out.add_((left @ right).to(out.dtype), alpha=alpha)


def _engine_needs(ctx, index: int) -> bool:
    """Whether this backward pass needs the gradient of input ``index``.

    ``ctx.needs_input_grad`` is fixed at the forward; a ``torch.autograd.grad`` call that
    asks only for other tensors (GradMag's gradient on the last decoder block) does not
    need the output layer's weight gradient, a V × H matmul per slab: the engine knows
    which nodes it will run.
    """
    if not ctx.needs_input_grad[index]:
        return False
    slot = ctx.edge_of.get(index)  # next_functions holds the tensor arguments only
    node = ctx.next_functions[slot][0] if slot is not None and slot < len(ctx.next_functions) else None
    if node is None:
        return True
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # an older torch, or outside the engine: assume needed
        return True


class _FusedOutputFn(torch.autograd.Function):
    """Output layer + per-row reductions, forward and backward in row slabs.

    With p = softmax(z) and upstream gradients g_k (gathered log-probs, own top-k) and g_σ
    (boundary log-mass σ = log β, β = p·1_B), the logit gradient of a row is
    ``Σ_k g_k·(onehot_k − p) + g_σ·(p·1_B / β − p)`` = p·(a + b·1_B) + Σ_k g_k·onehot_k with
    a = −(Σ_k g_k + g_σ) and b = g_σ / β; it is then carried back through the soft-cap,
    the scale and the linear maps. A boundary mass below e^-87 of the largest probability
    underflows to 0 in float32; σ then sits at the floor with zero gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor | None,
        lora_b: Tensor | None,
        gather_ids: Tensor,
        maskf: Tensor | None,
        plan: _Plan,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, dtype, dev = hidden.shape[0], plan.dtype, hidden.device
        lse = torch.empty(n, dtype=dtype, device=dev)
        beta = torch.ones(n, dtype=dtype, device=dev)
        gathered = torch.empty(gather_ids.shape, dtype=dtype, device=dev)  # (N, K)
        top_lp = torch.empty(n, plan.topk, dtype=dtype, device=dev)
        top_ids = torch.empty(n, plan.topk, dtype=torch.long, device=dev)
        with torch.autocast(dev.type, enabled=False):
            ws = _Weights.of(plan, weight, bias, lora_a, lora_b)
            for s in range(0, n, plan.rows):
                e = s + plan.rows
                z, _ = _slab_logits(hidden[s:e].to(plan.matmul_dtype), ws, plan)  # (r, V)
                top = z.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
                picked = z.gather(1, gather_ids[s:e])  # (r, K), read before z turns into e^(z − top)
                if plan.topk:
                    values, ids = z.topk(plan.topk, dim=-1)
                ex = z.sub_(top).exp_()  # (r, V) in place: one slab alive, the one exp of the forward
                total = ex.sum(dim=-1)
                lse_s = top.squeeze(1) + total.log()
                lse[s:e] = lse_s
                gathered[s:e] = picked - lse_s[:, None]
                if maskf is not None:
                    beta[s:e] = (ex @ maskf) / total
                if plan.topk:
                    top_lp[s:e] = values - lse_s[:, None]
                    top_ids[s:e] = ids
                del z, ex  # free this slab before the next one is computed
        ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b, gather_ids, maskf, top_ids, lse, beta)
        ctx.plan = plan
        tensors = [i for i, t in enumerate((hidden, weight, bias, lora_a, lora_b)) if isinstance(t, Tensor)]
        ctx.edge_of = {i: slot for slot, i in enumerate(tensors)}
        ctx.mark_non_differentiable(top_ids)
        return gathered, beta.log(), top_lp, top_ids

    @staticmethod
    def backward(ctx, g_gathered: Tensor, g_mass: Tensor, g_top: Tensor, _g_ids: Tensor):  # type: ignore[override]
        hidden, weight, bias, lora_a, lora_b, gather_ids, maskf, top_ids, lse, beta = ctx.saved_tensors
        plan: _Plan = ctx.plan
        dtype, mm, v = plan.dtype, plan.matmul_dtype, plan.vocab
        need_h, need_w, need_bias, need_a, need_b = (_engine_needs(ctx, i) for i in range(5))
        g_gathered, g_top = g_gathered.to(dtype), g_top.to(dtype)
        g_mass = g_mass.to(dtype) if maskf is not None else torch.zeros_like(lse)
        a = -(g_gathered.sum(1) + g_top.sum(1) + g_mass)  # (N,)
        b = torch.where(beta > 0, g_mass / beta.clamp(min=torch.finfo(dtype).tiny), 0.0)  # (N,)
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_bias else None
        grad_a = torch.zeros(lora_a.shape, dtype=dtype, device=lora_a.device) if need_a else None
        grad_b = torch.zeros(lora_b.shape, dtype=dtype, device=lora_b.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            ws = _Weights.of(plan, weight, bias, lora_a, lora_b)
            for s in range(0, hidden.shape[0], plan.rows):
                e = s + plan.rows
                h = hidden[s:e].to(mm)
                z, u = _slab_logits(h, ws, plan)
                dz = (z - lse[s:e, None]).exp_()  # (r, V) softmax, the one exp of the backward
                # z is not needed any more: it becomes the soft-cap's derivative, or scratch.
                if plan.softcap is not None:  # d(c·tanh(y/c))/dy = 1 − tanh² = 1 − (z/c)²
                    z.div_(plan.softcap).square_().neg_().add_(1.0)
                scratch = None if plan.softcap is not None else z
                if maskf is not None:
                    dz.mul_(torch.addcmul(a[s:e, None], b[s:e, None], maskf[None, :], out=scratch))
                else:
                    dz.mul_(a[s:e, None])
                dz.scatter_add_(1, gather_ids[s:e], g_gathered[s:e])
                if plan.topk:
                    dz.scatter_add_(1, top_ids[s:e], g_top[s:e])
                if plan.softcap is not None:
                    dz.mul_(z)
                if plan.logit_scale != 1.0:
                    dz.mul_(plan.logit_scale)
                dzm = dz.to(mm)
                db_dz = dzm @ ws.b if ws.b is not None else None  # (r, rank)
                if grad_h is not None:
                    gh = dzm @ ws.w  # (r, H)
                    if db_dz is not None and ws.a is not None:
                        gh = gh + plan.lora_scale * (db_dz @ ws.a)
                    grad_h[s:e] = gh
                if grad_w is not None:
                    _accumulate(grad_w[:v], dzm.T, h)
                if grad_bias is not None:
                    grad_bias[:v] += dz.sum(0)
                if grad_b is not None and u is not None:
                    _accumulate(grad_b[:v], dzm.T, u, plan.lora_scale)
                if grad_a is not None and db_dz is not None:
                    _accumulate(grad_a, db_dz.T, h, plan.lora_scale)
                del z, dz, dzm, scratch  # free this slab before the next one is computed

        def cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if grad is None or like is None else grad.to(like.dtype)

        return (
            cast(grad_h, hidden),
            cast(grad_w, weight),
            cast(grad_bias, bias),
            cast(grad_a, lora_a),
            cast(grad_b, lora_b),
            None,
            None,
            None,
        )


def fused_output(
    hidden: Tensor,
    layer: OutputLayer,
    *,
    gather_ids: Tensor | None = None,
    boundary_mask: Tensor | None = None,
    topk: int = 0,
    chunk_elements: int = FUSED_CHUNK_ELEMENTS,
) -> FusedOutputs:
    """Per-row log-probs from the output layer without materialising the logits.

    Args:
        hidden: (..., H) final hidden states (after the model's last norm), any float dtype.
        layer: the output layer (:class:`OutputLayer`).
        gather_ids: (..., K) int ids whose log-probs to return (clamped to 0..V−1; KD's
            teacher top-k, ALM's next token), or None.
        boundary_mask: (V,) bool, the boundary tokens B; None gives ``boundary_logmass`` 0.
        topk: k > 0 also returns each row's own k largest log-probs (ULD).
        chunk_elements: rows × V per slab (memory of one slab of logits).

    Returns:
        :class:`FusedOutputs`, float32 (float64 when ``hidden`` or the weight is float64),
        differentiable w.r.t. ``hidden`` and the layer's tensors.

    Raises:
        DataError: shapes that do not fit the layer.
    """
    vocab = layer.vocab_size
    lead = hidden.shape[:-1]
    if hidden.shape[-1] != layer.weight.shape[1]:
        raise DataError(f"hidden size {hidden.shape[-1]} does not match the output weight {tuple(layer.weight.shape)}")
    if boundary_mask is not None and boundary_mask.numel() != vocab:
        raise DataError(
            f"the boundary mask covers {boundary_mask.numel()} tokens but the output layer's vocabulary "
            f"is {vocab}; pass the mask of the model's own tokenizer"
        )
    if not 0 <= topk <= vocab:
        raise DataError(f"topk must be in 0..{vocab}, got {topk}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    n = flat.shape[0]
    if gather_ids is None:
        ids = torch.zeros(n, 0, dtype=torch.long, device=hidden.device)
    else:
        if tuple(gather_ids.shape[:-1]) != tuple(lead):
            raise DataError(f"gather_ids {tuple(gather_ids.shape)} do not match hidden states {tuple(hidden.shape)}")
        ids = gather_ids.reshape(n, gather_ids.shape[-1]).long().clamp(0, vocab - 1)
    dtype = _compute_dtype(hidden, layer.weight)
    wdt = layer.weight.dtype
    matmul_dtype = wdt if wdt in (torch.bfloat16, torch.float16) else dtype
    plan = _Plan(
        vocab=vocab,
        rows=max(1, chunk_elements // vocab),
        topk=int(topk),
        lora_scale=float(layer.lora_scale),
        logit_scale=float(layer.logit_scale),
        softcap=None if layer.softcap is None else float(layer.softcap),
        dtype=dtype,
        matmul_dtype=matmul_dtype,
    )
    maskf = None if boundary_mask is None else boundary_mask.to(device=hidden.device, dtype=dtype)
    if n == 0:  # keep the graph connected so that backward still runs
        zero = flat.sum().to(dtype) * 0.0
        gathered = zero + torch.zeros(n, ids.shape[1], dtype=dtype, device=hidden.device)
        top_lp = zero + torch.zeros(n, topk, dtype=dtype, device=hidden.device)
        outs = (gathered, zero + torch.zeros(n, dtype=dtype, device=hidden.device), top_lp,
                torch.zeros(n, topk, dtype=torch.long, device=hidden.device))
    else:
        outs = _FusedOutputFn.apply(flat, layer.weight, layer.bias, layer.lora_a, layer.lora_b, ids, maskf, plan)
    gathered, logmass, top_lp, top_ids = outs
    if boundary_mask is None:
        logmass = logmass * 0.0
    return FusedOutputs(
        gathered.reshape(*lead, ids.shape[1]),
        logmass.reshape(lead),
        top_lp.reshape(*lead, topk),
        top_ids.reshape(*lead, topk),
    )


def fused_student_path(
    hidden: Tensor,
    layer: OutputLayer,
    ids: Tensor,
    boundary_mask: Tensor | None = None,
    *,
    rows: Tensor | None = None,
    chunk_elements: int = FUSED_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """ℓ^S and σ^S from the hidden states: :func:`xtd.losses.student_path` without logits.

    Equal to ``student_path(layer.logits(hidden), ids, boundary_mask)`` (up to float
    rounding), with the vocabulary taken from ``layer.vocab_size``.

    Args:
        hidden: (B, S, H) final hidden states.
        layer: the output layer.
        ids: (B, S) int student token ids (padding rows may hold anything, e.g. −100).
        boundary_mask: (V,) bool boundary tokens B_S; None gives σ^S = 0.
        rows: (B, S) bool, the rows to compute (the real tokens of a right-padded batch);
            the output layer runs on these only, and ℓ^S, σ^S are 0 elsewhere. None: all.
        chunk_elements: rows × V per slab.

    Returns:
        ``(student_logprob, student_sigma)``, each (B, S) float32: ℓ^S_r = log p(s_r | s_<r)
        for r ≥ 1 (row 0 = 0) and σ^S_r, both clamped to ``[LOGPROB_FLOOR, 0]``.
    """
    if hidden.dim() != 3 or ids.shape != hidden.shape[:2]:
        raise DataError(
            f"fused_student_path needs (B, S, H) hidden states and (B, S) ids, got {tuple(hidden.shape)} "
            f"and {tuple(ids.shape)}"
        )
    bsz = ids.shape[0]
    next_ids = torch.cat([ids[:, 1:], ids.new_zeros(bsz, 1)], dim=1)[:, : ids.shape[1]]  # row r → token r + 1
    if rows is None:
        out = fused_output(
            hidden, layer, gather_ids=next_ids[..., None], boundary_mask=boundary_mask, chunk_elements=chunk_elements
        )
        tok, mass = out.gathered_logprob[..., 0], out.boundary_logmass  # (B, S)
    else:
        if rows.shape != ids.shape:
            raise DataError(f"rows {tuple(rows.shape)} do not match ids {tuple(ids.shape)}")
        sel = rows.reshape(-1).nonzero().squeeze(1)  # (N,) flat rows to compute
        out = fused_output(
            hidden.reshape(-1, hidden.shape[-1]).index_select(0, sel), layer,
            gather_ids=next_ids.reshape(-1, 1).index_select(0, sel), boundary_mask=boundary_mask,
            chunk_elements=chunk_elements,
        )  # fmt: skip
        zeros = out.boundary_logmass.new_zeros(ids.numel())
        tok = zeros.index_copy(0, sel, out.gathered_logprob[:, 0]).reshape(ids.shape)
        mass = zeros.index_copy(0, sel, out.boundary_logmass).reshape(ids.shape)
    logprob = torch.cat([tok.new_zeros(bsz, 1), tok[:, :-1]], dim=1)[:, : ids.shape[1]].clamp(LOGPROB_FLOOR, 0.0)
    return logprob, mass.clamp(LOGPROB_FLOOR, 0.0)
