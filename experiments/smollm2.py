"""Setting B: a real pretrained teacher. SmolLM2-135M-Instruct, moved by FVT to the GPT-2
tokenizer, LoRA r = α = 64 as in the paper, distilled on King James Bible passages.

Usage::

    python experiments/smollm2.py --out results          # make experiment-smollm2 (≤ 60 min on 2 cores)

SmolLM2 was pretrained on trillions of tokens, so unlike setting A's tiny teacher it
knows far more than the distillation data — the paper's situation. Evaluation sets
(bits per byte, windows of at most the training length): ``validation`` and
``in_domain`` (held-out KJV chapters), ``retention`` (Shakespeare), ``modern`` (prose
of the Python Language Reference that ships with CPython) and ``teacher_samples``
(seeded SmolLM2 samples). Methods: SFT, ALM, ALM+SFT, with the protocol of
``experiments/protocol.py``.

A byte target does not fit this CPU budget: the script measures the cost of a few
byte-student steps (the paper's byte recipe: ALM+SFT+hidden-state loss, untied
embeddings, full fine-tuning) and records it; ``experiments/gpu_recipe.py`` runs bytes.
"""

from __future__ import annotations

import os

# Before numpy and torch start their thread pools: on a shared machine, spinning OpenMP
# workers that wait for a descheduled sibling made small ops 20× slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from corpus import chapter_split, cut_passages, kjv_chapters, shakespeare_plays, spread  # noqa: E402
from diagnostics import alm_diagnostics  # noqa: E402
from protocol import (  # noqa: E402
    Method,
    Protocol,
    Target,
    machine_state,
    run_method,
    save_setting,
    score_folder,
    summarise_runs,
)

from xtd.assets import embedded_teacher_dir, python_reference_paragraphs  # noqa: E402
from xtd.config import PrecomputeConfig, TrainConfig  # noqa: E402
from xtd.console import console, setup_logging  # noqa: E402
from xtd.precompute import precompute  # noqa: E402
from xtd.sampling import sample_texts, write_samples  # noqa: E402
from xtd.train import train  # noqa: E402

METHODS = (
    Method("SFT", {"losses": "sft"}),
    Method("ALM", {"losses": "alm"}),
    Method("ALM+SFT", {"losses": "alm+sft"}),
)


@dataclasses.dataclass(frozen=True)
class SizeB:
    """Every knob of setting B."""

    passage_bytes: int
    distill_passages: int
    eval_passages: int
    sample_tokens: int
    epochs: int
    batch_size: int
    max_length: int  # student (GPT-2) tokens per text and scoring window; the teacher's window too
    lora_rank: int
    lrs: tuple[float, ...]
    seeds: int
    byte_probe_steps: int  # byte-student steps whose cost is measured (0: skip)
    byte_length: int


DEFAULT = SizeB(
    passage_bytes=200, distill_passages=64, eval_passages=16, sample_tokens=64, epochs=3, batch_size=8,
    max_length=128, lora_rank=64, lrs=(2e-4, 1e-3), seeds=2, byte_probe_steps=3, byte_length=512,
)


def build_sets(size: SizeB) -> dict[str, list[str]]:
    """The distillation slice and the held-out sets (the teacher samples are added later)."""
    split = chapter_split([text for _, text in kjv_chapters()], size.passage_bytes)
    shakespeare = [p for text in shakespeare_plays().values() for p in cut_passages(text, size.passage_bytes)]
    return {
        "distill": spread(split["pool"], size.distill_passages),
        "validation": spread(split["validation"], size.eval_passages),
        "in_domain": spread(split["in_domain"], size.eval_passages),
        "retention": spread(shakespeare, size.eval_passages),
        "modern": spread(python_reference_paragraphs(), size.eval_passages),
    }


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def byte_probe(store: Path, size: SizeB, work: Path) -> dict:
    """Seconds per step of the paper's byte recipe on this slice (a few steps, seed 0)."""
    out = work / "byte-probe"
    started = time.perf_counter()
    result = train(TrainConfig(
        store=(str(store),), tokenizer="bytes", out=str(out), losses="alm+sft+latents", lora_rank=0, untie=True,
        lr=1e-4, max_steps=size.byte_probe_steps, warmup_steps=1, batch_size=size.batch_size,
        max_student_length=size.byte_length, checkpoint_every=0, keep_checkpoints=0, overwrite=True,
    ))
    seconds = time.perf_counter() - started
    steps = result.history[1:] or result.history  # the first step also warms up
    shutil.rmtree(out, ignore_errors=True)
    per_step = sum(r["step_time_s"] for r in steps) / len(steps)
    tokens = sum(r["tokens"] for r in steps) / len(steps)
    return {
        "losses": "alm+sft+latents", "untie": True, "lora_rank": 0, "steps": size.byte_probe_steps,
        "seconds_per_step": round(per_step, 1), "byte_tokens_per_step": round(tokens),
        "tokens_per_s": round(tokens / per_step, 1), "seconds_total": round(seconds, 1),
    }


def run(size: SizeB, out: Path) -> dict:
    """Run setting B into ``out``; returns its results (also saved in ``experiment.json``)."""
    work = out / "experiment-work" / "B"
    work.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), machine_state()
    data = build_sets(size)
    teacher = str(embedded_teacher_dir())
    from xtd.student import load_causal_lm, model_tokenizer

    samples = sample_texts(load_causal_lm(teacher), model_tokenizer(teacher), num_samples=size.eval_passages,
                           max_new_tokens=size.sample_tokens, seed=0)
    write_samples(samples, work / "teacher-samples.jsonl")
    sets = {k: data[k] for k in ("validation", "in_domain", "retention", "modern")} | {
        "teacher_samples": [s["text"] for s in samples]
    }
    store, held_store = work / "teacher.zarr", work / "teacher-in-domain.zarr"
    precompute(PrecomputeConfig(out=str(store), teacher=teacher, data=str(_jsonl(work / "distill.jsonl", data["distill"])),
                                top_k=0, hidden=size.byte_probe_steps > 0, overwrite=True))
    precompute(PrecomputeConfig(out=str(held_store), teacher=teacher, top_k=0, overwrite=True,
                                data=str(_jsonl(work / "in-domain.jsonl", data["in_domain"]))))
    teacher_scores = score_folder(teacher, sets, size.max_length)
    console.print("[bold]teacher[/] bits/byte: " + ", ".join(f"{k} {v:.4f}" for k, v in teacher_scores.items()))

    steps_per_epoch = -(-len(data["distill"]) // size.batch_size)
    target = Target("gpt2", "embedded:gpt2", size.max_length, size.batch_size, size.epochs * steps_per_epoch,
                    steps_per_epoch, {"lora_rank": size.lora_rank})
    protocol = Protocol(lrs=size.lrs, seeds=size.seeds, validation="validation")
    fvt_dir = work / "fvt-gpt2"
    train(TrainConfig(store=(str(store),), student=teacher, tokenizer=target.tokenizer, out=str(fvt_dir),
                      max_steps=0, overwrite=True, **target.settings))
    fvt = score_folder(fvt_dir, sets, target.max_length)
    console.print("[bold]gpt2[/] FVT initialisation: " + ", ".join(f"{k} {v:.4f}" for k, v in fvt.items()))
    entry: dict = {
        "tokenizer": "GPT-2 (embedded:gpt2)", "steps": target.steps, "batch_size": target.batch_size,
        "max_length": target.max_length, "eval_every": target.eval_every, "settings": target.settings, "fvt": fvt,
        "fvt_diagnostics": alm_diagnostics(fvt_dir, held_store, max_length=target.max_length), "methods": {},
    }
    shutil.rmtree(fvt_dir, ignore_errors=True)
    setting: dict = {
        "description": "SmolLM2-135M-Instruct moved by FVT to the GPT-2 tokenizer, LoRA r = α = "
                       f"{size.lora_rank}, distilled on KJV passages",
        "command": "make experiment-smollm2",
        "size": dataclasses.asdict(size),
        "data": {name: {"texts": len(texts), "bytes": sum(len(t.encode()) for t in texts)}
                 for name, texts in {**sets, "distill": data["distill"]}.items()},
        "teacher": {"name": "SmolLM2-135M-Instruct (embedded:smollm2)", "bits_per_byte": teacher_scores},
        "protocol": dataclasses.asdict(protocol),
        "targets": {"gpt2": entry},
    }
    for method in METHODS:
        result = run_method(str(store), teacher, target, method, sets, work / "runs", protocol, log=console.print)
        result["summary"] = summarise_runs(result, fvt, teacher_scores)
        model_dir = result.pop("model_dir")
        result["diagnostics"] = alm_diagnostics(model_dir, held_store, max_length=target.max_length)
        shutil.rmtree(model_dir, ignore_errors=True)  # 0.5 GB per model
        entry["methods"][method.name] = result
        setting["minutes"] = round((time.perf_counter() - started) / 60, 1)
        save_setting(out / "experiment.json", "B", setting)
    if size.byte_probe_steps:
        setting["byte_probe"] = byte_probe(store, size, work)
        console.print(f"[bold]byte target[/]: {setting['byte_probe']}")
    setting["minutes"] = round((time.perf_counter() - started) / 60, 1)
    setting["machine"] = {"before": load_before, "after": machine_state()}
    save_setting(out / "experiment.json", "B", setting)
    return setting


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder of experiment.json/.md and the plots")
    args = parser.parse_args()
    setup_logging(-1)
    logging.getLogger("xtd").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    run(DEFAULT, out)
    report.write_all(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
