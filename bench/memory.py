"""Peak memory of the output layer + ALM/SFT terms: materialised logits vs the fused path.

One training step of what sits on top of the student's decoder: its final hidden states
(B × S × H, H = 576 as SmolLM2-135M) through a synthetic output layer of vocabulary V
into ℓ^S and σ^S, the ALM and SFT losses on a random chunk structure, and the backward
pass to the hidden states (and to the output weight when it trains):

* ``materialised``: ``logits = F.linear(hidden, W)`` as a Hugging Face ``lm_head`` builds
  them, then :func:`xtd.losses.student_path` (already slab-wise, with no (B, S, V)
  autograd buffers of its own);
* ``fused``: :func:`xtd.losses.fused_student_path` from the hidden states, never holding
  (B, S, V);
* ``hf_sft``: what a bare Hugging Face SFT step puts on top of the decoder: the logits of its
  ``lm_head`` and ``F.cross_entropy`` on the next tokens (SFT only, no ALM), the baseline
  the issue compares the fused step with at V = 128k.

V is 49,152 (SmolLM2), 128,256 (Llama 3) and 256,000 (Gemma 2). The output weight is
frozen (as under LoRA, the paper's recipe) or trains (full fine-tuning; its gradient,
V × H floats, then necessarily grows with V). Each configuration runs in a fresh
process; the peak is the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the step) minus the resident set before it, so the
weight, the hidden states and the inputs, which exist before the step, are not counted.
Targets: the fused step's peak at 256k ≤ 1.1× its peak at 49k (frozen weight), and below the
bare HF SFT head's at 128k. Run:
``python bench/memory.py [--quick]``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import main, result, target  # noqa: E402

HIDDEN = 576
VOCABS = (49_152, 128_256, 256_000)
QUICK_VOCABS = (8_192, 16_384, 32_768)
QUICK_CHUNK_ELEMENTS = 1 << 20  # quick rows fill several slabs only with smaller slabs


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1))  # type: ignore[union-attr]


def _targets(bsz: int, seq: int, seed: int) -> Any:
    """ALM targets with chunks of 1–3 tokens on each side (teacher rows = student rows)."""
    import torch

    from xtd.losses import ALMTargets

    gen = torch.Generator().manual_seed(seed)

    def chunk_ids() -> torch.Tensor:  # (B, S) chunk c repeated over its 1–3 tokens
        rows = [torch.repeat_interleave(torch.arange(seq), torch.randint(1, 4, (seq,), generator=gen))[:seq]
                for _ in range(bsz)]
        return torch.stack(rows)

    student = chunk_ids()
    teacher = chunk_ids()
    return ALMTargets(
        teacher_logprob=-torch.rand(bsz, seq, generator=gen) * 3,
        teacher_sigma=-torch.rand(bsz, seq, generator=gen) * 2,
        teacher_chunk=teacher,
        teacher_scored=torch.ones(bsz, seq, dtype=torch.bool),
        student_chunk=student,
        student_scored=torch.ones(bsz, seq, dtype=torch.bool),
    )


def one(vocab: int, path: str, trainable: bool, bsz: int, seq: int, chunk: int) -> dict[str, Any]:
    """One configuration in this process: the step's peak resident memory above its start."""
    import gc

    import torch
    import torch.nn.functional as F

    from xtd.losses import OutputLayer, alm_loss, fused_student_path, sft_loss, student_path

    torch.manual_seed(0)
    weight = (torch.randn(vocab, HIDDEN) * 0.02).requires_grad_(trainable)
    hidden = torch.randn(bsz, seq, HIDDEN, requires_grad=True)
    ids = torch.randint(0, vocab, (bsz, seq))
    boundary = torch.rand(vocab) < 0.3
    targets = _targets(bsz, seq, seed=1)
    gc.collect()
    before_kb = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    start = time.perf_counter()
    if path == "hf_sft":  # a bare HF causal-LM loss: logits, then cross-entropy on the next token
        logits = F.linear(hidden, weight)  # (B, S, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    else:
        if path == "fused":
            layer = OutputLayer(weight=weight, vocab_size=vocab)
            logprob, sigma = fused_student_path(hidden, layer, ids, boundary, chunk_elements=chunk)
        else:
            logits = F.linear(hidden, weight)  # (B, S, V), as an lm_head builds them
            logprob, sigma = student_path(logits, ids, boundary)
        alm, _ = alm_loss(logprob, sigma, targets)
        loss = alm + sft_loss(logprob, targets.student_scored)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM")
    return {
        "vocab": vocab,
        "path": path,
        "trainable": trainable,
        "peak_mb": (peak_kb - before_kb) / 1024,
        "seconds": seconds,
        "loss": float(loss.detach()),
        "weight_grad_mb": vocab * HIDDEN * 4 / 2**20 if trainable else 0.0,
    }


def _spawn(vocab: int, path: str, trainable: bool, bsz: int, seq: int, chunk: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", json.dumps([vocab, path, trainable, bsz, seq, chunk])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict[str, Any]:
    from xtd.losses import FUSED_CHUNK_ELEMENTS

    vocabs = QUICK_VOCABS if quick else VOCABS
    bsz, seq = 2, 256
    chunk = QUICK_CHUNK_ELEMENTS if quick else FUSED_CHUNK_ELEMENTS
    rows = [
        _spawn(v, path, trainable, bsz, seq, chunk)
        for trainable in (False, True)
        for v in vocabs
        for path in ("materialised", "fused", "hf_sft")
    ]
    peak = {(r["vocab"], r["path"], r["trainable"]): r["peak_mb"] for r in rows}
    for v in vocabs:  # the two paths compute the same loss
        for trainable in (False, True):
            a, b = (next(r["loss"] for r in rows if (r["vocab"], r["path"], r["trainable"]) == (v, p, trainable))
                    for p in ("materialised", "fused"))
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (v, trainable, a, b)
    lo, hi = vocabs[0], vocabs[-1]
    metrics: dict[str, Any] = {"rows": bsz * seq, "hidden": HIDDEN, "fused_chunk_elements": chunk}
    for r in rows:
        name = f"{r['path']}.{'trained' if r['trainable'] else 'frozen'}_weight.v{r['vocab']}"
        metrics[f"{name}.peak_mb"] = r["peak_mb"]
        metrics[f"{name}.step_s"] = r["seconds"]
    for trainable, label in ((False, "frozen"), (True, "trained")):
        for p in ("materialised", "fused"):
            metrics[f"{p}.{label}_weight.peak_ratio_v{hi}_over_v{lo}"] = peak[(hi, p, trainable)] / peak[(lo, p, trainable)]
        for v in vocabs:
            metrics[f"fused_over_materialised.{label}_weight.v{v}"] = peak[(v, "fused", trainable)] / peak[
                (v, "materialised", trainable)
            ]
            metrics[f"fused_over_hf_sft.{label}_weight.v{v}"] = peak[(v, "fused", trainable)] / peak[
                (v, "hf_sft", trainable)
            ]
    mid = vocabs[1]
    return result(
        "memory",
        setup=(
            f"{bsz} × {seq} rows of hidden size {HIDDEN} through a synthetic output layer, ALM + SFT (hf_sft: "
            f"logits + cross-entropy as a bare HF step), one "
            f"forward + backward per fresh process; peak resident memory above the step's start (VmHWM); "
            f"vocabularies {', '.join(f'{v:,}' for v in vocabs)}; fused slabs of {chunk:,} logits"
        ),
        metrics=metrics,
        targets={
            f"fused peak memory, V {hi:,} ÷ V {lo:,} (frozen weight)": target(
                peak[(hi, "fused", False)] / peak[(lo, "fused", False)], "<=", 1.1, unit="x"
            ),
            f"fused ÷ materialised peak memory at V {hi:,} (frozen weight)": target(
                peak[(hi, "fused", False)] / peak[(hi, "materialised", False)], "<=", 1.0, unit="x"
            ),
            f"fused ALM+SFT ÷ bare HF SFT head peak memory at V {mid:,} (frozen weight)": target(
                peak[(mid, "fused", False)] / peak[(mid, "hf_sft", False)], "<", 1.0, unit="x"
            ),
        },
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(*json.loads(sys.argv[2]))))
    else:
        main(run)
