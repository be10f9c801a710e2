"""Setting A of the paper's Table 1 in miniature: a small teacher that knows more than the
distillation data, and students measured on how much of it they keep.

Usage::

    python experiments/table1.py --out results            # make experiment (≤ 60 min on 2 cores)
    python experiments/table1.py --out /tmp/t1 --quick    # make experiment QUICK=1 (≤ 5 min, CI)

The design (every number is a field of :class:`Size`):

1. **Teacher.** A small Llama with its own byte-level BPE, pretrained from scratch
   (a plain next-token loop) on a broad mixture: 35 Shakespeare plays and the Old
   Testament, for many tokens per parameter. It never sees the New Testament.
2. **Distillation data.** A slice of New Testament passages (chapters not held out).
   ``xtd precompute`` runs the teacher once over it (top-32 and hidden states, so every
   method reads the same store).
3. **Students.** The teacher moved by FVT to another BPE ("subword") and to bytes, then
   trained for several epochs over the slice by SFT, ULD (+CE), MinED, ALM, ALM+SFT,
   ALM+SFT without debiasing, and ALM at τ = 5; full fine-tuning. Byte students use the
   paper's byte recipe: untied embeddings for every method, and the hidden-state loss
   added to every ALM method.
4. **Evaluation sets** (bits per byte, tokenizer-independent, scored in windows no longer
   than the training length): ``validation`` (held-out New Testament chapters; picks
   each method's learning rate), ``in_domain`` (other held-out New Testament chapters),
   ``retention`` (3 held-out Shakespeare plays: a domain the teacher knows and the
   distillation data lacks) and ``teacher_samples`` (texts the teacher sampled, seeded:
   their cross-entropy is the teacher's entropy + KL(teacher ‖ student)).
5. **Protocol** (``experiments/protocol.py``): learning rate from a grid on
   ``validation`` at seed 0, more seeds at that rate, learning curves at every epoch.
6. **Diagnostics** (``experiments/diagnostics.py``) of each method's seed-0 student on a
   store of the teacher over the ``in_domain`` passages.

Results go into ``experiment.json`` (key ``"A"``, next to setting B), and
``experiments/report.py`` regenerates ``experiment.md`` and the plots. Whatever comes
out is reported as measured.
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
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
from corpus import (  # noqa: E402
    OLD_TESTAMENT_BOOKS,
    chapter_split,
    cut_passages,
    kjv_chapters,
    shakespeare_plays,
    spread,
)
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

from xtd.config import PrecomputeConfig, TrainConfig  # noqa: E402
from xtd.console import console, setup_logging  # noqa: E402
from xtd.precompute import precompute  # noqa: E402
from xtd.sampling import sample_texts, write_samples  # noqa: E402
from xtd.tokenization import load_tokenizer  # noqa: E402
from xtd.train import lr_at, train  # noqa: E402

METHODS = (
    Method("SFT", {"losses": "sft"}),
    Method("ULD", {"losses": "uld+sft"}),
    Method("MinED", {"losses": "mined"}),
    Method("ALM", {"losses": "alm"}),
    Method("ALM+SFT", {"losses": "alm+sft"}),
    Method("ALM+SFT, no debias", {"losses": "alm+sft", "debias": False}),
    Method("ALM, τ=5", {"losses": "alm", "tau": 5.0}),
)
RETENTION_PLAYS = ("twelfth-night", "the-tempest", "macbeth")


@dataclasses.dataclass(frozen=True)
class Size:
    """Every knob of one experiment size."""

    teacher_documents: int | None  # None: every play and Old Testament chapter; else a spread of this many
    passage_bytes: int  # passages: whole lines up to at least this many bytes
    distill_passages: int  # the distillation slice
    eval_passages: int  # texts per evaluation set (teacher samples too)
    teacher_vocab: int
    student_vocab: int
    hidden: int
    layers: int
    teacher_tokens: int  # pretraining budget of the teacher
    teacher_batch: int
    teacher_length: int
    teacher_lr: float
    sample_tokens: int  # token budget of each teacher sample
    epochs: int  # over the distillation slice, every run
    subword_batch: int
    subword_length: int
    byte_batch: int
    byte_length: int
    lrs: tuple[float, ...]
    seeds: int
    methods: tuple[str, ...]
    task_docs: int = 200  # documents per lm-eval task (xtd_next_verse, xtd_next_line), seed-0 students


DEFAULT = Size(
    teacher_documents=None, passage_bytes=256, distill_passages=256, eval_passages=32, teacher_vocab=2048,
    student_vocab=1536, hidden=64, layers=4, teacher_tokens=3_000_000, teacher_batch=32, teacher_length=256,
    teacher_lr=3e-3, sample_tokens=96, epochs=3, subword_batch=16, subword_length=192, byte_batch=16,
    byte_length=512, lrs=(3e-4, 1e-3, 3e-3), seeds=2, methods=tuple(m.name for m in METHODS),
)
QUICK = Size(
    teacher_documents=120, passage_bytes=200, distill_passages=48, eval_passages=6, teacher_vocab=512, student_vocab=384,
    hidden=32, layers=2, teacher_tokens=120_000, teacher_batch=16, teacher_length=128, teacher_lr=3e-3,
    sample_tokens=48, epochs=2, subword_batch=8, subword_length=128, byte_batch=8, byte_length=448,
    lrs=(1e-3, 3e-3), seeds=2, methods=("SFT", "ALM+SFT"), task_docs=40,
)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def build_data(size: Size) -> dict[str, list[str]]:
    """Teacher documents, the distillation slice and the three held-out text sets."""
    chapters = kjv_chapters()
    books = list(dict.fromkeys(book for book, _ in chapters))
    old = set(books[:OLD_TESTAMENT_BOOKS])
    split = chapter_split([text for book, text in chapters if book not in old], size.passage_bytes)
    plays = shakespeare_plays()
    retention = [p for name in RETENTION_PLAYS for p in cut_passages(plays[name], size.passage_bytes)]
    teacher_documents = [t for name, t in plays.items() if name not in RETENTION_PLAYS]
    teacher_documents += [text for book, text in chapters if book in old]
    if size.teacher_documents is not None:
        teacher_documents = spread(teacher_documents, size.teacher_documents)
    return {
        "teacher_documents": teacher_documents,
        "distill": spread(split["pool"], size.distill_passages),
        "validation": spread(split["validation"], size.eval_passages),
        "in_domain": spread(split["in_domain"], size.eval_passages),
        "retention": spread(retention, size.eval_passages),
    }


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


# --------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------


def pretrain_teacher(tokenizer_json: Path, documents: list[str], size: Size, folder: Path) -> dict:
    """A Llama trained from scratch by next-token prediction on random windows of the documents.

    Documents are joined with ``<|endoftext|>`` (which also serves as BOS); AdamW with a
    linear warm-up and decay (``xtd.train.lr_at``). Returns what was trained.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer_json)
    ids = [np.asarray([tok.eos_id], dtype=np.int64)]
    for enc in tok.encode_batch(documents):
        ids += [enc.ids.astype(np.int64), np.asarray([tok.eos_id], dtype=np.int64)]
    stream = torch.from_numpy(np.concatenate(ids))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=size.hidden, intermediate_size=size.hidden * 4,
        num_hidden_layers=size.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.teacher_lr, weight_decay=0.01)
    steps = max(1, size.teacher_tokens // (size.teacher_batch * size.teacher_length))
    rng = np.random.default_rng(0)
    offsets = torch.arange(size.teacher_length)
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=size.teacher_lr, warmup_steps=steps // 20, max_steps=steps)
        starts = torch.from_numpy(rng.integers(0, len(stream) - size.teacher_length, size.teacher_batch))
        batch = stream[starts[:, None] + offsets]  # (B, L)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 10) == 0:
            console.print(f"  teacher step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.save_pretrained(folder)
    tok.save(folder)
    params = sum(p.numel() for p in model.parameters())
    tokens = steps * size.teacher_batch * size.teacher_length
    return {
        "parameters": params, "train_tokens": tokens, "tokens_per_parameter": round(tokens / params, 1),
        "corpus_tokens": int(len(stream)), "epochs": round(tokens / len(stream), 2), "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
    }


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------


def task_scores(folder: str | Path, max_length: int, limit: int) -> dict[str, dict[str, float]]:
    """The offline lm-eval tasks (``xtd eval --tasks xtd_next_verse,xtd_next_line``) on a saved model.

    ``xtd_next_line`` (*The Tempest*) is held out of the teacher's and the students' data: it
    measures retention. ``xtd_next_verse`` (the last chapters of the New Testament) is the
    distillation domain; some of its chapters may be in the distillation slice.
    """
    from xtd.eval_tasks import LOCAL_TASKS, run_tasks
    from xtd.lm_eval_model import load_xtd_lm

    lm = load_xtd_lm([str(folder)], max_length=max_length, batch_size=16)
    return run_tasks(lm, LOCAL_TASKS, limit=limit)


def run(size: Size, out: Path, *, quick: bool) -> dict:
    """Run setting A into ``out``; returns its results (also saved in ``experiment.json``)."""
    work = out / "experiment-work" / "A"
    work.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), machine_state()
    data = build_data(size)
    console.print(
        "[bold]data[/]: teacher "
        f"{sum(len(t.encode()) for t in data['teacher_documents']):,} bytes; distillation slice "
        f"{len(data['distill'])} passages, {sum(len(t.encode()) for t in data['distill']):,} bytes"
    )
    half = data["teacher_documents"] + data["distill"]
    teacher_tok = train_bpe(half[0::2], size.teacher_vocab, work / "tok-teacher" / "tokenizer.json")
    student_tok = train_bpe(half[1::2], size.student_vocab, work / "tok-student" / "tokenizer.json")

    # 1. The teacher, trained on the broad mixture; then its samples and stores.
    teacher = work / "teacher"
    teacher_info = pretrain_teacher(teacher_tok, data["teacher_documents"], size, teacher)
    console.print(f"[bold]teacher[/]: {teacher_info}")
    from xtd.student import load_causal_lm, model_tokenizer

    samples = sample_texts(
        load_causal_lm(str(teacher)), model_tokenizer(str(teacher)), num_samples=size.eval_passages,
        max_new_tokens=size.sample_tokens, seed=0,
    )
    write_samples(samples, work / "teacher-samples.jsonl")
    sets = {
        "validation": data["validation"],
        "in_domain": data["in_domain"],
        "retention": data["retention"],
        "teacher_samples": [s["text"] for s in samples],
    }
    distill = work / "distill.jsonl"
    distill.write_text("".join(json.dumps({"text": t}) + "\n" for t in data["distill"]))
    held = work / "in-domain.jsonl"
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in data["in_domain"]))
    store, held_store = work / "teacher.zarr", work / "teacher-in-domain.zarr"
    precompute(PrecomputeConfig(out=str(store), teacher=str(teacher), data=str(distill), top_k=32, hidden=True,
                                max_length=512, stride=128, overwrite=True))
    precompute(PrecomputeConfig(out=str(held_store), teacher=str(teacher), data=str(held), top_k=0,
                                max_length=512, stride=128, overwrite=True))
    teacher_scores = score_folder(teacher, sets, size.teacher_length)
    teacher_tasks = task_scores(teacher, size.teacher_length, size.task_docs)
    console.print("[bold]teacher[/] bits/byte: " + ", ".join(f"{k} {v:.4f}" for k, v in teacher_scores.items()))

    # 2. Students: each target, each method (lr grid + seeds).
    steps_per_epoch = {t: -(-len(data["distill"]) // b) for t, b in (("subword", size.subword_batch), ("bytes", size.byte_batch))}
    targets = (
        Target("subword", str(student_tok), size.subword_length, size.subword_batch,
               size.epochs * steps_per_epoch["subword"], steps_per_epoch["subword"], {"lora_rank": 0}),
        Target("bytes", "bytes", size.byte_length, size.byte_batch, size.epochs * steps_per_epoch["bytes"],
               steps_per_epoch["bytes"], {"lora_rank": 0, "untie": True}, alm_extra_losses="+latents"),
    )
    protocol = Protocol(lrs=size.lrs, seeds=size.seeds, validation="validation")
    methods = [m for m in METHODS if m.name in size.methods]
    setting: dict = {
        "description": "tiny teacher pretrained on Shakespeare + Old Testament; distilled on New Testament passages",
        "command": "make experiment QUICK=1" if quick else "make experiment",
        "size": dataclasses.asdict(size),
        "data": {name: {"texts": len(texts), "bytes": sum(len(t.encode()) for t in texts)}
                 for name, texts in {**sets, "distill": data["distill"], "teacher_documents": data["teacher_documents"]}.items()},
        "teacher": {**teacher_info, "bits_per_byte": teacher_scores, "tasks": teacher_tasks},
        "protocol": dataclasses.asdict(protocol),
        "targets": {},
    }
    for target in targets:
        fvt_dir = work / f"fvt-{target.name}"
        train(TrainConfig(store=(str(store),), student=str(teacher), tokenizer=target.tokenizer, out=str(fvt_dir),
                          max_steps=0, overwrite=True, **target.settings))
        fvt = score_folder(fvt_dir, sets, target.max_length)
        console.print(f"[bold]{target.name}[/] FVT initialisation: " + ", ".join(f"{k} {v:.4f}" for k, v in fvt.items()))
        entry: dict = {
            "tokenizer": Path(target.tokenizer).parent.name if target.name == "subword" else "bytes",
            "steps": target.steps, "batch_size": target.batch_size, "max_length": target.max_length,
            "eval_every": target.eval_every, "settings": target.settings, "fvt": fvt,
            "fvt_diagnostics": alm_diagnostics(fvt_dir, held_store, max_length=target.max_length),
            "fvt_tasks": task_scores(fvt_dir, target.max_length, size.task_docs),
            "methods": {},
        }
        setting["targets"][target.name] = entry
        for method in methods:
            result = run_method(str(store), str(teacher), target, method, sets, work / "runs", protocol,
                                log=console.print)
            result["summary"] = summarise_runs(result, fvt, teacher_scores)
            result["tasks"] = task_scores(result["model_dir"], target.max_length, size.task_docs)
            result["diagnostics"] = alm_diagnostics(result.pop("model_dir"), held_store, max_length=target.max_length)
            entry["methods"][method.name] = result
            setting["minutes"] = round((time.perf_counter() - started) / 60, 1)
            save_setting(out / "experiment.json", "A", setting)  # partial results survive a crash
    setting["minutes"] = round((time.perf_counter() - started) / 60, 1)
    setting["machine"] = {"before": load_before, "after": machine_state()}
    save_setting(out / "experiment.json", "A", setting)
    return setting


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="folder of experiment.json/.md and the plots")
    parser.add_argument("--quick", action="store_true", help="the ≤ 5 minute size (CI)")
    args = parser.parse_args()
    setup_logging(-1)
    logging.getLogger("xtd").setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    run(QUICK if args.quick else DEFAULT, out, quick=args.quick)
    report.write_all(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
