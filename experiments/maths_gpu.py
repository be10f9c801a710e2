"""GPU recipe for the paper-size maths setting: OpenMath2-Llama3.1-8B → Gemma2-2B-IT.

The paper's Table 3 distils a maths-specialised Llama-3.1-8B (Llama-3 tokenizer: digits
in groups of three) into Gemma2-2B-IT (SentencePiece: every digit its own token) on
OpenMathInstruct-2 with full fine-tuning: sequence length 1024, batch 64, 5,000 steps,
lr 5e-6, then zero-shot exact match on GSM8K (paper: teacher 88.9, Gemma2-2B-IT 6.1,
SFT 67.2, MinED 64.9, ALM+SFT 70.2, ALM 68.5). This script runs the same pipeline with
xtd on one machine with ``--gpus`` GPUs (default 8)::

    python experiments/maths_gpu.py --work runs/maths-gpu --dry-run     # print every step, check every config
    python experiments/maths_gpu.py --work runs/maths-gpu               # run all stages (resumable per stage)
    python experiments/maths_gpu.py --work runs/maths-gpu --stage train-ALM+SFT

Stages, each skipped when its output exists:

1. ``data``: the first ``examples`` problems of OpenMathInstruct-2 (``train_1M``) as
   chat records (user: problem, assistant: generated solution, which ends in
   ``\\boxed{answer}``), and GSM8K's 1,319 test problems (answer after ``####``).
2. ``precompute``: ``xtd precompute`` of the teacher over the records, bf16, top-32
   (MinED needs it), one part per GPU with torchrun.
3. ``train-<method>``: ``xtd train`` of Gemma2-2B-IT (its own tokenizer) from the
   store, full fine-tuning, per method: SFT, ALM, ALM+SFT, MinED.
4. ``eval``: greedy exact match on GSM8K (``boxed`` answers, stop after the box):
   the teacher and Gemma2-2B-IT with their own chat templates, the students with
   the store view they were trained on (xtd.maths_eval); writes ``eval.json``.

Needs the hub (or a filled cache) for the models and datasets, and ``accelerate`` is
not needed: xtd runs data parallel with torchrun. MATH (the paper's other column) needs
a LaTeX-equivalence grader and is left out.

Expected cost (not measured here: our development machines have no GPU; computed from
6·N·D training and 2·N·D forward FLOPs at 35% of an H100's 989 bf16 TFLOP/s): see
:func:`cost_estimate` and ``--dry-run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from xtd.cli._options import config_args
from xtd.config import PrecomputeConfig, TrainConfig

TEACHER = "nvidia/OpenMath2-Llama3.1-8B"
STUDENT = "google/gemma-2-2b-it"
TRAIN_DATA = ("nvidia/OpenMathInstruct-2", "train_1M")
GSM8K = ("openai/gsm8k", "main", "test")
METHODS: dict[str, dict[str, Any]] = {
    "SFT": {"losses": "sft"},
    "ALM": {"losses": "alm"},
    "ALM+SFT": {"losses": "alm+sft"},
    "MinED": {"losses": "mined"},
}
H100_BF16_FLOPS = 989e12
MFU = 0.35


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The paper's Table 3 settings (spec'd in its appendix), scaled by nothing."""

    examples: int = 320_000  # 5,000 steps × 64 texts: one pass
    steps: int = 5000
    batch_size: int = 64
    length: int = 1024
    lr: float = 5e-6
    warmup_steps: int = 500
    micro_batch_size: int = 2  # per GPU: Gemma2's 256k-entry logits are large
    top_k: int = 32
    gpus: int = 8
    teacher_params: float = 8.03e9
    student_params: float = 2.61e9
    mean_tokens: int = 500  # an assumption (not measured): tokens per rendered OpenMathInstruct-2 record
    methods: tuple[str, ...] = tuple(METHODS)
    eval_batch: int = 64
    max_new_tokens: int = 512


def precompute_config(recipe: Recipe, work: Path) -> PrecomputeConfig:
    """Stage 2: the teacher over the training records (validated here, run by torchrun)."""
    return PrecomputeConfig(
        out=str(work / "teacher.zarr"), teacher=TEACHER, data=str(work / "train.jsonl"), dtype="bf16",
        top_k=recipe.top_k, max_length=recipe.length, stride=recipe.length // 4, batch_tokens=32768,
    )


def train_config(recipe: Recipe, work: Path, method: str) -> TrainConfig:
    """Stage 3 for one method: full fine-tuning of the student from the store."""
    return TrainConfig(
        store=(str(work / "teacher.zarr"),), student=STUDENT, out=str(work / f"student-{_slug(method)}"),
        lora_rank=0, lr=recipe.lr, max_steps=recipe.steps, warmup_steps=recipe.warmup_steps,
        batch_size=recipe.batch_size, micro_batch_size=recipe.micro_batch_size, max_student_length=recipe.length,
        checkpoint_every=500, seed=0, **METHODS[method],
    )


def _slug(method: str) -> str:
    return method.replace("+", "-").lower()


def commands(recipe: Recipe, work: Path) -> dict[str, list[str]]:
    """The shell command of every stage, in order."""
    launch = ["torchrun", "--standalone", f"--nproc-per-node={recipe.gpus}", "-m", "xtd"]
    pre = precompute_config(recipe, work)
    steps = {
        "data": [sys.executable, __file__, "--work", str(work), "--stage", "data"],
        "precompute": [*launch, "precompute", *config_args(pre)],
    }
    for method in recipe.methods:
        config = train_config(recipe, work, method)
        steps[f"train-{method}"] = [*launch, "train", *config_args(config)]
    steps["eval"] = [sys.executable, __file__, "--work", str(work), "--stage", "eval"]
    return steps


def cost_estimate(recipe: Recipe) -> dict[str, float]:
    """GPU-hours per stage on H100s at :data:`MFU` (FLOPs: 2·N·D forward, 6·N·D training)."""
    tokens = recipe.examples * recipe.mean_tokens
    rate = H100_BF16_FLOPS * MFU
    precompute_h = 2 * recipe.teacher_params * tokens / rate / 3600
    train_h = 6 * recipe.student_params * recipe.steps * recipe.batch_size * recipe.mean_tokens / rate / 3600
    # GradMag adds one gradient through the output layer and last block per loss; ALM's own cost is small.
    return {
        "training_tokens": float(tokens),
        "precompute_gpu_hours": round(precompute_h, 1),
        "train_gpu_hours_per_method": round(train_h, 1),
        "train_gpu_hours_alm_sft_gradmag": round(train_h * 1.15, 1),
        "store_gb_top32": round(tokens * 70 / 1e9, 1),
        "store_gb_alm_only": round(tokens * 10.4 / 1e9, 1),
        "total_gpu_hours": round(precompute_h + train_h * (len(recipe.methods) + 0.15), 1),
    }


# --------------------------------------------------------------------------- python stages


def stage_data(recipe: Recipe, work: Path) -> None:
    """OpenMathInstruct-2 → chat records; GSM8K test → problems (needs the hub or its cache)."""
    import datasets

    from xtd.maths import write_split

    train = datasets.load_dataset(TRAIN_DATA[0], split=f"{TRAIN_DATA[1]}[:{recipe.examples}]")
    write_split(work / "train.jsonl", (
        {"messages": [{"role": "user", "content": r["problem"]},
                      {"role": "assistant", "content": r["generated_solution"]}]}
        for r in train
    ))
    test = datasets.load_dataset(GSM8K[0], GSM8K[1], split=GSM8K[2])
    write_split(work / "gsm8k.jsonl", (
        {"id": f"gsm8k-{i}", "question": r["question"], "solution": r["answer"],
         "answer": r["answer"].rsplit("####", 1)[1].strip().replace(",", "")}
        for i, r in enumerate(test)
    ))


def stage_eval(recipe: Recipe, work: Path) -> dict[str, Any]:
    """Greedy GSM8K exact match of the teacher, the untrained student and every trained student."""
    import torch

    from xtd.maths import Problem
    from xtd.maths_eval import score_problems
    from xtd.student import load_causal_lm
    from xtd.tokenization import load_tokenizer

    lines = [json.loads(line) for line in (work / "gsm8k.jsonl").read_text().splitlines()]
    problems = [Problem(r["id"], "test", "gsm8k", 0, r["question"], r["solution"], r["answer"]) for r in lines]
    chat = load_tokenizer(TEACHER)
    models = [("teacher", TEACHER, "template"), ("student, untrained", STUDENT, "template")]
    models += [(f"student + {m}", str(work / f"student-{_slug(m)}"), "store") for m in recipe.methods]
    results = {}
    for label, spec, prompt in models:
        model = load_causal_lm(spec, dtype=torch.bfloat16).to("cuda")
        score = score_problems(model, load_tokenizer(spec), problems, chat, name=label, prompt=prompt,
                               system=None, answer_format="boxed", max_new_tokens=recipe.max_new_tokens,
                               batch_size=recipe.eval_batch)
        results[label] = score.to_dict()
        print(f"{label}: GSM8K exact match {score.exact_match:.1%}", flush=True)
        del model
    (work / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _done(stage: str, work: Path, recipe: Recipe) -> bool:
    if stage == "data":
        return (work / "gsm8k.jsonl").exists()
    if stage == "precompute":
        return False  # xtd precompute resumes by itself
    if stage.startswith("train-"):
        return (work / f"student-{_slug(stage[6:])}" / "config.json").exists()
    return (work / "eval.json").exists()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/maths-gpu", help="working folder")
    parser.add_argument("--gpus", type=int, default=Recipe.gpus, help="GPUs on this machine")
    parser.add_argument("--stage", default=None, help="run one stage (data, precompute, train-<method>, eval)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the cost estimate; run nothing")
    args = parser.parse_args()
    recipe = Recipe(gpus=args.gpus)
    work = Path(args.work)
    steps = commands(recipe, work)
    if args.dry_run:
        for name, argv in steps.items():
            print(f"# {name}\n{shlex.join(argv)}\n")
        print(json.dumps({"recipe": dataclasses.asdict(recipe), "cost_estimate_h100": cost_estimate(recipe)}, indent=2))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    if args.stage == "data":
        stage_data(recipe, work)
        return 0
    if args.stage == "eval":
        stage_eval(recipe, work)
        return 0
    selected = [args.stage] if args.stage else list(steps)
    unknown = [s for s in selected if s not in steps]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(steps)}")
    for name in selected:
        if _done(name, work, recipe):
            print(f"# {name}: done, skipped", flush=True)
            continue
        print(f"# {name}\n{shlex.join(steps[name])}", flush=True)
        subprocess.run(steps[name], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
