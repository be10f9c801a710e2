"""The full-size Table 1 experiment for one GPU: the paper's Gemma2-2B-IT → Qwen2 tokenizer
and → bytes, distilled on Tulu 3, measured on distillation fidelity.

Usage (on a machine with a CUDA GPU and access to the Hugging Face Hub)::

    python experiments/gpu_recipe.py --out runs/gpu --dry-run   # the commands and the expected wall-clock
    python experiments/gpu_recipe.py --out runs/gpu             # run them, in order (make experiment-gpu)
    python experiments/gpu_recipe.py --out runs/gpu --teacher HuggingFaceTB/SmolLM2-1.7B-Instruct  # a stand-in

Steps, each an ``xtd`` command (printed by ``--dry-run``; a finished step is skipped on a rerun):

1. ``xtd precompute`` runs the teacher once over the first ``--limit`` Tulu 3 records
   (hidden states included: the byte students' hidden-state loss needs them).
2. Evaluation sets: ``in_domain`` (Tulu 3 records after the distillation slice, rendered
   with the teacher's chat template), ``retention`` (WikiText-103 test paragraphs: text
   the teacher knows and the chat data lacks), and ``teacher_samples`` (``xtd eval
   --sample-from``, seeded).
3. ``xtd train`` for each target × method × seed: Qwen2 tokenizer with LoRA r = α = 64
   (the paper's recipe); bytes with the paper's byte recipe (full fine-tuning, untied
   embeddings, the hidden-state loss added to ALM methods, 2048-byte texts). Every run
   logs bits per byte on the three sets every ``--eval-every`` steps.
4. ``xtd eval`` of the teacher, the FVT initialisations and every student on each set.

The expected wall-clock is an estimate, not a measurement: FLOPs (training 4N per token
with LoRA, 6N with full fine-tuning; 2N per token for the teacher pass and evaluation)
divided by the GPU's dense bf16 peak times an assumed utilisation (``--mfu``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xtd.cli._options import config_args  # noqa: E402
from xtd.config import TrainConfig  # noqa: E402

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0}
"""Dense bf16 tensor-core peaks (vendor data sheets)."""
KNOWN_PARAMETERS = {
    "google/gemma-2-2b-it": 2.61e9,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1.71e9,
    "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9,
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49e9,
}
METHODS = {"SFT": "sft", "ALM": "alm", "ALM+SFT": "alm+sft"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of the full-size run."""

    teacher: str = "google/gemma-2-2b-it"
    target_tokenizer: str = "Qwen/Qwen2.5-1.5B-Instruct"  # the Qwen2 tokenizer family
    data: str = "allenai/tulu-3-sft-mixture"
    limit: int = 200_000  # distillation records
    held_out: int = 512  # in-domain evaluation records after the slice
    retention: str = "Salesforce/wikitext:wikitext-103-raw-v1:test"
    retention_texts: int = 512
    num_samples: int = 256
    sample_tokens: int = 512
    steps: int = 5000  # the paper's ablation length (its Table 1 ran 20k)
    batch_size: int = 64
    length: int = 512
    byte_steps: int = 2500
    byte_batch_size: int = 32
    byte_length: int = 2048
    lr: float = 1e-5
    seeds: int = 2
    eval_every: int = 500


def train_args(config: TrainConfig) -> list[str]:
    """``xtd train`` arguments that rebuild ``config`` (every setting that differs from its default)."""
    return ["xtd", "train", *config_args(config)]


def train_configs(recipe: Recipe, out: Path) -> list[TrainConfig]:
    """Every student run: target × method × seed, plus the untrained FVT initialisations."""
    sets = tuple(f"{n}={out / 'eval' / (n + '.jsonl')}" for n in ("in_domain", "retention", "teacher_samples"))
    store = str(out / "teacher.zarr")
    targets = {
        "qwen2": dict(tokenizer=recipe.target_tokenizer, lora_rank=64, max_steps=recipe.steps,
                      batch_size=recipe.batch_size, max_student_length=recipe.length),
        "bytes": dict(tokenizer="bytes", lora_rank=0, untie=True, max_steps=recipe.byte_steps,
                      batch_size=recipe.byte_batch_size, max_student_length=recipe.byte_length),
    }
    configs = []
    for name, target in targets.items():
        configs.append(TrainConfig(store=(store,), student=recipe.teacher, out=str(out / f"fvt-{name}"),
                                   **{**target, "max_steps": 0}))
        for method, losses in METHODS.items():
            if name == "bytes" and "alm" in losses:
                losses += "+latents"
            for seed in range(recipe.seeds):
                configs.append(TrainConfig(
                    store=(store,), student=recipe.teacher, out=str(out / f"{name}-{method.lower()}-s{seed}"),
                    losses=losses, lr=recipe.lr, seed=seed, eval_text=sets, eval_every=recipe.eval_every,
                    checkpoint_every=recipe.eval_every, micro_batch_tokens=16384, **target,
                ))
    return configs


def commands(recipe: Recipe, out: Path) -> list[tuple[str, list[str]]]:
    """The whole recipe as ``(step name, argv)``, in order."""
    steps: list[tuple[str, list[str]]] = [
        ("teacher pass", ["xtd", "precompute", "--teacher", recipe.teacher, "--data", recipe.data, "--split", "train",
                          "--limit", str(recipe.limit), "--top-k", "0", "--hidden", "--dtype", "bf16",
                          "--out", str(out / "teacher.zarr")]),
        ("evaluation texts", [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--write-eval-sets"]),
        ("teacher samples", ["xtd", "eval", "--sample-from", recipe.teacher, "--num-samples", str(recipe.num_samples),
                             "--sample-tokens", str(recipe.sample_tokens), "--sample-seed", "0", "--dtype", "bfloat16",
                             "--samples-out", str(out / "eval" / "teacher_samples.jsonl")]),
    ]
    configs = train_configs(recipe, out)
    steps += [(f"train {Path(c.out).name}", train_args(c)) for c in configs]
    models = [recipe.teacher] + [c.out for c in configs]
    for name in ("in_domain", "retention", "teacher_samples"):
        args = ["xtd", "eval", "--text", str(out / "eval" / f"{name}.jsonl"), "--max-length", str(recipe.length),
                "--stride", str(recipe.length // 2), "--dtype", "bfloat16", "--batch-size", "8", "--json"]
        for model in models:
            args += ["--model", model]
        steps.append((f"evaluate {name}", args))
    return steps


def write_eval_sets(recipe: Recipe, out: Path) -> None:
    """In-domain records after the distillation slice and retention paragraphs, as JSON lines."""
    from transformers import AutoTokenizer

    from xtd.data import DataSource, render_conversation

    folder = out / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(recipe.teacher)
    texts = []
    for record in DataSource(recipe.data, split="train", limit=recipe.limit + recipe.held_out):
        if record.index < recipe.limit:
            continue
        texts.append(record.text if record.text is not None else render_conversation(record.messages, tokenizer).text)
    (folder / "in_domain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    from datasets import load_dataset

    name, config, split = recipe.retention.split(":")
    paragraphs = [r["text"] for r in load_dataset(name, config, split=split) if len(r["text"]) > 200]
    (folder / "retention.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in paragraphs[: recipe.retention_texts])
    )


def estimate(recipe: Recipe, gpu: str, mfu: float, parameters: float | None) -> dict[str, Any]:
    """Expected hours on one GPU per step kind (an estimate: FLOPs ÷ (peak × mfu))."""
    n = parameters or KNOWN_PARAMETERS.get(recipe.teacher)
    if n is None:
        raise SystemExit(f"error: unknown size of {recipe.teacher!r}; pass --parameters (e.g. 2.6e9)")
    rate = PEAK_BF16_TFLOPS[gpu] * 1e12 * mfu
    subword_tokens = recipe.steps * recipe.batch_size * recipe.length
    byte_tokens = recipe.byte_steps * recipe.byte_batch_size * recipe.byte_length
    data_tokens = recipe.limit * 600  # Tulu 3 records average a few hundred tokens; 600 is generous
    evals = recipe.steps // recipe.eval_every
    eval_tokens = 3 * 300 * 400 * evals  # three sets of ≈ 300 × 400 tokens
    hours = {
        "teacher pass (2N per token)": 2 * n * data_tokens / rate / 3600,
        "teacher samples": 2 * n * recipe.num_samples * recipe.sample_tokens * 20 / rate / 3600,  # decode ≈ 20× slower
        "one subword run (LoRA: 4N per token)": (4 * n * subword_tokens + 2 * n * eval_tokens) / rate / 3600,
        "one byte run (full fine-tuning: 6N per token)": (6 * n * byte_tokens + 8 * n * eval_tokens) / rate / 3600,
    }
    runs = len(METHODS) * recipe.seeds
    hours["everything"] = (hours["teacher pass (2N per token)"] + hours["teacher samples"]
                           + runs * (hours["one subword run (LoRA: 4N per token)"]
                                     + hours["one byte run (full fine-tuning: 6N per token)"]))
    return {"gpu": gpu, "mfu": mfu, "parameters": n, "hours": {k: round(v, 2) for k, v in hours.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu", help="folder of the stores, runs and evaluation files")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the estimate; run nothing")
    parser.add_argument("--write-eval-sets", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", default=Recipe.teacher, help="teacher (and student) model")
    parser.add_argument("--target-tokenizer", default=Recipe.target_tokenizer, help="the subword target tokenizer")
    parser.add_argument("--limit", type=int, default=Recipe.limit, help="distillation records")
    parser.add_argument("--seeds", type=int, default=Recipe.seeds)
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16_TFLOPS), default="h100", help="for the estimate")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation, for the estimate")
    parser.add_argument("--parameters", type=float, default=None, help="teacher parameters, if not a known model")
    args = parser.parse_args()
    recipe = Recipe(teacher=args.teacher, target_tokenizer=args.target_tokenizer, limit=args.limit, seeds=args.seeds)
    out = Path(args.out)
    if args.write_eval_sets:
        write_eval_sets(recipe, out)
        return 0
    plan = commands(recipe, out)
    print(json.dumps({"recipe": dataclasses.asdict(recipe), "estimate": estimate(recipe, args.gpu, args.mfu, args.parameters)},
                     indent=1))
    for name, argv in plan:
        print(f"# {name}\n{shlex.join(argv)}")
    if args.dry_run:
        return 0
    return run_plan(plan, {"train": "config.json"})


def run_plan(plan: list[tuple[str, list[str]]], done_files: dict[str, str]) -> int:
    """Run each ``(name, argv)`` in order; a step whose kind (the name's first word) is in
    ``done_files`` is skipped when that file exists in its ``--out`` (finished earlier).

    Returns:
        0, or the exit code of the first step that failed.
    """
    for name, argv in plan:
        done = done_files.get(name.split()[0])
        if done and (Path(argv[argv.index("--out") + 1]) / done).exists():
            continue  # finished earlier
        print(f"== {name}", flush=True)
        result = subprocess.run(argv, check=False)
        if result.returncode:
            print(f"error: step {name!r} failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
