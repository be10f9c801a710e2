"""Use case 2 on a CPU: distil a maths-specialised teacher into a small general student
with another tokenizer, and score greedy exact match on held-out word problems.

Usage::

    python experiments/maths.py --out results                 # default size (≤ 60 min on 2 idle cores)
    python experiments/maths.py --out /tmp/m --quick           # ≈ 1-2 min smoke size (runs in CI)

The setting, scaled down from the paper's OpenMath2-Llama3.1-8B → Gemma2-2B
experiment (paper Table 3; README, "Maths: a specialist teacher, a general student"):

1. **Data** (:mod:`xtd.maths`). Generated grade-school word problems with worked
   solutions ending in ``#### <answer>``, as chat records; ``train_problems`` for
   training, ``test_problems`` from the held-out test split (unseen wordings).
2. **Teacher.** SmolLM2-135M-Instruct, fine-tuned by xtd itself (``--losses sft``, full
   fine-tuning) on the training problems: its test exact match is the ceiling. The
   records reach xtd train through a *text store*: ``xtd precompute`` run with a
   one-layer random model that carries SmolLM2's tokenizer and chat template (SFT reads
   only the text and the loss spans, so the cheap reader stands in for a slow teacher
   pass). The quick size trains a small teacher from scratch instead.
3. **Teacher store.** ``xtd precompute`` runs the fine-tuned teacher once over the
   training problems with its chat template and top-32 log-probs (MinED needs them).
4. **Student.** A small Llama with the **GPT-2 tokenizer**, which merges digit strings
   into tokens (" 123", "45") where SmolLM2 writes every digit as its own token. It is
   *general*: pretrained by xtd (SFT) on the embedded Shakespeare + King James corpus,
   never on maths (its text store, like the teacher's, comes from a one-layer reader).
   Untrained on maths it is the lower reference.
5. **Methods.** From that one initialisation, with the same data order, steps and
   texts per step, full fine-tuning, ``seeds`` seeds each: SFT (on the same
   solutions), ALM, ALM+SFT (GradMag) and MinED.
6. **Metrics** (:mod:`xtd.maths_eval`). Greedy exact match on the test problems (final
   answer only, a stop rule after the answer line), and bits per byte of the
   reference test solutions given their prompts. Every model reads the same prompt:
   its BOS, then the question as the store holds chat text (template special tokens
   removed), which is what every model here was trained on. Per-problem outputs go to
   ``<work>/outputs/<model>.jsonl``.

It writes ``maths.json`` (every number), ``maths.md`` (the table) and ``maths.png`` to
``--out``; the tokenizer audit of the pair (``xtd align --report`` over the teacher
store) is part of both. Whatever ordering comes out is reported as measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from xtd.align_report import format_rows, report_store
from xtd.assets import iter_embedded_corpus
from xtd.config import PrecomputeConfig, TrainConfig
from xtd.console import console, setup_logging
from xtd.maths import chat_record, generate, task_record, write_split
from xtd.maths_eval import MathsScore, score_problems
from xtd.precompute import precompute
from xtd.student import load_causal_lm
from xtd.tokenization import ByteTokenizer, load_tokenizer
from xtd.train import train

METHODS: dict[str, dict[str, Any]] = {
    "SFT": {"losses": "sft"},
    "ALM": {"losses": "alm"},
    "ALM+SFT": {"losses": "alm+sft"},
    "MinED": {"losses": "mined"},
}
TEACHER_TOKENIZER = "embedded:smollm2"
STUDENT_TOKENIZER = "embedded:gpt2"


@dataclasses.dataclass(frozen=True)
class Size:
    """Every knob of one experiment size."""

    train_problems: int
    test_problems: int
    teacher: str  # "smollm2": fine-tune the packaged SmolLM2; "scratch": a small Llama from scratch
    teacher_hidden: int  # scratch teacher only
    teacher_layers: int
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    score_untuned_teacher: bool  # also score SmolLM2 before fine-tuning
    student_hidden: int
    student_layers: int
    pretrain_passages: int  # embedded-corpus passages (≈ 400 bytes) for the general student
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    student_steps: int
    student_batch: int
    student_lr: float
    seeds: int
    methods: tuple[str, ...]
    max_new_tokens: int
    eval_batch: int


DEFAULT = Size(
    train_problems=480, test_problems=60, teacher="smollm2", teacher_hidden=0, teacher_layers=0,
    teacher_steps=60, teacher_batch=8, teacher_lr=1e-4, score_untuned_teacher=True,
    student_hidden=128, student_layers=4, pretrain_passages=1600, pretrain_steps=100, pretrain_batch=16,
    pretrain_lr=2e-3, student_steps=80, student_batch=16, student_lr=2e-3, seeds=2, methods=tuple(METHODS),
    max_new_tokens=224, eval_batch=20,
)
QUICK = Size(
    train_problems=48, test_problems=16, teacher="scratch", teacher_hidden=32, teacher_layers=1,
    teacher_steps=6, teacher_batch=8, teacher_lr=3e-3, score_untuned_teacher=False,
    student_hidden=32, student_layers=1, pretrain_passages=64, pretrain_steps=4, pretrain_batch=16,
    pretrain_lr=3e-3, student_steps=4, student_batch=8, student_lr=1e-3, seeds=1, methods=tuple(METHODS),
    max_new_tokens=24, eval_batch=6,
)


def make_llama(tokenizer: ByteTokenizer, folder: Path, *, hidden: int, layers: int, seed: int = 0) -> Path:
    """A randomly initialised Llama with ``tokenizer``, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.hf.save_pretrained(folder)
    return folder


def corpus_passages(count: int, passage_bytes: int = 400) -> list[str]:
    """``count`` passages of the embedded corpus (≈ ``passage_bytes`` each, cut at line ends),
    spread over the whole corpus; its last documents (the held-out tail) are left out."""
    records = list(iter_embedded_corpus())[:-8]
    out: list[str] = []
    for record in records:
        piece = ""
        for line in record["text"].splitlines(keepends=True):
            piece += line
            if len(piece.encode()) >= passage_bytes:
                out.append(piece)
                piece = ""
    stride = max(1, len(out) // count)
    return out[::stride][:count]


class Clock:
    """Wall-clock seconds per phase."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self._last = self.start

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self._last, 1)
        self._last = now
        return self.phases[name]

    @property
    def minutes(self) -> float:
        return round((time.perf_counter() - self.start) / 60, 1)


def evaluate_model(folder: str | Path, label: str, problems: list, chat_tok: ByteTokenizer, size: Size,
                   outputs: Path) -> MathsScore:
    """Exact match and solution bits per byte of the model in ``folder``; outputs → ``outputs/<label>.jsonl``."""
    model = load_causal_lm(folder)
    tokenizer = load_tokenizer(folder)
    score = score_problems(model, tokenizer, problems, chat_tok, name=label, max_new_tokens=size.max_new_tokens,
                           batch_size=size.eval_batch)
    write_split(outputs / f"{label}.jsonl", [o.to_dict() for o in score.outputs])
    del model
    return score


def _summary(score: MathsScore, problems: list, **extra: Any) -> dict[str, Any]:
    """The score's summary, with exact match split by seen and held-out (new) wordings."""
    new = {p.id for p in problems if p.new_wording}
    by = {flag: [o.correct for o in score.outputs if (o.id in new) == flag] for flag in (False, True)}
    return {
        **score.to_dict(),
        "exact_match_seen_wordings": sum(by[False]) / len(by[False]) if by[False] else math.nan,
        "exact_match_new_wordings": sum(by[True]) / len(by[True]) if by[True] else math.nan,
        **extra,
    }


def run(size: Size, work: Path) -> dict[str, Any]:
    """Run the whole experiment in ``work``; returns the results dict."""
    clock = Clock()
    load_start = os.getloadavg()
    work.mkdir(parents=True, exist_ok=True)
    outputs = work / "outputs"
    chat_tok = load_tokenizer(TEACHER_TOKENIZER)
    student_tok = load_tokenizer(STUDENT_TOKENIZER)

    # 0. Data: chat records for training, held-out test problems (+ an `xtd eval --task` file).
    train_problems = generate("train", size.train_problems, seed=0)
    test_problems = generate("test", size.test_problems, seed=0)
    data = write_split(work / "train.jsonl", [chat_record(p) for p in train_problems])
    write_split(work / "test.jsonl", [chat_record(p) for p in test_problems])
    write_split(work / "test-tasks.jsonl", [task_record(p, chat_tok) for p in test_problems])
    console.print(f"[bold]data[/]: {len(train_problems)} training problems, {len(test_problems)} test problems")

    # 1. The teacher, fine-tuned (or trained) by xtd with SFT from a text store.
    reader = make_llama(chat_tok, work / "text-reader", hidden=16, layers=1)
    text_store = work / "text.zarr"
    precompute(PrecomputeConfig(out=str(text_store), teacher=str(reader), data=str(data), top_k=0,
                                max_length=512, stride=128, overwrite=True))
    init = "embedded:smollm2" if size.teacher == "smollm2" else str(
        make_llama(chat_tok, work / "teacher-init", hidden=size.teacher_hidden, layers=size.teacher_layers))
    teacher = work / "teacher"
    teacher_run = train(TrainConfig(
        store=(str(text_store),), student=init, out=str(teacher), losses="sft", gradmag=False, lora_rank=0,
        lr=size.teacher_lr, max_steps=size.teacher_steps, warmup_steps=max(1, size.teacher_steps // 10),
        batch_size=size.teacher_batch, max_student_length=512, checkpoint_every=0, overwrite=True, seed=0,
    ))
    clock.lap("teacher training")
    results: dict[str, Any] = {"size": dataclasses.asdict(size)}
    teacher_score = evaluate_model(teacher, "teacher", test_problems, chat_tok, size, outputs)
    results["teacher"] = _summary(teacher_score, test_problems, train_tokens=teacher_run.tokens,
                                  model="SmolLM2-135M-Instruct fine-tuned" if size.teacher == "smollm2"
                                  else f"Llama hidden {size.teacher_hidden}, {size.teacher_layers} layer(s), from scratch")
    if size.score_untuned_teacher:
        untuned = evaluate_model(init, "teacher-untuned", test_problems, chat_tok, size, outputs)
        results["teacher_untuned"] = _summary(untuned, test_problems, model="SmolLM2-135M-Instruct")
    clock.lap("teacher evaluation")
    console.print(f"[bold]teacher[/]: exact match {teacher_score.exact_match:.1%}, "
                  f"{teacher_score.bits_per_byte:.4f} bits/byte on test solutions")

    # 2. The teacher runs once over the training problems (chat template, top-32 for MinED).
    store = work / "teacher.zarr"
    pre = precompute(PrecomputeConfig(out=str(store), teacher=str(teacher), data=str(data), top_k=32,
                                      max_length=512, stride=128, overwrite=True))
    results["teacher_store"] = {"documents": pre.documents_written, "tokens": pre.tokens, "seconds": round(pre.seconds, 1)}
    clock.lap("teacher precompute")
    audit = report_store(str(store), student_tok, merge_threshold=0.1).to_dict()
    results["align_report"] = audit

    # 3. The general student: GPT-2 tokenizer, pretrained on the embedded corpus only.
    passages = corpus_passages(size.pretrain_passages)
    corpus = write_split(work / "corpus.jsonl", [{"text": t} for t in passages])
    student_init = make_llama(student_tok, work / "student-init", hidden=size.student_hidden,
                              layers=size.student_layers)
    corpus_store = work / "corpus.zarr"
    corpus_reader = make_llama(student_tok, work / "corpus-reader", hidden=16, layers=1)  # a text store only
    precompute(PrecomputeConfig(out=str(corpus_store), teacher=str(corpus_reader), data=str(corpus), top_k=0,
                                max_length=512, stride=128, overwrite=True))
    general = work / "student-general"
    pretrain = train(TrainConfig(
        store=(str(corpus_store),), student=str(student_init), out=str(general), losses="sft", gradmag=False,
        lora_rank=0, lr=size.pretrain_lr, max_steps=size.pretrain_steps, warmup_steps=max(1, size.pretrain_steps // 10),
        batch_size=size.pretrain_batch, max_student_length=256, long_documents="truncate", checkpoint_every=0,
        overwrite=True, seed=0,
    ))
    clock.lap("student pretraining")
    results["student_untrained"] = _summary(
        evaluate_model(general, "student-untrained", test_problems, chat_tok, size, outputs), test_problems,
        pretrain_tokens=pretrain.tokens, passages=len(passages),
    )
    clock.lap("student evaluation")

    # 4. Each method × seed from the same general student and the same teacher store.
    runs = []
    for method in size.methods:
        for seed in range(size.seeds):
            label = f"{method.replace('+', '-').lower()}-{seed}"
            t0 = time.perf_counter()
            result = train(TrainConfig(
                store=(str(store),), student=str(general), out=str(work / f"run-{label}"), lora_rank=0,
                lr=size.student_lr, max_steps=size.student_steps, warmup_steps=max(1, size.student_steps // 10),
                batch_size=size.student_batch, max_student_length=512, checkpoint_every=0, overwrite=True,
                seed=seed, **METHODS[method],
            ))
            train_s = time.perf_counter() - t0
            score = evaluate_model(work / f"run-{label}", label, test_problems, chat_tok, size, outputs)
            runs.append(_summary(score, test_problems, method=method, seed=seed, train_tokens=result.tokens,
                                 train_seconds=round(train_s, 1), seconds=round(time.perf_counter() - t0, 1)))
            console.print(f"  {method:8s} seed {seed}: exact match {score.exact_match:.1%}, "
                          f"{score.bits_per_byte:.4f} bits/byte ({result.tokens:,} tokens, {runs[-1]['seconds']} s)")
            clock.lap("student runs")
    results.update(
        runs=runs, phases=clock.phases, minutes=clock.minutes, torch_threads=torch.get_num_threads(),
        load_average_start=[round(x, 2) for x in load_start],
        load_average_end=[round(x, 2) for x in os.getloadavg()],
        teacher_tokenizer=TEACHER_TOKENIZER, student_tokenizer=STUDENT_TOKENIZER,
        student_params=_params(general), teacher_params=_params(teacher),
    )
    return results


def _params(folder: Path) -> int:
    model = load_causal_lm(folder)
    return sum(p.numel() for p in model.parameters())


def _mean_std(values: list[float]) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    return f"{values[0]:.4f}"


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def _pct_mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) > 1:
        return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"
    return f"{100 * values[0]:.1f}"


def summarise(results: dict[str, Any]) -> str:
    """The markdown tables: exact match and solution bits per byte per model/method; the audit."""
    size = results["size"]
    n = size["test_problems"]
    lines = [
        "| model | tokenizer | exact match, % | seen wordings | new wordings | bits/byte (test solutions) "
        "| answer lines, % | steps right, % |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def single(label: str, tok: str, s: dict[str, Any]) -> None:
        lines.append(f"| {label} | {tok} | {100 * s['exact_match']:.1f} ({s['correct']}/{n}) | "
                     f"{_pct(s['exact_match_seen_wordings'])} | {_pct(s['exact_match_new_wordings'])} | "
                     f"{s['solution_bits_per_byte']:.4f} | {100 * s['answered'] / n:.0f} | "
                     f"{_pct(s['step_accuracy'])} |")

    single(f"teacher: {results['teacher']['model']}", "SmolLM2", results["teacher"])
    if "teacher_untuned" in results:
        single("SmolLM2-135M-Instruct before fine-tuning", "SmolLM2", results["teacher_untuned"])
    single("student, untrained on maths (general)", "GPT-2", results["student_untrained"])
    for method in size["methods"]:
        runs = [r for r in results["runs"] if r["method"] == method]

        def cell(key: str, runs: list[dict[str, Any]] = runs) -> str:
            return _pct_mean_std([r[key] for r in runs])

        bpb = [r["solution_bits_per_byte"] for r in runs]
        answered = statistics.mean(r["answered"] / n for r in runs)
        steps = [r["step_accuracy"] for r in runs if not math.isnan(r["step_accuracy"])]
        lines.append(f"| student + {method} | GPT-2 | {cell('exact_match')} | {cell('exact_match_seen_wordings')} | "
                     f"{cell('exact_match_new_wordings')} | {_mean_std(bpb)} | {100 * answered:.0f} | "
                     f"{_pct(statistics.mean(steps)) if steps else '–'} |")
    lines.append("")
    teacher_m = results["teacher_params"] / 1e6
    student_m = results["student_params"] / 1e6
    lines.append(
        f"{size['seeds']} seed(s) per method (mean ± sample standard deviation); {n} test problems, half in "
        f"wordings no training problem uses (*new wordings*), half new questions in the training wordings "
        f"(*seen wordings*); greedy decoding. Teacher {teacher_m:.0f}M parameters, {size['teacher_steps']} SFT steps × "
        f"{size['teacher_batch']} problems; student {student_m:.1f}M parameters (Llama hidden {size['student_hidden']}, "
        f"{size['student_layers']} layer(s)), pretrained {size['pretrain_steps']} steps × {size['pretrain_batch']} corpus "
        f"passages, then per method {size['student_steps']} steps × {size['student_batch']} of "
        f"{size['train_problems']} training problems, full fine-tuning, lr {size['student_lr']}. "
        f"{results['minutes']} min in total (load average {results['load_average_start'][0]} at the start, "
        f"{results['load_average_end'][0]} at the end, 2 cores). *Answer lines*: outputs with a `#### <number>` line; "
        "*steps right*: worked steps (`a op b = c`) in the outputs that are arithmetically right, pooled over seeds."
    )
    lines += ["", "Tokenizer audit of the pair over the teacher store (`xtd align --report`):", "",
              "| quantity | teacher (SmolLM2) | student (GPT-2) |", "|---|---|---|"]
    for quantity, t, s in format_rows(results["align_report"]):
        lines.append(f"| {quantity} | {t} | {s} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["size"]["methods"])
    labels = ["untrained", *methods]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title, scale in (
        (axes[0], "exact_match", "test exact match (%)", 100.0),
        (axes[1], "solution_bits_per_byte", "bits per byte of test solutions", 1.0),
    ):
        means, stds = [scale * results["student_untrained"][key]], [0.0]
        for method in methods:
            values = [scale * r[key] for r in results["runs"] if r["method"] == method]
            means.append(statistics.mean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        teacher = scale * results["teacher"][key]
        lo = min(m - e for m, e in zip(means, stds, strict=True))
        hi = max(m + e for m, e in zip(means, stds, strict=True))
        if key == "exact_match":
            lo, hi = 0.0, max(hi, teacher, 1.0) * 1.1
        else:
            pad = max(hi - lo, 0.01) * 0.15
            lo, hi = max(lo - pad, 0.0), hi + pad
        ax.barh(range(len(labels)), [m - lo for m in means], left=lo, xerr=stds, color="#4c72b0", capsize=3)
        if lo <= teacher <= hi:
            ax.axvline(teacher, color="black", ls=":", label=f"teacher ({teacher:.4g})")
        else:
            ax.plot([], [], color="black", ls=":", label=f"teacher: {teacher:.4g} (off scale)")
        ax.set_xlim(lo, hi)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel(title)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_title("higher is better")
    axes[1].set_title("lower is better")
    fig.suptitle("SmolLM2 maths teacher → GPT-2-tokenizer general student")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder for maths.{json,md,png}")
    parser.add_argument("--work", default=None, help="working folder (default: <out>/maths-work)")
    parser.add_argument("--quick", action="store_true", help="the small smoke size")
    args = parser.parse_args()
    setup_logging(-1)
    logging.getLogger("xtd").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "maths-work"
    results = run(QUICK if args.quick else DEFAULT, work)
    (out / "maths.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "make experiment-maths QUICK=1" if args.quick else "make experiment-maths"
    (out / "maths.md").write_text(f"Produced by `{command}`.\n\n" + summarise(results))
    plot(results, out / "maths.png")
    print(summarise(results))
    return 0 if all(math.isfinite(r["solution_bits_per_byte"]) for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
