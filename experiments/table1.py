"""A miniature of the paper's Table 1 (tokenizer transfer) that anyone can rerun on a CPU.

Usage::

    python experiments/table1.py --out results            # default size: 24 min on 2 idle cores (≤ 60 min)
    python experiments/table1.py --out /tmp/t1 --quick    # ≤ 5 min smoke size (runs in CI)

The setting, scaled down from spec/ALM.md §8 so that methods can separate beyond
seed noise on a laptop CPU:

1. **Tokenizers.** A byte-level BPE for the teacher (``teacher_vocab`` entries) and a
   different BPE for the subword target (``student_vocab`` entries, trained on a
   disjoint half of the corpus), both trained in-process on the embedded corpus;
   the byte target is xtd's built-in ``bytes`` tokenizer.
2. **Teacher.** A small Llama that xtd itself pretrains with ``--losses sft`` on the
   training passages (the packaged SmolLM2 is too slow on a CPU to give every run
   enough tokens). Then ``xtd precompute`` runs it once over the same passages with
   top-32 log-probs.
3. **Students.** For every target tokenizer, the teacher moved to that tokenizer by
   FVT (the paper's tokenizer-transfer setting), then trained by each method with the
   same initialisation, data order, steps and texts per step, full fine-tuning,
   ``seeds`` seeds each:
   SFT, ULD (+CE), MinED, ALM, ALM+SFT, and ALM without debiasing (the ablation).
   A text is one passage truncated at the student length (``long_documents=
   "truncate"``), so every method sees the same fixed-length windows per step.
4. **Metric.** Bits per byte on held-out text (the last documents of the embedded
   corpus, which no training passage comes from), tokenizer-independent.

It writes ``experiment.json`` (every run), ``experiment.md`` (mean ± standard
deviation per method and target) and ``experiment.png`` to ``--out``. Whatever
ordering comes out is reported as measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from xtd.assets import iter_embedded_corpus
from xtd.config import PrecomputeConfig, TrainConfig
from xtd.console import console, setup_logging
from xtd.evaluate import bits_per_byte, held_out_texts
from xtd.precompute import precompute
from xtd.tokenization import load_tokenizer
from xtd.train import train

METHODS: dict[str, dict] = {
    "SFT": {"losses": "sft"},
    "ULD": {"losses": "uld+sft"},
    "MinED": {"losses": "mined"},
    "ALM": {"losses": "alm"},
    "ALM+SFT": {"losses": "alm+sft"},
    "ALM, no debias": {"losses": "alm", "debias": False},
}
TARGETS = ("subword", "bytes")


@dataclasses.dataclass(frozen=True)
class Size:
    """Every knob of one experiment size."""

    passages: int  # training passages (≈ passage_bytes each)
    passage_bytes: int
    held_out_docs: int
    teacher_vocab: int
    student_vocab: int
    hidden: int
    layers: int
    teacher_steps: int
    teacher_lr: float
    student_steps: int  # subword target
    student_lr: float
    batch_size: int  # subword target: passages per step
    byte_steps: int  # byte target (a byte step costs ~4× a subword step)
    byte_batch_size: int
    subword_length: int  # max student tokens per passage, subword target
    byte_length: int  # max student tokens per passage, byte target
    seeds: int
    methods: tuple[str, ...]


DEFAULT = Size(
    passages=4000, passage_bytes=320, held_out_docs=6, teacher_vocab=2048, student_vocab=1536,
    hidden=128, layers=4, teacher_steps=400, teacher_lr=3e-3, student_steps=150, student_lr=1e-3,
    batch_size=16, byte_steps=90, byte_batch_size=8, subword_length=128, byte_length=352, seeds=3,
    methods=tuple(METHODS),
)
QUICK = Size(
    passages=400, passage_bytes=256, held_out_docs=2, teacher_vocab=512, student_vocab=384,
    hidden=64, layers=2, teacher_steps=30, teacher_lr=3e-3, student_steps=8, student_lr=1e-3,
    batch_size=8, byte_steps=4, byte_batch_size=4, subword_length=96, byte_length=288, seeds=1,
    methods=("SFT", "ALM+SFT"),
)


def passages(size: Size) -> list[str]:
    """Training passages: corpus documents cut at line ends into ≈ passage_bytes pieces.

    The held-out documents (the corpus's last ones) are excluded.
    """
    records = list(iter_embedded_corpus())[: -size.held_out_docs]
    out: list[str] = []
    for record in records:
        piece = ""
        for line in record["text"].splitlines(keepends=True):
            piece += line
            if len(piece.encode()) >= size.passage_bytes:
                out.append(piece)
                piece = ""
        if piece.strip():
            out.append(piece)
    # Spread the passages over the whole corpus (plays and scripture alike), deterministically.
    stride = max(1, len(out) // size.passages)
    return out[::stride][: size.passages]


def train_bpe(texts: list[str], vocab_size: int, path: Path) -> Path:
    """A byte-level BPE trained on ``texts``, saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def make_teacher_init(tokenizer_json: Path, size: Size, folder: Path) -> Path:
    """A randomly initialised Llama with the teacher tokenizer, saved as a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer_json)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=size.hidden, intermediate_size=size.hidden * 4,
        num_hidden_layers=size.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(folder)
    return folder


def held_out_bpb(model_dir: Path, texts: list[str]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = load_tokenizer(model_dir)
    return bits_per_byte(model, tok, texts, max_length=1024, stride=512, batch_size=4).bits_per_byte


def run(size: Size, out: Path) -> dict:
    """Run the whole experiment into ``out``; returns the results dict."""
    work = out / "experiment-work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    texts = passages(size)
    held_out = held_out_texts(size.held_out_docs)
    data = work / "passages.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    console.print(f"[bold]data[/]: {len(texts)} passages, {sum(len(t.encode()) for t in texts):,} bytes; "
                  f"held out: {len(held_out)} documents, {sum(len(t.encode()) for t in held_out):,} bytes")

    teacher_tok = train_bpe(texts[0::2], size.teacher_vocab, work / "tok-teacher" / "tokenizer.json")
    student_tok = train_bpe(texts[1::2], size.student_vocab, work / "tok-student" / "tokenizer.json")
    targets = {
        "subword": (str(student_tok), size.subword_length, size.student_steps, size.batch_size),
        "bytes": ("bytes", size.byte_length, size.byte_steps, size.byte_batch_size),
    }

    # 1. The teacher: pretrained by xtd itself (SFT) on the passages.
    init = make_teacher_init(teacher_tok, size, work / "teacher-init")
    text_store = work / "store-text.zarr"
    precompute(PrecomputeConfig(out=str(text_store), teacher=str(init), data=str(data), top_k=0,
                                max_length=512, stride=128))
    teacher = work / "teacher"
    train(TrainConfig(store=(str(text_store),), student=str(init), out=str(teacher), losses="sft",
                      gradmag=False, lora_rank=0, lr=size.teacher_lr, max_steps=size.teacher_steps,
                      batch_size=32, max_student_length=256, long_documents="truncate", checkpoint_every=0,
                      overwrite=True, seed=0))
    teacher_bpb = held_out_bpb(teacher, held_out)
    console.print(f"[bold]teacher[/]: {teacher_bpb:.4f} bits/byte on held-out text")

    # 2. Run the teacher once; every student below trains from these shards.
    store = work / "store-teacher.zarr"
    precompute(PrecomputeConfig(out=str(store), teacher=str(teacher), data=str(data), top_k=32,
                                max_length=512, stride=128))

    # 3. Students: teacher → target tokenizer (FVT), then each method × seed.
    runs: list[dict] = []
    fvt_bpb: dict[str, float] = {}
    for target, (tokenizer, length, steps, batch_size) in targets.items():
        fvt_dir = work / f"fvt-{target}"
        train(TrainConfig(store=(str(store),), student=str(teacher), tokenizer=tokenizer, out=str(fvt_dir),
                          max_steps=0, lora_rank=0, overwrite=True))
        fvt_bpb[target] = held_out_bpb(fvt_dir, held_out)
        console.print(f"[bold]{target}[/] FVT initialisation: {fvt_bpb[target]:.4f} bits/byte")
        for method in size.methods:
            for seed in range(size.seeds):
                run_dir = work / f"run-{target}-{method.replace(' ', '').replace(',', '_')}-{seed}"
                t0 = time.perf_counter()
                result = train(TrainConfig(
                    store=(str(store),), student=str(teacher), tokenizer=tokenizer, out=str(run_dir),
                    lora_rank=0, lr=size.student_lr, max_steps=steps,
                    warmup_steps=steps // 10, batch_size=batch_size,
                    max_student_length=length, long_documents="truncate", checkpoint_every=0, overwrite=True, seed=seed,
                    **METHODS[method],
                ))
                bpb = held_out_bpb(run_dir, held_out)
                runs.append({"target": target, "method": method, "seed": seed, "bits_per_byte": bpb,
                             "train_tokens": result.tokens, "seconds": round(time.perf_counter() - t0, 1)})
                console.print(f"  {target:8s} {method:15s} seed {seed}: {bpb:.4f} bits/byte "
                              f"({result.tokens:,} tokens, {runs[-1]['seconds']} s)")
    results = {
        "size": dataclasses.asdict(size),
        "teacher_bits_per_byte": teacher_bpb,
        "fvt_bits_per_byte": fvt_bpb,
        "runs": runs,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return results


def summarise(results: dict) -> str:
    """The markdown table: mean ± std of held-out bits per byte per method and target."""
    size = results["size"]
    lines = [
        "| method | " + " | ".join(f"→ {t} (bits/byte)" for t in TARGETS) + " |",
        "|---|" + "---|" * len(TARGETS),
        f"| teacher (original tokenizer) | {results['teacher_bits_per_byte']:.4f} |" + " |" * (len(TARGETS) - 1),
        "| FVT initialisation, untrained | "
        + " | ".join(f"{results['fvt_bits_per_byte'][t]:.4f}" for t in TARGETS) + " |",
    ]
    for method in size["methods"]:
        cells = []
        for target in TARGETS:
            values = [r["bits_per_byte"] for r in results["runs"] if r["method"] == method and r["target"] == target]
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.4f} ± {std:.4f}" if not math.isnan(std) else f"{values[0]:.4f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{size['seeds']} seed(s) per cell (mean ± sample standard deviation); per run "
        f"{size['student_steps']} steps × {size['batch_size']} passages (subword) or "
        f"{size['byte_steps']} × {size['byte_batch_size']} (bytes), full fine-tuning, lr {size['student_lr']}; teacher: Llama hidden {size['hidden']}, {size['layers']} layers, "
        f"BPE {size['teacher_vocab']}; subword target: BPE {size['student_vocab']}; "
        f"{results['minutes']} min in total. Lower is better."
    )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["size"]["methods"]
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(5 * len(TARGETS), 3.6), sharey=False)
    for ax, target in zip(axes, TARGETS, strict=True):
        means, stds = [], []
        for method in methods:
            values = [r["bits_per_byte"] for r in results["runs"] if r["method"] == method and r["target"] == target]
            means.append(statistics.mean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.barh(range(len(methods)), means, xerr=stds, color="#4c72b0", capsize=3)
        ax.axvline(results["fvt_bits_per_byte"][target], color="grey", ls="--", label="FVT init")
        ax.axvline(results["teacher_bits_per_byte"], color="black", ls=":", label="teacher")
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xlabel("held-out bits per byte (lower is better)")
        ax.set_title(f"teacher → {target}")
        lo = min(min(means), results["teacher_bits_per_byte"])
        ax.set_xlim(lo * 0.95, max(max(means), results["fvt_bits_per_byte"][target]) * 1.02)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder for experiment.{json,md,png}")
    parser.add_argument("--quick", action="store_true", help="the ≤ 5 minute smoke size")
    args = parser.parse_args()
    setup_logging(-1)
    logging.getLogger("xtd").setLevel(logging.WARNING)
    out = Path(args.out)
    results = run(QUICK if args.quick else DEFAULT, out)
    (out / "experiment.json").write_text(json.dumps(results, indent=2) + "\n")
    command = "make experiment QUICK=1" if args.quick else "make experiment"
    (out / "experiment.md").write_text(f"Produced by `{command}`.\n\n" + summarise(results))
    plot(results, out / "experiment.png")
    print(summarise(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
