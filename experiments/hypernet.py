"""Use case 3 in miniature: a zero-shot tokenizer-transfer hypernetwork trained from a store,
with ALM and with SFT, measured on tokenizers it never saw.

Usage::

    python experiments/hypernet.py --out results            # make experiment-hypernet (≤ 60 min on 2 cores)
    python experiments/hypernet.py --out /tmp/hn --quick    # make experiment-hypernet QUICK=1 (≤ 2 min, CI)

The design (every number is a field of :class:`Size`):

1. **Base model.** A small Llama with its own byte-level BPE, pretrained from scratch on
   Shakespeare and the Old Testament as the Table 1 setting-A teacher is
   (``experiments/table1.py``: same data, tokenizer and training loop, smaller budget).
2. **Store.** ``xtd precompute`` runs the base model once over passages of its own
   training documents; the hypernetworks train from that store alone.
3. **Hypernetworks.** ``xtd hypernet train`` (the library call) with ALM (the default,
   binary cross-entropy) and with SFT (the ZeTT baseline), same steps, batch, learning
   rate and sampled tokenizers (the sampler is seeded by the run seed); ≥ 2 seeds.
4. **Evaluation.** Zero-shot bits per byte (tokenizer-independent) on two held-out sets
   (three Shakespeare plays and New Testament passages, both unseen by the base model
   and the hypernetworks) after moving the base model to each embedded tokenizer
   (GPT-2, Llama-3, Mistral v1, Qwen3; none is sampled in training) by the hypernetwork
   (the rows ``xtd hypernet apply`` writes), by FVT, and the original model with its own
   tokenizer.
5. **Cost.** Each run's metrics give the share of a step spent drawing the tokenizer and
   preparing the step's data (tokenising and aligning included) against the whole step,
   and the time the loop waited for that data (it is prepared in a thread while the step
   before trains) against the training time.

Results: ``hypernet.json``, ``hypernet.md`` and ``hypernet.png`` in ``--out``. Whatever
comes out is reported as measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see experiments/table1.py

import argparse  # noqa: E402
import dataclasses
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import cut_passages, kjv_chapters, shakespeare_plays, spread  # noqa: E402
from protocol import machine_state  # noqa: E402
from table1 import OLD_TESTAMENT_BOOKS, RETENTION_PLAYS, pretrain_teacher, train_bpe  # noqa: E402

from xtd.config import HypernetTrainConfig, PrecomputeConfig  # noqa: E402
from xtd.console import console, setup_logging  # noqa: E402
from xtd.eval_sets import EvalSet, metric_key, score_eval_sets  # noqa: E402
from xtd.precompute import precompute  # noqa: E402

TOKENIZERS = ("gpt2", "llama3", "mistral-v1", "qwen3")
METHODS = {"ALM": "alm", "SFT": "sft"}


@dataclasses.dataclass(frozen=True)
class Size:
    """Every knob of one experiment size."""

    teacher_documents: int | None  # None: every document; else a spread of this many
    vocab: int  # the base model's BPE
    hidden: int
    layers: int
    teacher_tokens: int
    teacher_batch: int
    teacher_length: int
    teacher_lr: float
    passage_bytes: int
    train_passages: int  # the store
    eval_passages: int  # per held-out set
    steps: int
    batch: int
    max_length: int
    lr: float
    hn_layers: int
    hn_heads: int
    max_vocab: int
    sample_mean: int
    sample_std: int
    sample_min: int
    sample_max: int
    seeds: int
    tokenizers: tuple[str, ...]


DEFAULT = Size(
    teacher_documents=None, vocab=2048, hidden=64, layers=4, teacher_tokens=1_000_000, teacher_batch=32,
    teacher_length=256, teacher_lr=3e-3, passage_bytes=256, train_passages=1024, eval_passages=32, steps=150,
    batch=16, max_length=128, lr=1e-3, hn_layers=2, hn_heads=4, max_vocab=2048, sample_mean=3072,
    sample_std=1024, sample_min=1024, sample_max=6144, seeds=2, tokenizers=TOKENIZERS,
)
QUICK = Size(
    teacher_documents=80, vocab=512, hidden=32, layers=2, teacher_tokens=50_000, teacher_batch=16,
    teacher_length=128, teacher_lr=3e-3, passage_bytes=200, train_passages=48, eval_passages=4, steps=6, batch=8,
    max_length=96, lr=1e-3, hn_layers=1, hn_heads=4, max_vocab=1024, sample_mean=700, sample_std=150,
    sample_min=500, sample_max=1000, seeds=2, tokenizers=("gpt2", "mistral-v1"),
)


def build_data(size: Size) -> dict[str, list[str]]:
    """The base model's documents, the store's passages and the two held-out sets."""
    chapters = kjv_chapters()
    books = list(dict.fromkeys(book for book, _ in chapters))
    old = set(books[:OLD_TESTAMENT_BOOKS])
    plays = shakespeare_plays()
    documents = [t for name, t in plays.items() if name not in RETENTION_PLAYS]
    documents += [text for book, text in chapters if book in old]
    if size.teacher_documents is not None:
        documents = spread(documents, size.teacher_documents)
    passages = [p for d in documents for p in cut_passages(d, size.passage_bytes)]
    plays_held = [p for name in RETENTION_PLAYS for p in cut_passages(plays[name], size.passage_bytes)]
    new_testament = [p for book, text in chapters if book not in old for p in cut_passages(text, size.passage_bytes)]
    return {
        "documents": documents,
        "train": spread(passages, size.train_passages),
        "shakespeare": spread(plays_held, size.eval_passages),
        "new_testament": spread(new_testament, size.eval_passages),
    }


def score(model: torch.nn.Module, tokenizer, sets: dict[str, list[str]], max_length: int) -> dict[str, float]:  # noqa: ANN001
    scores = score_eval_sets(model, tokenizer, [EvalSet(n, tuple(t)) for n, t in sets.items()], max_length=max_length)
    return {name: round(scores[metric_key(name)], 4) for name in sets}


def train_hypernets(size: Size, store: Path, base: Path, work: Path) -> dict[str, list[dict]]:
    """Every method × seed: train, and return each run's folder and cost figures."""
    from xtd.hypernet.train import train_hypernet

    runs: dict[str, list[dict]] = {}
    for method, losses in METHODS.items():
        runs[method] = []
        for seed in range(size.seeds):
            out = work / f"hn-{losses}-{seed}"
            started = time.perf_counter()
            config = HypernetTrainConfig(
                store=(str(store),), model=str(base), out=str(out), losses=losses, seed=seed, max_steps=size.steps,
                batch_size=size.batch, max_student_length=size.max_length, lr=size.lr, checkpoint_every=0,
                overwrite=True, device="cpu", num_layers=size.hn_layers, num_heads=size.hn_heads, residual="mean",
                max_vocab=size.max_vocab, vocab_size_mean=size.sample_mean, vocab_size_std=size.sample_std,
                vocab_size_min=size.sample_min, vocab_size_max=size.sample_max, max_whitespace_run=4,
            )  # fmt: skip
            result = train_hypernet(config)
            hist = result.history
            data_s = sum(r["data_s"] for r in hist)
            step_s = sum(r["step_time_s"] for r in hist)
            run = {
                "seed": seed, "folder": str(out), "seconds": round(time.perf_counter() - started, 1),
                "first_loss": round(hist[0]["loss"], 4), "last_loss": round(hist[-1]["loss"], 4),
                "mean_vocab_size": round(statistics.mean(r["vocab_size"] for r in hist), 1),
                "mean_bytes_per_token": round(statistics.mean(r["bytes_per_token"] for r in hist), 3),
                "sample_share": round(sum(r["sample_s"] for r in hist) / (data_s + step_s), 4),
                "data_share": round(data_s / (data_s + step_s), 4),
                "wait_share": round(sum(r["data_wait_s"] for r in hist) / step_s, 4),
            }  # fmt: skip
            console.print(f"  {method} seed {seed}: {run}")
            runs[method].append(run)
    return runs


def evaluate(size: Size, base: Path, runs: dict[str, list[dict]], sets: dict[str, list[str]]) -> dict:
    """Bits per byte of the original model, and per unseen tokenizer of FVT and every hypernetwork."""
    from xtd.fvt import fvt_init, set_embedding_table
    from xtd.hypernet.decomposition import Decomposer
    from xtd.hypernet.model import load_hypernet
    from xtd.student import load_causal_lm, model_tokenizer
    from xtd.tokenization import load_tokenizer

    base_tok = model_tokenizer(str(base))
    results: dict = {"original": score(load_causal_lm(str(base)), base_tok, sets, size.max_length), "tokenizers": {}}
    bundles = {m: [load_hypernet(r["folder"]) for r in rs] for m, rs in runs.items()}
    for name in size.tokenizers:
        target = load_tokenizer(f"embedded:{name}")
        decomposer = Decomposer(base_tok, max_pieces=next(iter(bundles.values()))[0].hypernet.config.max_pieces)
        model = load_causal_lm(str(base))
        fvt_init(model, base_tok, target)
        entry: dict = {"vocab_size": target.vocab_size, "FVT": score(model, target, sets, size.max_length)}
        for method, group in bundles.items():
            entry[method] = []
            for bundle in group:
                bundle.decomposer = decomposer  # one decomposition of the tokenizer for every hypernetwork
                rows, _ = bundle.predict(target)
                model = load_causal_lm(str(base))
                set_embedding_table(model, rows, bundle.layout, target)
                entry[method].append(score(model, target, sets, size.max_length))
                del model
                gc.collect()
        console.print(f"  {name}: {entry}")
        results["tokenizers"][name] = entry
    return results


def summarise(evaluation: dict, sets: list[str]) -> dict:
    """Per tokenizer and set: FVT, and each method's mean over seeds (with min and max)."""
    table: dict = {}
    for name, entry in evaluation["tokenizers"].items():
        table[name] = {}
        for s in sets:
            row = {"original": evaluation["original"][s], "FVT": entry["FVT"][s]}
            for method in METHODS:
                values = [r[s] for r in entry[method]]
                row[method] = round(statistics.mean(values), 4)
                row[f"{method}_range"] = [min(values), max(values)]
            table[name][s] = row
    return table


def write_report(out: Path, results: dict) -> None:
    """``hypernet.md`` (the table) and ``hypernet.png`` (a bar per method, tokenizer and set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["sets"])
    lines = [
        "# Zero-shot tokenizer transfer: hypernetwork trained with ALM vs SFT (use case 3, miniature)",
        "",
        f"Command: `{results['command']}`; {results['minutes']} min on this machine. Bits per byte (lower is "
        f"better) on held-out text after moving the base model ({results['base']['parameters']:,} parameters, "
        f"vocabulary {results['size']['vocab']}) to tokenizers no hypernetwork saw in training. "
        f"ALM and SFT: mean over {results['size']['seeds']} seeds [min, max]; same steps, batch, learning rate "
        "and sampled tokenizers.",
        "",
        "| tokenizer | set | original | FVT | SFT (ZeTT) | ALM |",
        "|---|---|---|---|---|---|",
    ]
    for name, per_set in results["summary"].items():
        for s in sets:
            r = per_set[s]
            cell = {m: f"{r[m]:.4f} [{r[m + '_range'][0]:.4f}, {r[m + '_range'][1]:.4f}]" for m in METHODS}
            lines.append(f"| {name} | {s} | {r['original']:.4f} | {r['FVT']:.4f} | {cell['SFT']} | {cell['ALM']} |")
    cost = [run for runs in results["runs"].values() for run in runs]
    lines += [
        "",
        f"Training: {results['size']['steps']} steps × {results['size']['batch']} texts per run; sampled "
        f"vocabularies averaged {statistics.mean(r['mean_vocab_size'] for r in cost):,.0f} tokens and "
        f"{statistics.mean(r['mean_bytes_per_token'] for r in cost):.2f} bytes/token. Drawing the tokenizer took "
        f"{100 * max(r['sample_share'] for r in cost):.1f}% of a step at most, preparing the whole step's data "
        f"(drawing, tokenising, aligning, decomposing) {100 * max(r['data_share'] for r in cost):.1f}% at most"
        + (
            f"; prepared in a thread while the step before trains, the wait for it was "
            f"{100 * max(r['wait_share'] for r in cost):.1f}% of the training time at most."
            if all("wait_share" in r for r in cost)
            else "."
        ),
        "",
    ]
    (out / "hypernet.md").write_text("\n".join(lines))
    names = list(results["summary"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    kinds = ["FVT", "SFT", "ALM"]
    for ax, s in zip(axes[0], sets, strict=True):
        for k, kind in enumerate(kinds):
            values = [results["summary"][n][s][kind] for n in names]
            xs = [i + (k - 1) * 0.27 for i in range(len(names))]
            if kind in METHODS:
                lo = [v - results["summary"][n][s][kind + "_range"][0] for v, n in zip(values, names, strict=True)]
                hi = [results["summary"][n][s][kind + "_range"][1] - v for v, n in zip(values, names, strict=True)]
                ax.bar(xs, values, width=0.27, label=kind, yerr=[lo, hi], capsize=2)
            else:
                ax.bar(xs, values, width=0.27, label=kind)
        ax.axhline(results["summary"][names[0]][s]["original"], color="k", ls="--", lw=1, label="original")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(s)
        ax.set_ylabel("bits per byte")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hypernet.png", dpi=120)
    plt.close(fig)


def run(size: Size, out: Path, *, quick: bool) -> dict:
    work = out / "hypernet-work"
    work.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), machine_state()
    data = build_data(size)
    tok = train_bpe(data["documents"][0::2] + data["train"][1::2], size.vocab, work / "tok" / "tokenizer.json")
    base = work / "base"
    info = pretrain_teacher(tok, data["documents"], size, base)  # type: ignore[arg-type]  # same field names
    console.print(f"[bold]base model[/]: {info}")
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in data["train"]))
    store = work / "store.zarr"
    precompute(PrecomputeConfig(out=str(store), teacher=str(base), data=str(train_file), top_k=0, max_length=512,
                                stride=128, overwrite=True))  # fmt: skip
    sets = {"shakespeare": data["shakespeare"], "new_testament": data["new_testament"]}
    runs = train_hypernets(size, store, base, work)
    evaluation = evaluate(size, base, runs, sets)
    results = {
        "command": "make experiment-hypernet QUICK=1" if quick else "make experiment-hypernet",
        "size": dataclasses.asdict(size),
        "base": info,
        "sets": {n: {"texts": len(t), "bytes": sum(len(x.encode()) for x in t)} for n, t in sets.items()},
        "runs": runs,
        "evaluation": evaluation,
        "summary": summarise(evaluation, list(sets)),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "machine": {"before": load_before, "after": machine_state()},
    }
    (out / "hypernet.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, results)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder of hypernet.json/.md/.png")
    parser.add_argument("--quick", action="store_true", help="the ≤ 2 minute size (CI)")
    args = parser.parse_args()
    setup_logging(-1)
    logging.getLogger("xtd").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    run(QUICK if args.quick else DEFAULT, Path(args.out), quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
