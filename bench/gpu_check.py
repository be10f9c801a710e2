"""One-shot GPU check (``make gpu-check``): the CUDA paths of precompute, training and eval.

Without CUDA it says so and exits 0. With CUDA (at most a few minutes on one GPU), on the
embedded SmolLM2-135M-Instruct and the first KJV verses:

1. ``xtd precompute`` in bf16 on the GPU; its teacher log-probs are compared with an
   fp32 CPU precompute of the same texts;
2. a few ``xtd train`` steps (ALM+SFT, bf16 autocast with fp32 losses, the fused output
   layer, packed rows) of SmolLM2 moved to the GPT-2 tokenizer;
3. ``xtd eval`` (bits per byte) of the trained student on held-out text;
4. the loss terms of one micro-batch on CUDA (fp32, and bf16 autocast) against the CPU's
   fp32 terms, within tolerances.

It prints one JSON object: tokens/s, step time, peak GPU memory, the differences and
``ok``; the exit code is 1 when a comparison is out of tolerance. The comparison
(:func:`compare_terms`) also runs on CPU (bf16 autocast against fp32), which is how the
test suite exercises it.

Usage: ``python bench/gpu_check.py [--out DIR] [--steps N] [--verses N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FP32_RTOL = 1e-3
"""CUDA fp32 vs CPU fp32 loss terms (TF32 off; reductions run in another order)."""
AMP_RTOL = 5e-2
"""bf16 autocast body vs fp32: 8 bits of mantissa in every matmul of the decoder."""
TEACHER_LOGPROB_ATOL = 0.15
"""Mean |Δ| in nats of the teacher's realised log-probs, bf16 GPU vs fp32 CPU precompute."""


def compare_terms(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    boundary_mask: torch.Tensor,
    *,
    names: tuple[str, ...] = ("alm", "sft"),
    runs: tuple[tuple[str, torch.dtype | None], ...],
) -> dict[str, dict[str, float]]:
    """Loss terms of one micro-batch on each ``(device, autocast dtype)`` (fused, packed).

    The first run is the reference; each other run reports ``rel_diff_<loss>``. The model
    is moved to each device in turn (and back to the first).

    Returns:
        ``{"<device>/<dtype>": {"<loss>": value, "rel_diff_<loss>": ...}}``.
    """
    from xtd.config import ALMSettings
    from xtd.losses.registry import count_normalizers, loss_specs
    from xtd.model_parts import output_layer
    from xtd.objective import Objective, student_hidden_states

    specs = loss_specs(names)
    alm = ALMSettings()
    counts = count_normalizers(batch, specs, alm)
    normalizers = {n: float(max(c, 1)) for n, c in counts.items()}
    out: dict[str, dict[str, float]] = {}
    reference: dict[str, float] | None = None
    was_training = model.training
    model.eval()  # no dropout: the runs must see the same function
    for device, dtype in runs:
        model.to(device)
        on = {k: v.to(device) for k, v in batch.items()}
        objective = Objective(
            losses=specs, alm=alm, weights=dict.fromkeys(names, 1.0), boundary_mask=boundary_mask.to(device),
            fused=True, packed=True,
        )  # fmt: skip
        with torch.no_grad():
            hidden = student_hidden_states(model, on, autocast_dtype=dtype, packed=True)
            outputs = objective.hidden_outputs(hidden, output_layer(model, vocab_size=objective.vocab_size), on)
            terms, _ = objective.terms(outputs, on, normalizers)
        values = {n: float(t) for n, t in terms.items()}
        if reference is None:
            reference = values
        else:
            values.update({f"rel_diff_{n}": abs(values[n] - reference[n]) / max(abs(reference[n]), 1e-12) for n in names})
        out[f"{device}/{str(dtype).replace('torch.', '') if dtype else 'fp32'}"] = values
    model.to(runs[0][0])
    model.train(was_training)
    return out


def within(result: dict[str, dict[str, float]], rtol: float, key: str) -> bool:
    """Whether every ``rel_diff_*`` of run ``key`` is at most ``rtol``."""
    return all(v <= rtol for k, v in result[key].items() if k.startswith("rel_diff_"))


def _kjv(tmp: Path, verses: int) -> Path:
    from xtd.assets import kjv_path

    path = tmp / "kjv.jsonl"
    with kjv_path().open(encoding="utf-8") as src:
        path.write_text("".join(line for _, line in zip(range(verses), src, strict=False)), encoding="utf-8")
    return path


def run(out: Path, *, steps: int, verses: int, device: str = "cuda") -> dict[str, Any]:
    """Every check on ``device`` (module docstring; ``cpu`` only to smoke-test this script):
    the JSON-ready report."""
    from xtd.config import EvalConfig, PrecomputeConfig, TrainConfig
    from xtd.evaluate import evaluate
    from xtd.examples import build_example, pad_examples
    from xtd.precompute import precompute
    from xtd.storage import open_store
    from xtd.student import load_student
    from xtd.tokenization import load_tokenizer

    cuda = device.startswith("cuda")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else device}
    data = _kjv(out, verses)
    t0 = time.perf_counter()
    gpu = precompute(PrecomputeConfig(out=str(out / "gpu.zarr"), data=str(data), dtype="bf16", device=device, top_k=0))
    report["precompute_bf16_tokens_per_s"] = gpu.tokens_per_s
    report["precompute_s"] = time.perf_counter() - t0
    small = out / "small.jsonl"
    small.write_text("".join(data.read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8")
    precompute(PrecomputeConfig(out=str(out / "cpu.zarr"), data=str(small), dtype="fp32", device="cpu", top_k=0))
    g, c = open_store(str(out / "gpu.zarr")), open_store(str(out / "cpu.zarr"))
    diffs = [float(np.nanmean(np.abs(g[d].token_logprob - c[d].token_logprob))) for d in range(len(c))]
    report["teacher_logprob_mean_abs_diff"] = sum(diffs) / len(diffs)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(
        TrainConfig(
            store=(str(out / "gpu.zarr"),), tokenizer="embedded:gpt2", out=str(out / "student"), losses="alm+sft",
            max_steps=steps, lora_rank=0, checkpoint_every=0, overwrite=True, device=device, amp=True,
            batch_size=16, lr=1e-4, warmup_steps=1,
        )
    )  # fmt: skip
    later = result.history[1:] or result.history
    report["train_step_s"] = sum(r["step_time_s"] for r in later) / len(later)
    report["train_tokens_per_s"] = sum(r["tokens"] for r in later) / sum(r["step_time_s"] for r in later)
    report["train_padding_share"] = sum(r["padding_share"] for r in later) / len(later)
    report["train_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else math.nan
    report["train_last_loss"] = result.losses.get("loss", math.nan)

    rows = evaluate(EvalConfig(model=(str(out / "student"),), held_out=2, device=device, dtype="bf16"))
    report["eval_bits_per_byte"] = rows[0].likelihood.bits_per_byte if rows[0].likelihood else math.nan

    tok = load_tokenizer("embedded:gpt2")
    student = load_student(str(out / "student"), lora_rank=0)
    docs = [c[d] for d in range(4)]
    batch = pad_examples(
        [build_example(d, tok, columns=[0, 1, 2, 3], max_student_length=64, max_teacher_length=None) for d in docs],
        pad_id=tok.pad_id or 0,
    )
    mask = torch.as_tensor(tok.boundary_mask(), dtype=torch.bool)
    torch.backends.cuda.matmul.allow_tf32 = False
    compared = compare_terms(
        student.model.float(), batch, mask, runs=(("cpu", None), (device, None), (device, torch.bfloat16))
    )
    report["terms"] = compared
    report["ok"] = bool(
        within(compared, FP32_RTOL, f"{device}/fp32")
        and within(compared, AMP_RTOL, f"{device}/bfloat16")
        and report["teacher_logprob_mean_abs_diff"] <= TEACHER_LOGPROB_ATOL
        and math.isfinite(report["eval_bits_per_byte"])
    )
    return report


def train(config: Any) -> Any:
    from xtd.train import train as xtd_train

    return xtd_train(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=6, help="training steps")
    parser.add_argument("--verses", type=int, default=400, help="KJV verses to precompute")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "ok": True, "message": "no CUDA device: nothing to check (exit 0)"}))
        return 0
    with tempfile.TemporaryDirectory(prefix="xtd-gpu-check-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report = run(out, steps=args.steps, verses=args.verses)
    print(json.dumps({"cuda": True, **report}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
