"""xtd.losses against the method's worked example (docs/method.md, "Worked example") and against slow,
obvious per-chunk references on random batches (padding, one-sided tokens, masked
prompts, partial chunks, −inf, p ≈ 1, bf16)."""

from __future__ import annotations

import gc
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xtd.losses._alm as alm_mod
from xtd.errors import ConfigError, DataError
from xtd.losses import (
    ALM_DISTANCES,
    LOGPROB_FLOOR,
    ALMTargets,
    alm_chunks,
    alm_distance,
    alm_loss,
    build_mined_map,
    combine_losses,
    count_alm_groups,
    count_mined_terms,
    count_scored_chunks,
    gradmag_weights,
    kd_topk_loss,
    latents_loss,
    make_latent_projection,
    mined_loss,
    one_to_one_chunks,
    sft_loss,
    student_path,
    teacher_sigma,
    uld_loss,
)
from xtd.model_parts import last_block_parameters

F64 = torch.float64

# ---------------------------------------------------------------------------------------
# Random batches and slow references
# ---------------------------------------------------------------------------------------


def random_batch(seed: int, bsz: int = 3, *, extreme: bool = True, vocab: int = 0):
    """A random padded batch of aligned examples; returns (targets, student ℓ, student σ, ids)."""
    rng = np.random.default_rng(seed)
    t_rows, s_rows = [], []
    for _ in range(bsz):
        tc, sc = [], []
        n_chunks = int(rng.integers(0, 7))
        if rng.random() < 0.5:  # a one-sided slot token (e.g. a bos the other family lacks)
            (tc if rng.random() < 0.5 else sc).append(-1)
        for c in range(n_chunks):
            tc += [c] * int(rng.integers(1, 4))
            sc += [c] * int(rng.integers(1, 4))
            if rng.random() < 0.15:
                (tc if rng.random() < 0.5 else sc).append(-1)
        tc += [-1] * int(rng.integers(0, 2))  # truncated remainder
        sc += [-1] * int(rng.integers(0, 2))
        t_rows.append(tc)
        s_rows.append(sc)
    tlen = max([len(r) for r in t_rows] + [1])
    slen = max([len(r) for r in s_rows] + [1])

    def pad(rows, length):
        return torch.tensor([r + [-1] * (length - len(r)) for r in rows], dtype=torch.long).reshape(
            bsz, length
        )

    tchunk, schunk = pad(t_rows, tlen), pad(s_rows, slen)

    def mask(chunk):
        m = torch.ones_like(chunk, dtype=torch.bool)
        for b in range(bsz):
            m[b, : int(rng.integers(0, 3))] = False  # masked prompt
            if rng.random() < 0.3:  # a mask boundary inside a chunk makes a partial chunk
                m[b, int(rng.integers(0, chunk.shape[1]))] = False
        return m

    def logp(shape, scale=3.0):
        x = -torch.from_numpy(rng.random(shape)) * scale
        if extreme:
            x[torch.from_numpy(rng.random(shape) < 0.05)] = -math.inf
            x[torch.from_numpy(rng.random(shape) < 0.05)] = -1e-9  # p ≈ 1
            x[torch.from_numpy(rng.random(shape) < 0.03)] = 0.0
        return x

    targets = ALMTargets(
        teacher_logprob=logp((bsz, tlen)),
        teacher_sigma=logp((bsz, tlen)),
        teacher_chunk=tchunk,
        teacher_scored=mask(tchunk),
        student_chunk=schunk,
        student_scored=mask(schunk),
    )
    ls, ss = logp((bsz, slen)), logp((bsz, slen))
    ids = torch.from_numpy(rng.integers(0, max(vocab, 1), (bsz, slen)))
    return targets, ls, ss, ids


def _clamp(x: float) -> float:
    return min(0.0, max(LOGPROB_FLOOR, x))


def _log1mexp(x: float) -> float:
    return math.log1p(-math.exp(x)) if x < -math.log(2) else math.log(-math.expm1(x))


def ref_distance(a: float, b: float, tau: float, kind: str) -> float:
    a, b = _clamp(a), _clamp(b)
    u, v = a / tau - 1e-6, b / tau - 1e-6
    if kind == "binary_ce":
        return -(math.exp(u) * v + (1 - math.exp(u)) * _log1mexp(v))
    if kind == "binary_kl":
        return math.exp(u) * (u - v) + (1 - math.exp(u)) * (_log1mexp(u) - _log1mexp(v))
    if kind == "abs":
        return abs(a - b)
    if kind == "abs_exp":
        return abs(math.exp(u) - math.exp(v))
    if kind == "reverse_binary_kl":
        return math.exp(v) * (v - u) + (1 - math.exp(v)) * (_log1mexp(v) - _log1mexp(u))
    if kind == "binary_kl_temp_limit":
        a1, b1 = a - 1e-6, b - 1e-6
        return (a1 - b1) + a1 * math.log(-b1) - a1 * math.log(-a1)
    if kind == "renyi":
        p, q = math.exp(u), math.exp(v)
        return math.log(p**0.5 * q**0.5 + (1 - p) ** 0.5 * (1 - q) ** 0.5) / (0.5 - 1)
    r = (a - b) / tau
    return r * r / 2 if kind == "joschu_k2" else math.exp(r) - 1 - r


def ref_alm(targets, ls, ss, *, merge=True, gamma=0.1, debias=True, tau=100.0, kind="binary_ce"):
    """docs/method.md, "Scoring a chunk" written out per example and per chunk: (sum of D, #groups)."""
    total, n_groups = 0.0, 0
    tc, sc = targets.teacher_chunk.tolist(), targets.student_chunk.tolist()
    for b in range(len(tc)):
        k = max(tc[b] + sc[b] + [-1]) + 1
        info = []
        for c in range(k):
            side = []
            for chunk, scored, lp, sig in (
                (
                    tc[b],
                    targets.teacher_scored[b].tolist(),
                    targets.teacher_logprob[b].tolist(),
                    targets.teacher_sigma[b].tolist(),
                ),
                (sc[b], targets.student_scored[b].tolist(), ls[b].tolist(), ss[b].tolist()),
            ):
                rows = [r for r, x in enumerate(chunk) if x == c]
                w = [r for r in rows if r >= 1 and scored[r]]
                total_lp = min(0.0, sum(_clamp(lp[r]) for r in w))
                sigma = _clamp(sig[max(rows)]) if rows else 0.0
                side.append((rows, w, total_lp, sigma))
            (tr, tw, lt, st), (sr, sw, lsum, ssig) = side
            scored_c = len(tw) >= 1 and len(sw) >= 1 and len(tw) == len(tr) and len(sw) == len(sr)
            void = not tw and not sw
            keep = bool(tr) and math.exp(st) > gamma
            info.append(
                dict(
                    scored=scored_c,
                    partial=not scored_c and not void,
                    lt=lt,
                    ls=lsum,
                    st=st,
                    ss=ssig,
                    keep=keep,
                )
            )
        groups: list[list[int]] = []
        if merge:
            cur: list[int] = []
            for c in range(k):
                cur.append(c)
                if info[c]["keep"]:
                    groups.append(cur)
                    cur = []
            if cur:
                groups.append(cur)
        else:
            groups = [[c] for c in range(k)]
        for members in groups:
            scored_m = [c for c in members if info[c]["scored"]]
            if not scored_m or any(info[c]["partial"] for c in members):
                continue
            lt = sum(info[c]["lt"] for c in scored_m)
            lsum = sum(info[c]["ls"] for c in scored_m)
            if debias:
                lt += info[scored_m[-1]]["st"]
                lsum += info[scored_m[-1]]["ss"]
            total += ref_distance(lt, lsum, tau, kind)
            n_groups += 1
    return total, n_groups


def spec_example():
    """docs/method.md, "Worked example" as index arrays."""
    targets = ALMTargets(
        teacher_logprob=torch.tensor([[float("nan"), -1.0, -0.5, -2.0]]),  # row 0 is never scored
        teacher_sigma=torch.log(torch.tensor([[0.01, 0.02, 0.6, 0.3]])),
        teacher_chunk=torch.tensor([[0, 1, 1, 2]]),
        teacher_scored=torch.ones(1, 4, dtype=torch.bool),
        student_chunk=torch.tensor([[0, 1, 2, 2]]),
        student_scored=torch.ones(1, 4, dtype=torch.bool),
    )
    ls = torch.tensor([[0.0, -1.2, -1.0, -0.3]])
    ss = torch.log(torch.tensor([[0.01, 0.5, 0.03, 0.25]]))
    return targets, ls, ss


# ---------------------------------------------------------------------------------------
# Spec test vectors
# ---------------------------------------------------------------------------------------


def test_worked_example_debiased_and_not():
    targets, ls, ss = spec_example()
    assert count_alm_groups(targets) == 2
    loss, stats = alm_loss(ls, ss, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.119105, abs=1e-6)
    assert stats["alm_binary_kl"].item() == pytest.approx(2.48762e-4, abs=5e-9)  # fp32 cancellation
    assert stats["alm_groups"].item() == 2
    assert stats["alm_logprob_teacher_min"].item() == pytest.approx(-3.203973, abs=1e-5)
    assert stats["alm_logprob_student_max"].item() == pytest.approx(-1.893147, abs=1e-5)
    plain, _ = alm_loss(ls, ss, targets, debias=False)
    assert plain.item() == pytest.approx(0.088315, abs=1e-6)
    # The same in float64 (student inputs decide the compute dtype).
    loss64, stats64 = alm_loss(ls.double(), ss.double(), targets)
    assert loss64.item() == pytest.approx(0.119105, abs=1e-6)
    assert stats64["alm_binary_kl"].item() == pytest.approx(2.48762e-4, abs=1e-9)
    # Per-group values of steps 8–10.
    d = alm_distance(torch.tensor([-2.010826, -3.203973]), torch.tensor([-1.893147, -2.686294]))
    assert d.tolist() == pytest.approx([0.097718, 0.140493], abs=1e-6)
    d0 = alm_distance(torch.tensor([-1.5, -2.0]), torch.tensor([-1.2, -1.3]))
    assert d0.tolist() == pytest.approx([0.077762, 0.098868], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_distance_table(dtype):
    rows = [
        (-2, -1, 0.1010929, 0.00382418),
        (-2, -2, 0.0972687, 0.0),
        (-0.1, -3, 0.0334942, 0.0255835),
        (-5, -0.5, 0.2632763, 0.0683942),
        (0, 0, 1.48155e-5, 0.0),
    ]
    a = torch.tensor([r[0] for r in rows], dtype=dtype)
    b = torch.tensor([r[1] for r in rows], dtype=dtype)  # all exactly representable in bf16
    ce = alm_distance(a, b)
    kl = alm_distance(a, b, kind="binary_kl")
    assert ce.dtype == (F64 if dtype == F64 else torch.float32)
    if dtype == torch.bfloat16:  # -0.1 rounds in bf16: compare with the rounded inputs in fp64
        ce_ref = alm_distance(a.double(), b.double()).tolist()
        kl_ref = alm_distance(a.double(), b.double(), kind="binary_kl").tolist()
    else:
        ce_ref, kl_ref = [r[2] for r in rows], [r[3] for r in rows]
    assert ce.tolist() == pytest.approx(ce_ref, abs=1e-6)
    assert kl.tolist() == pytest.approx(kl_ref, abs=1e-6)


def test_distance_minimum_has_zero_gradient():
    b = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    for kind in ("binary_ce", "binary_kl"):
        (g,) = torch.autograd.grad(alm_distance(torch.tensor(-2.0, dtype=F64), b, kind=kind), b)
        assert abs(g.item()) < 1e-12


def test_train_config_distances_are_the_losses_without_renyi():
    # xtd.config lists --distance choices itself (it must not import torch); renyi is left
    # out on purpose: its order alpha is not a TrainConfig field.
    from xtd.config import TRAIN_ALM_DISTANCES

    assert TRAIN_ALM_DISTANCES == tuple(d for d in ALM_DISTANCES if d != "renyi")


@pytest.mark.parametrize("kind", ALM_DISTANCES)
def test_distances_match_scalar_reference(kind):
    rng = np.random.default_rng(0)
    a = -rng.random(50) * 6
    b = -rng.random(50) * 6
    a[:3], b[:3] = [0, -1e-9, -1e4], [-1e-9, 0, -3]
    got = alm_distance(torch.tensor(a), torch.tensor(b), tau=7.0, kind=kind)
    want = [ref_distance(x, y, 7.0, kind) for x, y in zip(a, b, strict=True)]
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_distance_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="unknown ALM distance"):
        alm_distance(torch.zeros(1), torch.zeros(1), kind="kl")
    with pytest.raises(ConfigError, match="tau"):
        alm_distance(torch.zeros(1), torch.zeros(1), tau=0.0)


def test_merge_grouping_spec_10_9():
    # Chunks c0..c4 with teacher counts [0, 1, 2, 1, 1] (c0 = the row-0 bos); one student token each.
    probs = torch.tensor([[0.9, 0.05, 0.3, 0.5, 0.01, 0.3]])  # row 2 is inside c2; c2 ends at row 3
    targets = ALMTargets(
        teacher_logprob=-torch.rand(1, 6),
        teacher_sigma=torch.log(probs),
        teacher_chunk=torch.tensor([[0, 1, 2, 2, 3, 4]]),
        teacher_scored=torch.ones(1, 6, dtype=torch.bool),
        student_chunk=torch.tensor([[0, 1, 2, 3, 4]]),
        student_scored=torch.ones(1, 5, dtype=torch.bool),
    )
    chunks = alm_chunks(targets)
    assert chunks.group.tolist() == [0, 1, 1, 2, 2]
    assert chunks.teacher_count.tolist() == [0, 1, 2, 1, 1]
    merged = torch.zeros(5, dtype=torch.long).index_add_(0, chunks.group, chunks.teacher_count)
    assert merged.tolist() == [0, 3, 2, 0, 0]
    assert count_alm_groups(targets) == 2
    _, stats = alm_loss(-torch.rand(1, 5), -torch.rand(1, 5), targets)
    assert stats["alm_normalizer"].item() == 2
    # The reference multiplies by the merge matrix a second time: [0, 5, 0, 0, 0] → 1 group (defect #1).
    twice = torch.zeros(5, dtype=torch.long).index_add_(0, chunks.group, merged)
    assert int((twice > 0).sum()) == 1
    assert count_alm_groups(targets, merge=False) == 4


# ---------------------------------------------------------------------------------------
# Against the slow reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_alm_matches_reference(seed):
    targets, ls, ss, _ = random_batch(seed, bsz=1 + seed % 4)
    merge, debias = seed % 2 == 0, seed % 3 != 0
    kind = ALM_DISTANCES[seed % len(ALM_DISTANCES)]
    tau = 100.0 if seed % 5 else 5.0
    want, n = ref_alm(targets, ls, ss, merge=merge, debias=debias, kind=kind, tau=tau)
    loss, stats = alm_loss(
        ls, ss, targets, merge=merge, debias=debias, distance=kind, tau=tau, normalizer=1
    )
    assert torch.isfinite(loss)
    assert stats["alm_groups"].item() == n
    assert count_alm_groups(targets, merge=merge) == n
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-10)
    loss_mean, _ = alm_loss(ls, ss, targets, merge=merge, debias=debias, distance=kind, tau=tau)
    assert loss_mean.item() == pytest.approx(want / max(n, 1), rel=1e-9, abs=1e-10)


def test_alm_gradcheck_float64():
    for seed in range(4):
        targets, _, _, _ = random_batch(100 + seed, bsz=3, extreme=False)
        gen = torch.Generator().manual_seed(seed)
        slen = targets.student_chunk.shape[1]
        ls = (-torch.rand(3, slen, generator=gen, dtype=F64) * 2 - 0.05).requires_grad_()
        ss = (-torch.rand(3, slen, generator=gen, dtype=F64) * 2 - 0.05).requires_grad_()
        for kind in (
            "binary_ce",
            "binary_kl",
            "reverse_binary_kl",
            "binary_kl_temp_limit",
            "renyi",
            "joschu_k3",
        ):
            assert torch.autograd.gradcheck(
                lambda a, b, k=kind, t=targets: alm_loss(a, b, t, distance=k, tau=5.0)[0], (ls, ss)
            )


def test_student_equal_to_teacher_has_zero_gradient():
    # Identical tokenizations: every chunk is the same rows on both sides.
    for seed in range(5):
        targets, _, _, _ = random_batch(200 + seed, extreme=False)
        same = ALMTargets(
            teacher_logprob=targets.teacher_logprob.double(),
            teacher_sigma=targets.teacher_sigma.double(),
            teacher_chunk=targets.teacher_chunk,
            teacher_scored=targets.teacher_scored,
            student_chunk=targets.teacher_chunk,
            student_scored=targets.teacher_scored,
        )
        ls = targets.teacher_logprob.double().clone().requires_grad_()
        ss = targets.teacher_sigma.double().clone().requires_grad_()
        for kind in ("binary_ce", "binary_kl"):
            loss, stats = alm_loss(ls, ss, same, distance=kind)
            gl, gs = torch.autograd.grad(loss, (ls, ss))
            assert gl.abs().max().item() < 1e-12 and gs.abs().max().item() < 1e-12
            assert stats["alm_binary_kl"].item() == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------------------------------
# Edge cases: never a silent NaN
# ---------------------------------------------------------------------------------------


def _assert_finite_grad(loss, *inputs):
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    for g in grads:
        assert g is None or torch.isfinite(g).all()


def test_everything_masked_gives_zero():
    targets, ls, ss, _ = random_batch(7)
    targets.teacher_scored[:] = False
    targets.student_scored[:] = False
    ls.requires_grad_()
    assert count_alm_groups(targets) == 0
    for normalizer in (None, 0, 5):
        loss, stats = alm_loss(ls, ss, targets, normalizer=normalizer)
        assert loss.item() == 0.0 and loss.requires_grad
        assert all(torch.isfinite(v) for v in stats.values())
        _assert_finite_grad(loss, ls)


def test_zero_normalizer_with_groups_is_an_error():
    targets, ls, ss = spec_example()
    with pytest.raises(DataError, match="normalizer"):
        alm_loss(ls, ss, targets, normalizer=0)


def test_empty_batch_and_single_token():
    empty = ALMTargets(
        *(torch.zeros(0, 0) for _ in range(2)),
        torch.zeros(0, 0, dtype=torch.long),
        torch.zeros(0, 0, dtype=torch.bool),
        torch.zeros(0, 0, dtype=torch.long),
        torch.zeros(0, 0, dtype=torch.bool),
    )
    loss, _ = alm_loss(torch.zeros(0, 0, requires_grad=True), torch.zeros(0, 0), empty)
    assert loss.item() == 0.0
    one = ALMTargets(
        torch.tensor([[-1.0]]),
        torch.tensor([[-0.1]]),
        torch.tensor([[0]]),
        torch.ones(1, 1, dtype=torch.bool),
        torch.tensor([[0]]),
        torch.ones(1, 1, dtype=torch.bool),
    )
    loss, _ = alm_loss(torch.tensor([[-2.0]]), torch.tensor([[-0.3]]), one)
    assert loss.item() == 0.0  # row 0 is never scored: the only chunk is void
    logp, sigma = student_path(
        torch.zeros(0, 0, 5), torch.zeros(0, 0, dtype=torch.long), torch.ones(5, dtype=torch.bool)
    )
    assert logp.shape == (0, 0) and sigma.shape == (0, 0)


def test_inf_and_near_one_probabilities_stay_finite():
    targets, _, _, _ = random_batch(11)
    slen = targets.student_chunk.shape[1]
    targets.teacher_logprob[:, 1::2] = -math.inf
    targets.teacher_sigma[:, ::3] = -math.inf
    ls = torch.full((3, slen), -1e-12)
    ls[:, ::2] = -math.inf
    ss = torch.zeros(3, slen)
    ss[:, 1::2] = -math.inf
    ls.requires_grad_()
    ss.requires_grad_()
    for kind in ALM_DISTANCES:
        loss, stats = alm_loss(ls, ss, targets, distance=kind)
        assert torch.isfinite(loss), kind
        _assert_finite_grad(loss, ls, ss)
        assert all(torch.isfinite(v) for v in stats.values())


def test_bf16_inputs_compute_in_fp32():
    targets, ls, ss, _ = random_batch(3, extreme=False)
    want, _ = alm_loss(ls.bfloat16().float(), ss.bfloat16().float(), targets)
    lb = ls.bfloat16().requires_grad_()
    got, _ = alm_loss(lb, ss.bfloat16(), targets)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    (g,) = torch.autograd.grad(got, lb)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_nan_in_scored_teacher_row_is_an_error():
    targets, ls, ss = spec_example()
    targets.teacher_logprob[0, 2] = math.nan
    with pytest.raises(DataError, match="NaN"):
        alm_loss(ls, ss, targets)


def test_out_of_range_chunk_ids_are_rejected():
    targets, _, _ = spec_example()
    with pytest.raises(DataError, match="shape"):
        alm_chunks(ALMTargets(targets.teacher_logprob[:, :3], *list(vars(targets).values())[1:]))


# ---------------------------------------------------------------------------------------
# Student path
# ---------------------------------------------------------------------------------------


def ref_student_path(logits, ids, mask):
    lp = torch.log_softmax(logits[..., : mask.numel()].double(), dim=-1)
    tok = lp[:, :-1].gather(-1, ids[:, 1:, None].clamp(min=0)).squeeze(-1)
    logprob = torch.cat([torch.zeros(ids.shape[0], 1, dtype=F64), tok], dim=1)
    sigma = torch.logsumexp(lp.masked_fill(~mask, -math.inf), dim=-1).clamp(max=0)
    return logprob, sigma


@pytest.mark.parametrize("seed", range(6))
def test_student_path_matches_log_softmax(seed, monkeypatch):
    if seed % 2:
        monkeypatch.setattr(alm_mod, "_CHUNK_ELEMENTS", 17)  # many slabs, ragged last one
    gen = torch.Generator().manual_seed(seed)
    bsz, seq, vocab, pad = 2, 5, 11, 3 * (seed % 3 == 0)
    logits = (torch.randn(bsz, seq, vocab + pad, generator=gen, dtype=F64) * 3).requires_grad_()
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    ids[0, -1] = -100  # padding id
    mask = torch.rand(vocab, generator=gen) < 0.4
    mask[0] = True
    logprob, sigma = student_path(logits, ids, mask)
    want_lp, want_sig = ref_student_path(logits, ids, mask)
    torch.testing.assert_close(logprob, want_lp.clamp(min=LOGPROB_FLOOR))
    torch.testing.assert_close(sigma, want_sig)
    w1, w2 = torch.randn(bsz, seq, dtype=F64), torch.randn(bsz, seq, dtype=F64)
    g = torch.autograd.grad((logprob * w1).sum() + (sigma * w2).sum(), logits)[0]
    g_ref = torch.autograd.grad((want_lp * w1).sum() + (want_sig * w2).sum(), logits)[0]
    torch.testing.assert_close(g, g_ref)
    if pad:
        assert g[..., vocab:].abs().max().item() == 0.0
    assert torch.autograd.gradcheck(lambda z: student_path(z, ids, mask), (logits,))


def test_student_path_bf16_and_edge_masks():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 9, generator=gen).bfloat16().requires_grad_()
    ids = torch.randint(0, 9, (2, 4), generator=gen)
    mask = torch.zeros(9, dtype=torch.bool)  # no boundary token at all → σ at the floor
    logprob, sigma = student_path(logits, ids, mask)
    assert logprob.dtype == torch.float32 and (sigma == LOGPROB_FLOOR).all()
    (g,) = torch.autograd.grad(logprob.sum() + sigma.sum(), logits)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()
    full, _ = student_path(logits, ids, None)
    torch.testing.assert_close(full, logprob)
    _, sig_all = student_path(logits.float(), ids, torch.ones(9, dtype=torch.bool))
    assert sig_all.abs().max().item() < 1e-6
    with pytest.raises(DataError, match="boundary mask"):
        student_path(logits, ids, torch.ones(12, dtype=torch.bool))


def test_teacher_sigma_from_class_columns():
    with np.errstate(divide="ignore"):
        mass = np.log(np.array([[[0.1, 0.2, 0.0, 0.05]]])).astype(np.float16)
    assert teacher_sigma(mass).item() == pytest.approx(math.log(0.35), abs=2e-3)
    assert teacher_sigma(mass, [2]).item() == LOGPROB_FLOOR


# ---------------------------------------------------------------------------------------
# Accumulation and data parallelism
# ---------------------------------------------------------------------------------------

VOCAB = 13


def _tiny_student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, 8), torch.nn.Tanh(), torch.nn.Linear(8, VOCAB)
    )


def _slice(targets, ids, lo, hi):
    """Examples lo:hi, re-padded to their own longest sequence (so C and padding change)."""

    def trim(x, chunk):
        keep = (
            int((chunk[lo:hi] >= 0).any(0).nonzero().max()) + 1 if (chunk[lo:hi] >= 0).any() else 1
        )
        return x[lo:hi, :keep]

    tc, sc = targets.teacher_chunk, targets.student_chunk
    part = ALMTargets(
        trim(targets.teacher_logprob, tc),
        trim(targets.teacher_sigma, tc),
        trim(tc, tc),
        trim(targets.teacher_scored, tc),
        trim(sc, sc),
        trim(targets.student_scored, sc),
    )
    return part, trim(ids, sc)


def _step_loss(model, targets, ids, normalizer):
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[::3] = True
    logprob, sigma = student_path(model(ids), ids, mask)
    loss, _ = alm_loss(logprob, sigma, targets, normalizer=normalizer)
    return loss


def _global_batch():
    targets, _, _, ids = random_batch(1234, bsz=8, extreme=False, vocab=VOCAB)
    return targets, ids


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    targets, ids = _global_batch()
    part, part_ids = _slice(targets, ids, rank * 4, rank * 4 + 4)
    count = torch.tensor(count_alm_groups(part))
    dist.all_reduce(count)  # N_global before the forward pass
    model = DistributedDataParallel(_tiny_student())
    loss = _step_loss(model, part, part_ids, int(count))
    (loss * world).backward()  # DDP averages gradients over ranks; the loss is a global sum
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save(
            {"loss": total, "grads": [p.grad for p in model.module.parameters()]},
            os.path.join(out_dir, "ddp.pt"),
        )
    # Release DDP's reducer and wait for both ranks before tearing gloo down: a rank that
    # destroys the group while its peer is still inside it can abort in gloo's C++ threads.
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batch_equals_accumulation_equals_ddp(tmp_path):
    targets, ids = _global_batch()
    assert count_alm_groups(targets) > 8  # a real batch
    model = _tiny_student()
    full = _step_loss(model, targets, ids, None)
    full.backward()
    want = [p.grad.clone() for p in model.parameters()]

    model = _tiny_student()
    parts = [_slice(targets, ids, i, i + 2) for i in range(0, 8, 2)]
    n_global = sum(count_alm_groups(p) for p, _ in parts)
    accum = 0.0
    for part, part_ids in parts:
        loss = _step_loss(model, part, part_ids, n_global)
        loss.backward()
        accum += loss.item()
    assert accum == pytest.approx(full.item(), rel=1e-5)
    for g, w in zip((p.grad for p in model.parameters()), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)

    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True
    )
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["loss"].item() == pytest.approx(full.item(), rel=1e-5)
    for g, w in zip(ddp["grads"], want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Hidden states, SFT, KD, ULD, MinED
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l2_channelwise", "l2", "l1", "l1_channelwise"])
def test_latents_matches_reference(kind):
    for seed in range(8):
        targets, _, _, _ = random_batch(300 + seed)
        gen = torch.Generator().manual_seed(seed)
        hs = torch.randn(*targets.student_chunk.shape, 4, generator=gen, dtype=F64)
        ht = torch.randn(*targets.teacher_chunk.shape, 4, generator=gen).half()
        pairs = []
        ref = ref_chunk_status(targets)
        for b, tl, sl in ref["scored_last"]:
            pairs.append((hs[b, sl], ht[b, tl].double()))
        got = latents_loss(hs, ht, targets, kind=kind, normalizer=10)
        if not pairs:
            assert got.item() == 0.0
            continue
        s, t = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        err = (s - t).square() if kind.startswith("l2") else (s - t).abs()
        ref_mag = t.square() if kind.startswith("l2") else t.abs()
        scale = ref_mag.mean(0) if kind.endswith("channelwise") else ref_mag.mean()
        want = (err / (scale + 1e-8)).mean(-1).sum() / 10
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert count_scored_chunks(targets) == len(pairs)


def ref_chunk_status(targets):
    """Per scored chunk: (example, last teacher row, last student row, first teacher row, first student row)."""
    out = {"scored_last": [], "scored_first": [], "one_to_one": []}
    for b in range(targets.teacher_chunk.shape[0]):
        tc, sc = targets.teacher_chunk[b].tolist(), targets.student_chunk[b].tolist()
        for c in range(max(tc + sc + [-1]) + 1):
            tr = [r for r, x in enumerate(tc) if x == c]
            sr = [r for r, x in enumerate(sc) if x == c]
            tw = [r for r in tr if r >= 1 and targets.teacher_scored[b, r]]
            sw = [r for r in sr if r >= 1 and targets.student_scored[b, r]]
            if tw and sw and len(tw) == len(tr) and len(sw) == len(sr):
                out["scored_last"].append((b, max(tr), max(sr)))
                out["scored_first"].append((b, min(tr), min(sr)))
                if len(tr) == 1 and len(sr) == 1:
                    out["one_to_one"].append((b, tr[0], sr[0]))
    return out


def test_latents_projection_and_errors():
    targets, _, _ = spec_example()
    hs, ht = torch.randn(1, 4, 3), torch.randn(1, 4, 5)
    with pytest.raises(ConfigError, match="projection"):
        latents_loss(hs, ht, targets)
    proj = make_latent_projection(3, 5)
    loss = latents_loss(hs, ht, targets, projection=proj)
    (g,) = torch.autograd.grad(loss, proj.weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    ident = make_latent_projection(5, 5)
    # Student rows 1 and 3 end c1 and c2; teacher rows 2 and 3.
    hs_same = torch.randn(1, 4, 5)
    hs_same[0, 1], hs_same[0, 3] = ht[0, 2], ht[0, 3]
    assert latents_loss(hs_same, ht, targets, projection=ident).item() == pytest.approx(
        0.0, abs=1e-12
    )
    # The row-0 (bos) chunk and the unmasked rows are never used: changing them changes nothing.
    ht2 = ht.clone()
    ht2[0, 0] += 100
    ht2[0, 1] += 100  # inside c1, not its last row
    assert latents_loss(hs_same, ht2, targets).item() == pytest.approx(0.0, abs=1e-12)
    targets.student_scored[0, 3] = False  # c2 becomes partial: only c1 is left
    hs_same[0, 3] += 1
    assert latents_loss(hs_same, ht, targets).item() == pytest.approx(0.0, abs=1e-12)


def test_sft_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 10, generator=gen)
    ids = torch.randint(0, 10, (3, 6), generator=gen)
    mask = torch.rand(3, 6, generator=gen) < 0.7
    logprob, _ = student_path(logits, ids, None)
    labels = ids.clone()
    labels[~mask] = -100
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), reduction="sum"
    )
    n = int(mask[:, 1:].sum())
    assert sft_loss(logprob, mask).item() == pytest.approx(want.item() / n, rel=1e-5)
    assert sft_loss(logprob, mask, normalizer=4 * n).item() == pytest.approx(
        want.item() / (4 * n), rel=1e-5
    )
    assert sft_loss(logprob, torch.zeros_like(mask)).item() == 0.0


def test_kd_topk_full_vocab_is_exact_kl_and_tail_is_one_outcome():
    gen = torch.Generator().manual_seed(1)
    bsz, seq, vocab = 2, 5, 8
    logits = torch.randn(bsz, seq, vocab, generator=gen, dtype=F64)
    t_lp = torch.log_softmax(torch.randn(bsz, seq, vocab, generator=gen, dtype=F64), -1)
    mask = torch.ones(bsz, seq, dtype=torch.bool)
    mask[0, :2] = False
    s_lp = torch.log_softmax(logits, -1)
    rows = torch.zeros_like(mask)
    rows[:, :-1] = mask[:, 1:]
    full_kl = (t_lp.exp() * (t_lp - s_lp)).sum(-1)[rows].mean()
    vals, ids = t_lp.sort(-1, descending=True)
    got = kd_topk_loss(logits, ids, vals, torch.full((bsz, seq), -math.inf), mask)
    assert got.item() == pytest.approx(full_kl.item(), rel=1e-6)
    k = 3
    tail_t = torch.log1p(-vals[..., :k].exp().sum(-1))
    tail_s = torch.log1p(-s_lp.gather(-1, ids[..., :k]).exp().sum(-1))
    coarse = (vals[..., :k].exp() * (vals[..., :k] - s_lp.gather(-1, ids[..., :k]))).sum(
        -1
    ) + tail_t.exp() * (tail_t - tail_s)
    got_k = kd_topk_loss(logits, ids[..., :k], vals[..., :k], tail_t, mask)
    assert got_k.item() == pytest.approx(coarse[rows].mean().item(), rel=1e-6)
    assert got_k.item() <= got.item() + 1e-12  # coarsening can only lower a KL


def test_uld_at_aligned_chunk_starts():
    for seed in range(10):
        targets, _, _, _ = random_batch(400 + seed)
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(*targets.student_chunk.shape, 7, generator=gen, dtype=F64)
        k = 4
        t_lp = torch.log_softmax(
            torch.randn(*targets.teacher_chunk.shape, 20, generator=gen, dtype=F64), -1
        )
        top = t_lp.topk(k, dim=-1).values
        tail = torch.log1p(-top.exp().sum(-1))
        got = uld_loss(logits, targets, top, tail, normalizer=1)
        want = 0.0
        for b, tf, sf in ref_chunk_status(targets)["scored_first"]:
            p_s = torch.softmax(logits[b, sf - 1], -1).sort(descending=True).values[:k]
            p_t = top[b, tf - 1].exp()
            want += (p_t - p_s).abs().sum() + (tail[b, tf - 1].exp() - (1 - p_s.sum())).abs()
        assert float(got) == pytest.approx(float(want), rel=1e-9, abs=1e-12)


def test_one_to_one_mask_is_explicit():
    for seed in range(10):
        targets, _, _, _ = random_batch(500 + seed)
        chunks = alm_chunks(targets, merge=False)
        got = one_to_one_chunks(chunks).nonzero().squeeze(1).tolist()
        ref = ref_chunk_status(targets)["one_to_one"]
        assert len(got) == len(ref)
        k = chunks.num_chunks
        assert sorted(
            (s // k, int(chunks.teacher_last[s]) % targets.teacher_chunk.shape[1]) for s in got
        ) == sorted((b, t) for b, t, _ in ref)


def test_mined_loss_matches_reference():
    for seed in range(8):
        targets, ls_unused, _, _ = random_batch(600 + seed)
        gen = torch.Generator().manual_seed(seed)
        v_s, v_t, k = 9, 12, 4
        logits = torch.randn(*targets.student_chunk.shape, v_s, generator=gen, dtype=F64)
        ids = torch.randint(0, v_s, targets.student_chunk.shape, generator=gen)
        logprob, _ = student_path(logits, ids, None)
        t_lp = torch.log_softmax(
            torch.randn(*targets.teacher_chunk.shape, v_t, generator=gen, dtype=F64), -1
        )
        top_v, top_i = t_lp.topk(k, dim=-1)
        tail = torch.log1p(-top_v.exp().sum(-1))
        mapping = torch.randint(-1, v_t, (v_s,), generator=gen)
        got = mined_loss(
            logits,
            logprob,
            targets,
            top_i,
            top_v,
            tail,
            mapping,
            teacher_vocab_size=v_t,
            normalizer=1,
        )
        ref = ref_chunk_status(targets)
        want = 0.0
        one_rows = {(b, s) for b, _, s in ref["one_to_one"]}
        for b, t, s in ref["one_to_one"]:
            # Coarsened distributions: one outcome per student id mapped into the teacher's
            # top-k, then "any other token" (teacher tail mass; student's remaining mass).
            known = dict(zip(top_i[b, t - 1].tolist(), top_v[b, t - 1].tolist(), strict=True))
            lp_s = torch.log_softmax(logits[b, s - 1], -1)
            inside = [v for v in range(v_s) if int(mapping[v]) in known]
            outside = [v for v in range(v_s) if int(mapping[v]) not in known]
            tl = [known[int(mapping[v])] for v in inside] + [float(tail[b, t - 1])]
            sl = [float(lp_s[v]) for v in inside] + [float(torch.logsumexp(lp_s[outside], 0))]
            q_t = torch.log_softmax(torch.tensor(tl, dtype=F64) / 2, -1)
            q_s = torch.log_softmax(torch.tensor(sl, dtype=F64) / 2, -1)
            want += float((q_t.exp() * (q_t - q_s)).sum())
        n_ce = 0
        for b in range(ids.shape[0]):
            for r in range(1, ids.shape[1]):
                if (
                    targets.student_scored[b, r]
                    and targets.student_chunk[b, r] >= 0
                    and (b, r) not in one_rows
                ):
                    want -= float(logprob[b, r])
                    n_ce += 1
        assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert count_mined_terms(targets) == len(ref["one_to_one"]) + n_ce


def test_mined_tail_is_one_outcome_and_gradients_stay_finite():
    """The student's tail is free: only its total mass is matched, never a uniform spread."""
    targets, _, _, _ = random_batch(650)
    shape = targets.student_chunk.shape
    gen = torch.Generator().manual_seed(0)
    v_t, k = 12, 4
    t_lp = torch.log_softmax(torch.randn(*targets.teacher_chunk.shape, v_t, generator=gen, dtype=F64), -1)
    top_v, top_i = t_lp.topk(k, dim=-1)
    tail = torch.log1p(-top_v.exp().sum(-1))
    identity = torch.arange(v_t)
    ids = torch.randint(0, v_t, shape, generator=gen)

    def loss_of(logits):
        logprob, _ = student_path(logits, ids, None)
        return mined_loss(logits, logprob, targets, top_i, top_v, tail, identity,
                          teacher_vocab_size=v_t, normalizer=1)

    # A student equal to the teacher on the rows predicting 1:1 chunks, and one with the
    # same top-k but its tail spread evenly, have the same coarsened distributions: same
    # loss (the CE rows are untouched). A uniform-spread target would prefer the second.
    base = torch.randn(*shape, v_t, generator=gen, dtype=F64)
    chunks = alm_chunks(targets, merge=False)
    sel = one_to_one_chunks(chunks).nonzero().squeeze(1)
    assert sel.numel() > 0
    exact, spread = base.clone(), base.clone()
    rows_t = (chunks.teacher_first[sel] - 1).tolist()
    rows_s = (chunks.student_first[sel] - 1).tolist()
    for rt, rs in zip(rows_t, rows_s, strict=True):
        full = t_lp.reshape(-1, v_t)[rt]
        exact.reshape(-1, v_t)[rs] = full
        even = torch.full_like(full, float(tail.reshape(-1)[rt]) - math.log(v_t - k))
        even[top_i.reshape(-1, k)[rt]] = top_v.reshape(-1, k)[rt]
        spread.reshape(-1, v_t)[rs] = even
    assert float(loss_of(exact)) == pytest.approx(float(loss_of(spread)), rel=1e-9)
    assert float(loss_of(exact)) < float(loss_of(base))

    # Every student id mapped into the top-k: still finite, gradients too.
    logits = base.clone().requires_grad_(True)
    logprob, _ = student_path(logits, ids, None)
    loss = mined_loss(logits, logprob, targets, top_i, top_v, tail, torch.zeros(v_t, dtype=torch.long),
                      teacher_vocab_size=v_t, normalizer=1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------
# MinED map
# ---------------------------------------------------------------------------------------


def _levenshtein(a: bytes, b: bytes) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def ref_mined_map(teacher: list[bytes], student: list[bytes]) -> list[int]:
    out = []
    for s in student:
        cands = [(_levenshtein(s, t), tid) for tid, t in enumerate(teacher) if t]
        out.append(min(cands)[1] if s and cands else -1)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_mined_map_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    alphabet = b"ab c"

    def vocab(n):
        return [bytes(rng.choice(list(alphabet), int(rng.integers(1, 7)))) for _ in range(n)] + [
            b""
        ]

    teacher, student = vocab(60), vocab(80)
    teacher[5] = teacher[9]  # duplicate view: the smaller id wins
    assert build_mined_map(teacher, student).tolist() == ref_mined_map(teacher, student)


def test_mined_map_real_tokenizers_and_cache(tok_a, tok_b, tmp_path):
    def views(tok):
        inv = {v: k for k, v in tok.get_vocab().items()}
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        dec = {c: b for b, c in bytes_to_unicode().items()}
        return [
            b"" if inv[i].startswith("<|") else bytes(dec[c] for c in inv[i])
            for i in range(len(inv))
        ]

    teacher, student = views(tok_b), views(tok_a)
    got = build_mined_map(teacher, student, cache_path=tmp_path)
    sample = list(range(0, len(student), 7))
    want = ref_mined_map(teacher, [student[i] for i in sample])
    assert got[sample].tolist() == want
    files = list(tmp_path.glob("mined_*.npy"))
    assert len(files) == 1
    np.save(files[0].with_suffix(".tmp.npy"), got)  # unrelated file is ignored
    sentinel = got.copy()
    sentinel[0] = 12345
    np.save(files[0], sentinel)
    assert (
        build_mined_map(teacher, student, cache_path=tmp_path)[0] == 12345
    )  # served from the cache


# ---------------------------------------------------------------------------------------
# GradMag
# ---------------------------------------------------------------------------------------


def test_gradmag_weights_equal_manual_computation(tiny_lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    params = last_block_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.model.layers[-1].parameters()}
    ids = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(0))
    logprob, sigma = student_path(model(ids).logits, ids, torch.arange(400) % 5 == 0)
    losses = {
        "sft": sft_loss(logprob, torch.ones_like(ids, dtype=torch.bool)),
        "sigma": -sigma.mean() * 3.0,
    }
    weights = gradmag_weights(losses, params)
    manual = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        manual[name] = 1.0 / (torch.sqrt(sum((g**2).sum() for g in grads)) + 1e-8)
    total = sum(manual.values())
    for name in losses:
        assert weights[name].item() == pytest.approx((manual[name] / total).item(), rel=1e-5)
        assert not weights[name].requires_grad
    assert sum(w.item() for w in weights.values()) == pytest.approx(1.0)
    combine_losses(losses, weights).backward()
    # A loss without any gradient on the block takes no weight instead of swamping W.
    zero = {"sft": losses["sft"].detach() * 0, "other": model(ids).logits.mean()}
    w0 = gradmag_weights(zero, params)
    assert w0["sft"].item() == 0.0 and w0["other"].item() == pytest.approx(1.0)


def test_last_block_parameters_gpt2_and_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    )
    params = last_block_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.transformer.h[2].parameters()}
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    lp = last_block_parameters(lora)
    assert lp and all(p.requires_grad for p in lp)
    assert all(
        "lora" in n
        for n, p in lora.named_parameters()
        if p.requires_grad and any(p is q for q in lp)
    )
    with pytest.raises(ConfigError, match="no trainable"):
        last_block_parameters(
            GPT2LMHeadModel(
                GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)
            ).requires_grad_(False)
        )
    with pytest.raises(ConfigError, match="transformer blocks"):
        last_block_parameters(torch.nn.Linear(2, 2))


def test_precomputed_chunks_and_bad_mined_vocab():
    targets, ls, ss, _ = random_batch(77)
    a, _ = alm_loss(ls, ss, targets)
    b, _ = alm_loss(ls, ss, targets, chunks=alm_chunks(targets))
    assert a.item() == b.item()
    logits = torch.randn(*targets.student_chunk.shape, 5)
    topk = torch.zeros(*targets.teacher_chunk.shape, 4, dtype=torch.long)
    with pytest.raises(DataError, match="teacher_vocab_size"):
        mined_loss(
            logits,
            ls,
            targets,
            topk,
            topk.float(),
            topk[..., 0].float(),
            torch.arange(5),
            teacher_vocab_size=0,
        )
