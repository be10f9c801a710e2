"""The fused output layer (xtd.losses._fused) against the materialised path: the same ℓ^S,
σ^S, gathered and top-k log-probs, losses and gradients (hidden states, weight, bias,
LoRA factors) from ``layer.logits(hidden)`` through the existing losses; float64 on tiny
shapes, float32 tolerance on larger ones; vocabulary padding, soft-cap and scale."""

from __future__ import annotations

import pytest
import torch
from test_losses import random_batch

from xtd.errors import DataError
from xtd.losses import (
    FusedOutputs,
    OutputLayer,
    alm_loss,
    fused_output,
    fused_student_path,
    kd_topk_loss,
    kd_topk_loss_from_logprob,
    sft_loss,
    student_path,
    uld_loss,
    uld_loss_from_topk,
    uld_rows,
)

F64 = torch.float64

HEADS = {
    "plain": {},
    "bias": {"bias": True},
    "lora": {"lora": True},
    "scale_softcap": {"bias": True, "logit_scale": 0.7, "softcap": 2.5},
    "everything": {"bias": True, "lora": True, "logit_scale": 1.3, "softcap": 4.0},
}


def make_layer(
    kind: str, *, hidden: int, width: int, vocab: int, dtype=F64, seed: int = 0, rank: int = 3
) -> tuple[OutputLayer, list[torch.Tensor]]:
    """A random output layer of the given kind and its trainable tensors."""
    spec = HEADS[kind]
    gen = torch.Generator().manual_seed(seed)

    def param(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_(True)

    weight = param(width, hidden, scale=0.5)
    bias = param(width) if spec.get("bias") else None
    lora_a = param(rank, hidden) if spec.get("lora") else None
    lora_b = param(width, rank, scale=0.3) if spec.get("lora") else None
    layer = OutputLayer(
        weight=weight,
        vocab_size=vocab,
        bias=bias,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=0.5,
        logit_scale=spec.get("logit_scale", 1.0),
        softcap=spec.get("softcap"),
    )
    return layer, [t for t in (weight, bias, lora_a, lora_b) if t is not None]


def _alm_sft(logprob, sigma, targets, sft_mask):
    alm, _ = alm_loss(logprob, sigma, targets, tau=5.0, normalizer=3)
    return alm + sft_loss(logprob, sft_mask, normalizer=7)


@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("seed", range(4))
def test_alm_sft_loss_and_gradients_equal_the_materialised_path_fp64(kind, seed):
    targets, _, _, _ = random_batch(seed, bsz=3, extreme=False)
    bsz, seq = targets.student_chunk.shape
    vocab, width, hid = 23, 29, 8  # 6 padding columns
    layer, params = make_layer(kind, hidden=hid, width=width, vocab=vocab, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    hidden = torch.randn(bsz, seq, hid, generator=gen, dtype=F64, requires_grad=True)
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    ids[0, -1] = -100  # a padding id never enters a softmax
    mask = torch.rand(vocab, generator=gen) < 0.3
    sft_mask = targets.student_scored

    lp_ref, sg_ref = student_path(layer.logits(hidden), ids, mask)
    loss_ref = _alm_sft(lp_ref, sg_ref, targets, sft_mask)
    grads_ref = torch.autograd.grad(loss_ref, [hidden, *params])

    lp, sg = fused_student_path(hidden, layer, ids, mask, chunk_elements=vocab * 2)  # 2 rows per slab
    assert torch.allclose(lp, lp_ref, rtol=0, atol=1e-12) and torch.allclose(sg, sg_ref, rtol=0, atol=1e-12)
    loss = _alm_sft(lp, sg, targets, sft_mask)
    grads = torch.autograd.grad(loss, [hidden, *params])
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-12, abs=1e-12)
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert float(grads[1][vocab:].abs().max()) == 0.0  # padding rows of the weight get no gradient


@pytest.mark.parametrize("kind", ["plain", "everything"])
def test_fp32_larger_shapes_several_slabs(kind):
    bsz, seq, hid, vocab, width = 4, 48, 64, 3000, 3008
    layer, params = make_layer(kind, hidden=hid, width=width, vocab=vocab, dtype=torch.float32, seed=3)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(bsz, seq, hid, generator=gen, requires_grad=True)
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    mask = torch.rand(vocab, generator=gen) < 0.2
    up_lp, up_sg = torch.randn(bsz, seq, generator=gen), torch.randn(bsz, seq, generator=gen)

    def run(fused: bool):
        if fused:
            lp, sg = fused_student_path(hidden, layer, ids, mask, chunk_elements=vocab * 37)  # 6 slabs
        else:
            lp, sg = student_path(layer.logits(hidden), ids, mask)
        value = (lp * up_lp).sum() + (sg * up_sg).sum()
        return lp, sg, torch.autograd.grad(value, [hidden, *params])

    lp_ref, sg_ref, g_ref = run(False)
    lp, sg, g = run(True)
    assert torch.allclose(lp, lp_ref, rtol=1e-5, atol=1e-5) and torch.allclose(sg, sg_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(g, g_ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_gradcheck_every_output():
    layer, params = make_layer("everything", hidden=5, width=13, vocab=11, seed=1)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 3, 5, generator=gen, dtype=F64, requires_grad=True)
    gather = torch.randint(0, 11, (2, 3, 4), generator=gen)
    mask = torch.tensor([True, False] * 5 + [True])

    def f(h, w, b, a, bb):
        lay = OutputLayer(weight=w, vocab_size=11, bias=b, lora_a=a, lora_b=bb, lora_scale=0.5,
                          logit_scale=1.3, softcap=4.0)
        out = fused_output(h, lay, gather_ids=gather, boundary_mask=mask, topk=3, chunk_elements=22)
        return out.gathered_logprob, out.boundary_logmass, out.topk_logprob

    assert torch.autograd.gradcheck(f, (hidden, *params))


def test_gathers_and_own_topk_equal_log_softmax():
    layer, _ = make_layer("bias", hidden=6, width=40, vocab=37, seed=4)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 5, 6, generator=gen, dtype=F64)
    gather = torch.randint(-3, 45, (3, 5, 4), generator=gen)  # out of range → clamped, as student_path does
    out = fused_output(hidden, layer, gather_ids=gather, topk=6, chunk_elements=37 * 4)
    assert isinstance(out, FusedOutputs)
    logp = torch.log_softmax(layer.logits(hidden)[..., :37], dim=-1)
    assert torch.allclose(out.gathered_logprob, logp.gather(-1, gather.clamp(0, 36)), atol=1e-12)
    top = logp.topk(6, dim=-1)
    assert torch.allclose(out.topk_logprob, top.values, atol=1e-12)
    assert torch.equal(out.topk_ids, top.indices)
    assert out.boundary_logmass.shape == (3, 5) and out.boundary_logmass.abs().max().item() == 0.0


def test_kd_from_fused_gathers_equals_kd_from_logits():
    layer, params = make_layer("lora", hidden=7, width=31, vocab=31, seed=6)
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 9, 7, generator=gen, dtype=F64, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(2, 9, 31, generator=gen, dtype=F64), -1)
    top = t_lp.topk(5, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    mask = torch.rand(2, 9, generator=gen) < 0.8
    want = kd_topk_loss(layer.logits(hidden), top.indices, top.values, tail, mask, normalizer=4)
    gathered = fused_output(hidden, layer, gather_ids=top.indices, chunk_elements=31 * 3).gathered_logprob
    got = kd_topk_loss_from_logprob(gathered, top.values, tail, mask, normalizer=4)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(got, [hidden, *params]), torch.autograd.grad(want, [hidden, *params]),
                    strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_uld_from_fused_topk_equals_uld_from_logits(seed):
    targets, _, _, _ = random_batch(400 + seed)
    bsz, seq = targets.student_chunk.shape
    layer, params = make_layer("bias", hidden=6, width=12, vocab=9, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(bsz, seq, 6, generator=gen, dtype=F64, requires_grad=True)
    t_lp = torch.log_softmax(torch.randn(*targets.teacher_chunk.shape, 20, generator=gen, dtype=F64), -1)
    top = t_lp.topk(4, dim=-1).values
    tail = torch.log1p(-top.exp().sum(-1))
    want = uld_loss(layer.logits(hidden), targets, top, tail, normalizer=3, vocab_size=9)
    rows_t, rows_s = uld_rows(targets)
    own = fused_output(hidden.reshape(-1, 6)[rows_s], layer, topk=4).topk_logprob
    got = uld_loss_from_topk(own, rows_t, top, tail, normalizer=3)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    if rows_s.numel():
        g_got = torch.autograd.grad(got, [hidden, *params])
        g_want = torch.autograd.grad(want, [hidden, *params])
        for a, b in zip(g_got, g_want, strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_edge_cases_empty_batch_no_mask_empty_mask_and_bf16():
    layer, params = make_layer("plain", hidden=4, width=10, vocab=10, dtype=torch.float32)
    # an empty batch keeps the graph connected
    hidden = torch.zeros(2, 0, 4, requires_grad=True)
    lp, sg = fused_student_path(hidden, layer, torch.zeros(2, 0, dtype=torch.long), torch.ones(10, dtype=torch.bool))
    (lp.sum() + sg.sum()).backward()
    assert lp.shape == (2, 0) and hidden.grad is not None
    # no boundary mask: σ = 0 and only ℓ carries gradient
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 4, generator=gen, requires_grad=True)
    ids = torch.randint(0, 10, (2, 5), generator=gen)
    lp, sg = fused_student_path(hidden, layer, ids)
    ref_lp, _ = student_path(layer.logits(hidden), ids, None)
    assert torch.allclose(lp, ref_lp, atol=1e-6) and sg.abs().max().item() == 0.0
    # an empty boundary set: σ at the floor with a finite (zero) gradient
    lp, sg = fused_student_path(hidden, layer, ids, torch.zeros(10, dtype=torch.bool), chunk_elements=1)
    grads = torch.autograd.grad(sg.sum() + lp.sum(), [hidden, *params])
    assert all(torch.isfinite(g).all() for g in grads)
    # bf16 hidden states and weight: float32 arithmetic, gradients in the inputs' dtype
    layer16 = OutputLayer(weight=params[0].detach().bfloat16().requires_grad_(True), vocab_size=10)
    h16 = hidden.detach().bfloat16().requires_grad_(True)
    lp16, sg16 = fused_student_path(h16, layer16, ids, torch.arange(10) < 4)
    assert lp16.dtype == torch.float32
    lp16.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and layer16.weight.grad.dtype == torch.bfloat16


def test_bad_shapes_are_data_errors():
    layer, _ = make_layer("plain", hidden=4, width=10, vocab=8)
    hidden = torch.zeros(1, 3, 4, dtype=F64)
    with pytest.raises(DataError, match="boundary mask covers 10"):
        fused_student_path(hidden, layer, torch.zeros(1, 3, dtype=torch.long), torch.ones(10, dtype=torch.bool))
    with pytest.raises(DataError, match="hidden size"):
        fused_output(torch.zeros(1, 3, 5, dtype=F64), layer)
    with pytest.raises(DataError, match="gather_ids"):
        fused_output(hidden, layer, gather_ids=torch.zeros(1, 2, 1, dtype=torch.long))
    with pytest.raises(DataError, match="vocab_size"):
        OutputLayer(weight=torch.zeros(10, 4), vocab_size=11)
    with pytest.raises(DataError, match="both LoRA factors"):
        OutputLayer(weight=torch.zeros(10, 4), vocab_size=10, lora_a=torch.zeros(2, 4))
    with pytest.raises(DataError, match="softcap"):
        OutputLayer(weight=torch.zeros(10, 4), vocab_size=10, softcap=0.0)


def test_student_path_on_selected_rows_equals_all_rows_there_and_is_zero_elsewhere():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, generator=g, requires_grad=True)
    layer = OutputLayer(weight=torch.randn(50, 16, dtype=torch.float64, generator=g), vocab_size=45)
    ids = torch.randint(0, 45, (3, 7), generator=g)
    mask = torch.arange(45) % 5 == 0
    rows = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    lp_all, sig_all = fused_student_path(hidden, layer, ids, mask, chunk_elements=100)
    lp, sig = fused_student_path(hidden, layer, ids, mask, rows=rows, chunk_elements=100)
    used = rows.clone()  # ℓ_r reads row r − 1: equal wherever row r is real
    torch.testing.assert_close(lp[used], lp_all[used], rtol=0, atol=1e-12)
    torch.testing.assert_close(sig[rows], sig_all[rows], rtol=0, atol=1e-12)
    assert torch.all(sig[~rows] == 0) and torch.all(lp[:, 1:][~rows[:, :-1]] == 0)
    (grad,) = torch.autograd.grad((lp * rows).sum() + (sig * rows).sum(), hidden)
    assert torch.all(grad[~rows] == 0) and torch.all(grad[rows].abs().sum(-1) > 0)


@pytest.mark.parametrize("kind", list(HEADS))
def test_gradients_asked_one_tensor_at_a_time_equal_the_materialised_path(kind):
    # The backward computes only what the running autograd call needs (GradMag asks for the
    # last block's gradient, not the output weight's); each tensor asked alone must still be right.
    layer, params = make_layer(kind, hidden=8, width=29, vocab=23, seed=5)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 6, 8, generator=gen, dtype=F64, requires_grad=True)
    ids = torch.randint(0, 23, (2, 6), generator=gen)
    mask = torch.rand(23, generator=gen) < 0.3
    lp_ref, sg_ref = student_path(layer.logits(hidden), ids, mask)
    lp, sg = fused_student_path(hidden, layer, ids, mask, chunk_elements=23 * 4)
    for tensor in [hidden, *params]:
        (want,) = torch.autograd.grad((lp_ref + sg_ref).sum(), [tensor], retain_graph=True)
        (got,) = torch.autograd.grad((lp + sg).sum(), [tensor], retain_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
