"""Cost of the ALM loss next to the student's own forward and backward pass.

Measures, on the same batch, (a) the student model's forward + backward with a plain
next-token cross-entropy and (b) the forward + backward of the ALM loss path alone
(``student_path`` over the logits + ``alm_loss`` with merging and debiasing, on the
detached logits), for a tiny Llama and a 135M-parameter Llama (SmolLM2-135M's shape:
hidden 576, 30 layers, vocab 49,152; random init). Target: (b) / (a) ≤ 5%.
The alignment is synthetic (1–3 teacher and 1–2 student tokens per chunk), which has
the shape and density of real subword↔subword chunking.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench._common import main, result, target
from xtd.losses import ALMTargets, alm_chunks, alm_loss, sft_loss, student_path


def _synthetic_targets(bsz: int, slen: int, seed: int) -> ALMTargets:
    rng = np.random.default_rng(seed)
    tch, sch = [], []
    for _ in range(bsz):
        t, s, c = [], [], 0
        while len(s) < slen:
            t += [c] * int(rng.integers(1, 4))
            s += [c] * int(rng.integers(1, 3))
            c += 1
        tch.append(t)
        sch.append(s[:slen])
    tlen = max(len(r) for r in tch)
    tc = torch.tensor([r + [-1] * (tlen - len(r)) for r in tch])
    sc = torch.tensor(sch)
    # Cut the teacher where the student ends, as the aligner does (docs/method.md, "Chunks").
    for b in range(bsz):
        last = int(sc[b].max())
        tc[b][tc[b] > last] = -1
        sc[b][sc[b] == last] = -1  # the straddling chunk gets no id
        tc[b][tc[b] == last] = -1
    return ALMTargets(
        teacher_logprob=-torch.from_numpy(rng.exponential(1.5, (bsz, tlen))).float(),
        teacher_sigma=torch.from_numpy(np.log(rng.random((bsz, tlen)))).float(),
        teacher_chunk=tc,
        teacher_scored=torch.ones(bsz, tlen, dtype=torch.bool),
        student_chunk=sc,
        student_scored=torch.ones(bsz, slen, dtype=torch.bool),
    )


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(name: str, config: Any, bsz: int, slen: int, reps: int) -> dict[str, float]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (bsz, slen))
    boundary = (
        torch.rand(vocab) < 0.35
    )  # about the share of a BPE vocabulary that starts with a space
    targets = _synthetic_targets(bsz, slen, seed=1)
    loss_mask = torch.ones(bsz, slen, dtype=torch.bool)

    def model_step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        loss.backward()

    with torch.no_grad():
        base_logits = model(ids).logits.detach()

    def alm_step() -> None:
        logits = base_logits.clone().requires_grad_()
        chunks = alm_chunks(targets)
        logprob, sigma = student_path(logits, ids, boundary)
        loss, _ = alm_loss(logprob, sigma, targets, chunks=chunks)
        (loss + sft_loss(logprob, loss_mask)).backward()

    def ce_step() -> None:  # the cross-entropy the model step already contains, for scale
        logits = base_logits.clone().requires_grad_()
        F.cross_entropy(
            logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1)
        ).backward()

    t_model = _median_time(model_step, reps)
    t_alm = _median_time(alm_step, reps * 2)
    t_ce = _median_time(ce_step, reps * 2)
    params = sum(p.numel() for p in model.parameters())
    return {
        f"{name}_params": float(params),
        f"{name}_model_step_s": t_model,
        f"{name}_alm_sft_loss_s": t_alm,
        f"{name}_ce_loss_s": t_ce,
        f"{name}_alm_over_model": t_alm / t_model,
        f"{name}_groups": float(alm_chunks(targets).num_groups),
    }


def run(quick: bool = False) -> dict[str, Any]:
    from transformers import LlamaConfig

    # One thread: on a shared, oversubscribed CPU the OpenMP pool makes small kernels
    # erratic; both sides of the ratio run under the same setting.
    torch.set_num_threads(1)
    tiny = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    smol = LlamaConfig(  # SmolLM2-135M's architecture
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30 if not quick else 4,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    metrics: dict[str, float] = {}
    metrics.update(_measure("tiny", tiny, bsz=4, slen=64 if quick else 256, reps=3))
    metrics.update(
        _measure(
            "smol135m",
            smol,
            bsz=1 if quick else 2,
            slen=32 if quick else 128,
            reps=1 if quick else 3,
        )
    )
    return result(
        "losses",
        metrics=metrics,
        targets={
            # The tiny model's step is mostly fixed per-op overhead, so its ratio is reported
            # as a metric only; the target is about a real student.
            "alm_over_model_135m": target(metrics["smol135m_alm_over_model"], "<=", 0.05),
        },
        setup=(
            "CPU (1 thread), fp32; ALM (merge + debias, binary_ce) + SFT forward+backward on detached logits vs the "
            "model's forward+backward with cross-entropy; tiny Llama (hidden 32, 2 layers, vocab 512, "
            f"4×{64 if quick else 256}) and a random SmolLM2-135M-shaped Llama "
            f"({'4 layers, ' if quick else ''}{1 if quick else 2}×{32 if quick else 128}); medians"
        ),
    )


if __name__ == "__main__":
    main(run)
