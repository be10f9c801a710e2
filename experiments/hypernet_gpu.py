"""Use case 3 at the paper's size on one GPU: a hypernetwork for a 1–3B base model trained
with ALM and with SFT from one store, then zero-shot transfer to unseen tokenizers.

Usage (on a machine with a CUDA GPU and access to the Hugging Face Hub)::

    python experiments/hypernet_gpu.py --out runs/hn-gpu --dry-run   # the commands and the expected wall-clock
    python experiments/hypernet_gpu.py --out runs/hn-gpu             # run them, in order
    python experiments/hypernet_gpu.py --out runs/hn-gpu --base HuggingFaceTB/SmolLM2-1.7B-Instruct  # another base

Steps, each an ``xtd`` command (printed by ``--dry-run``; a finished step is skipped on a rerun):

1. ``xtd precompute`` runs the base model once over the first ``--limit`` Tulu 3 records
   (no top-k, no hidden states: ALM needs the realised log-probabilities and boundary
   masses only). The store is the hypernetworks' only teacher.
2. Evaluation texts: ``in_domain`` (Tulu 3 records after the slice) and ``retention``
   (WikiText-103 test paragraphs), written by ``experiments/gpu_recipe.py``.
3. ``xtd hypernet train`` for ALM and SFT (the ZeTT baseline) × seeds: same steps, batch,
   learning rate and sampled tokenizers (32k ± 8k, the paper's ZeTT setting).
4. ``xtd hypernet apply`` of every hypernetwork to each unseen tokenizer (GPT-2, Llama-3,
   Mistral v1, Qwen3; xtd's embedded copies), and the FVT baseline (``xtd train
   --max-steps 0``).
5. ``xtd eval``: bits per byte of the base model and every transferred model on both sets.

The expected wall-clock is an estimate, not a measurement: FLOPs divided by the GPU's
dense bf16 peak times an assumed utilisation (``--mfu``). A hypernetwork step runs the
frozen base model forward and backward to its input embeddings (≈ 4N per token: no weight
gradients) plus the hypernetwork (small next to N); the teacher pass and evaluation cost
2N per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_recipe import KNOWN_PARAMETERS, PEAK_BF16_TFLOPS, run_plan  # noqa: E402

from xtd.cli._options import config_args  # noqa: E402
from xtd.config import HypernetTrainConfig  # noqa: E402

TOKENIZERS = ("gpt2", "llama3", "mistral-v1", "qwen3")
METHODS = {"ALM": "alm", "SFT": "sft"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of the full-size run."""

    base: str = "google/gemma-2-2b-it"
    data: str = "allenai/tulu-3-sft-mixture"
    limit: int = 200_000
    steps: int = 20_000
    batch_size: int = 64
    length: int = 512
    lr: float = 6e-5
    seeds: int = 2
    max_vocab: int = 32_768  # tokens predicted per step (the softmax's sample)
    hn_layers: int = 3
    eval_length: int = 512


def hypernet_configs(recipe: Recipe, out: Path) -> list[HypernetTrainConfig]:
    """Every hypernetwork run: method × seed."""
    return [
        HypernetTrainConfig(
            store=(str(out / "base.zarr"),), model=recipe.base, out=str(out / f"hn-{losses}-s{seed}"), losses=losses,
            seed=seed, max_steps=recipe.steps, batch_size=recipe.batch_size, max_student_length=recipe.length,
            lr=recipe.lr, max_vocab=recipe.max_vocab, num_layers=recipe.hn_layers, checkpoint_every=1000,
        )  # fmt: skip
        for losses in METHODS.values()
        for seed in range(recipe.seeds)
    ]


def commands(recipe: Recipe, out: Path) -> list[tuple[str, list[str]]]:
    """The whole recipe as ``(step name, argv)``, in order."""
    here = Path(__file__).resolve().parent
    steps: list[tuple[str, list[str]]] = [
        ("teacher pass", ["xtd", "precompute", "--teacher", recipe.base, "--data", recipe.data, "--split", "train",
                          "--limit", str(recipe.limit), "--top-k", "0", "--dtype", "bf16",
                          "--out", str(out / "base.zarr")]),
        ("evaluation texts", [sys.executable, str(here / "gpu_recipe.py"), "--out", str(out), "--teacher", recipe.base,
                              "--limit", str(recipe.limit), "--write-eval-sets"]),
    ]  # fmt: skip
    configs = hypernet_configs(recipe, out)
    steps += [(f"train {Path(c.out).name}", ["xtd", "hypernet", "train", *config_args(c)]) for c in configs]
    models = [recipe.base]
    for name in TOKENIZERS:
        fvt = out / f"fvt-{name}"
        steps.append((f"fvt {name}", ["xtd", "train", "--store", str(out / "base.zarr"), "--student", recipe.base,
                                      "--tokenizer", f"embedded:{name}", "--max-steps", "0", "--lora-rank", "0",
                                      "--out", str(fvt)]))  # fmt: skip
        models.append(str(fvt))
        for c in configs:
            target = out / f"{Path(c.out).name}-{name}"
            steps.append((f"apply {target.name}", ["xtd", "hypernet", "apply", "--hypernet", c.out, "--tokenizer",
                                                    f"embedded:{name}", "--out", str(target)]))  # fmt: skip
            models.append(str(target))
    for name in ("in_domain", "retention"):
        args = ["xtd", "eval", "--text", str(out / "eval" / f"{name}.jsonl"), "--max-length", str(recipe.eval_length),
                "--stride", str(recipe.eval_length // 2), "--dtype", "bfloat16", "--batch-size", "8", "--json"]  # fmt: skip
        for model in models:
            args += ["--model", model]
        steps.append((f"evaluate {name}", args))
    return steps


def estimate(recipe: Recipe, gpu: str, mfu: float, parameters: float | None) -> dict[str, Any]:
    """Expected hours on one GPU per step kind (an estimate: FLOPs ÷ (peak × mfu))."""
    n = parameters or KNOWN_PARAMETERS.get(recipe.base)
    if n is None:
        raise SystemExit(f"error: unknown size of {recipe.base!r}; pass --parameters (e.g. 2.6e9)")
    rate = PEAK_BF16_TFLOPS[gpu] * 1e12 * mfu
    train_tokens = recipe.steps * recipe.batch_size * recipe.length
    transfers = len(TOKENIZERS) * (1 + len(METHODS) * recipe.seeds)
    hours = {
        "teacher pass (2N per token)": 2 * n * recipe.limit * 600 / rate / 3600,  # ≈ 600 tokens per Tulu 3 record
        "one hypernetwork run (4N per token)": 4 * n * train_tokens / rate / 3600,
        "evaluation (2N per token, 2 sets × ≈ 250k tokens per model)": 2 * n * 500_000 * (1 + transfers) / rate / 3600,
    }
    hours["everything"] = (
        hours["teacher pass (2N per token)"]
        + len(METHODS) * recipe.seeds * hours["one hypernetwork run (4N per token)"]
        + hours["evaluation (2N per token, 2 sets × ≈ 250k tokens per model)"]
    )
    return {"gpu": gpu, "mfu": mfu, "parameters": n, "train_tokens_per_run": train_tokens,
            "hours": {k: round(v, 2) for k, v in hours.items()}}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/hn-gpu", help="folder of the store, runs and evaluation files")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the estimate; run nothing")
    parser.add_argument("--base", default=Recipe.base, help="the base model (frozen)")
    parser.add_argument("--limit", type=int, default=Recipe.limit, help="records in the store")
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seeds", type=int, default=Recipe.seeds)
    parser.add_argument("--gpu", choices=sorted(PEAK_BF16_TFLOPS), default="h100", help="for the estimate")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation, for the estimate")
    parser.add_argument("--parameters", type=float, default=None, help="base model parameters, if not a known model")
    args = parser.parse_args()
    recipe = Recipe(base=args.base, limit=args.limit, steps=args.steps, seeds=args.seeds)
    out = Path(args.out)
    plan = commands(recipe, out)
    print(json.dumps({"recipe": dataclasses.asdict(recipe), "estimate": estimate(recipe, args.gpu, args.mfu, args.parameters)},
                     indent=1))  # fmt: skip
    for name, argv in plan:
        print(f"# {name}\n{shlex.join(argv)}")
    if args.dry_run:
        return 0
    return run_plan(plan, {"train": "hypernet.json", "fvt": "config.json", "apply": "config.json"})


if __name__ == "__main__":
    sys.exit(main())
