"""Training step cost: ALM+SFT from teacher shards vs SFT alone vs ALM with a live teacher.

Same student, same micro-batch, same optimizer for every variant:

* ``sft``: forward, SFT loss, backward, AdamW step;
* ``alm_sft_shards``: the same plus the ALM loss from stored teacher rows, losses
  summed with fixed weights like the SFT step — target ≤ 1.10× the SFT step;
* ``alm_sft_shards_gradmag``: as ``xtd train`` runs by default, with GradMag (one extra
  ``autograd.grad`` per loss back through the LM head and last block; reported, and
  held to the same 1.10× target);
* ``alm_sft_live_teacher_gradmag``: the reference's way: the teacher runs forward inside
  the step to produce ℓ^T and the boundary mass, then the same losses with GradMag
  (reported as the speed-up of the shard step over it);
* loader throughput: student tokens per second that :class:`xtd.train_data.StepDataset`
  prepares (read, tokenise, align, pad) vs tokens per second the step consumes —
  target ≥ 10×.

Teacher: SmolLM2-135M-Instruct (``--quick``: a random 2-layer Llama with its
tokenizer); student: a random 2-layer Llama (hidden 128) with the GPT-2 tokenizer, so
the pair really crosses tokenizers. Run: ``python bench/train.py [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import main, result, target  # noqa: E402


def _texts(n: int, chars: int) -> list[str]:
    from xtd.assets import iter_embedded_corpus

    out = []
    for record in iter_embedded_corpus():
        if len(record["text"]) >= chars:
            out.append(record["text"][:chars])
        if len(out) == n:
            return out
    return out


def _random_llama(tokenizer: Any, folder: Path, *, hidden: int, layers: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def _write_store(url: Path, teacher: Any, texts: list[str], max_length: int) -> None:
    from xtd.scoring import score_texts
    from xtd.storage import StoreWriter
    from xtd.tokenization import BOUNDARY_CLASSES

    attrs = {
        "teacher": teacher.describe(),
        "tokenizer_json": teacher.tokenizer.to_json(),
        "boundary_classes": list(BOUNDARY_CLASSES),
        "dataset": {"source": "bench"},
        "settings": {"max_length": max_length},
    }
    with StoreWriter(url, attrs=attrs, top_k=0) as writer:
        for doc in score_texts(teacher, texts, top_k=0, max_length=max_length, stride=max_length // 2):
            writer.write(doc)


def _median_times(variants: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median wall time of each variant, timed round-robin so machine load hits all alike."""
    for fn in variants.values():
        fn()  # warm-up (AdamW state, allocator)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in times.items()}


def run(quick: bool = False) -> dict[str, Any]:
    from xtd.assets import embedded_teacher_dir
    from xtd.config import ALMSettings, DataSettings
    from xtd.data_plan import StepPlan
    from xtd.examples import build_example, pad_examples
    from xtd.losses.registry import count_normalizers, loss_specs
    from xtd.model_parts import last_block_parameters
    from xtd.objective import Objective
    from xtd.storage import open_store
    from xtd.student import load_student
    from xtd.teacher import load_teacher
    from xtd.tokenization import load_tokenizer
    from xtd.train_data import StepDataset, TrainData

    torch.manual_seed(0)
    batch_texts, chars, student_len = (4, 600, 96) if quick else (8, 2000, 256)
    repeats = 3 if quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="xtd-bench-train-"))
    teacher_tok = load_tokenizer("embedded:smollm2")
    student_tok = load_tokenizer("embedded:gpt2")
    teacher_dir = (
        _random_llama(teacher_tok, tmp / "teacher", hidden=64, layers=2, seed=1) if quick else embedded_teacher_dir()
    )
    student_dir = _random_llama(student_tok, tmp / "student", hidden=128, layers=2, seed=2)
    teacher = load_teacher(str(teacher_dir), dtype="fp32", device="cpu")
    texts = _texts(batch_texts * 3, chars)
    store = tmp / "store"
    _write_store(store, teacher, texts, max_length=student_len * 2)
    reader = open_store(store)

    # One micro-batch of `batch_texts` documents, built exactly as training builds it.
    docs = [reader[d] for d in range(batch_texts)]
    examples = [
        build_example(doc, student_tok, columns=[0, 1, 2, 3], max_student_length=student_len, max_teacher_length=None)
        for doc in docs
    ]
    batch = pad_examples(examples, pad_id=student_tok.pad_id or 0)
    teacher_len = batch["teacher_logprob"].shape[1]
    teacher_ids = torch.zeros(batch_texts, teacher_len, dtype=torch.long)
    for i, doc in enumerate(docs):
        n = len(examples[i]["teacher_logprob"])
        teacher_ids[i, :n] = torch.from_numpy(np.asarray(doc.token_ids[:n], dtype=np.int64))
    teacher_mask = torch.as_tensor(teacher_tok.boundary_mask(), dtype=torch.bool)

    student = load_student(str(student_dir), lora_rank=0)
    model = student.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    last_block = last_block_parameters(model)
    bmask = torch.as_tensor(student_tok.boundary_mask(), dtype=torch.bool)
    alm = ALMSettings(boundary_classes=("space", "newline", "tab", "special"))

    def step(names: tuple[str, ...], data: dict[str, torch.Tensor], gradmag: bool = True) -> None:
        specs = loss_specs(names)
        objective = Objective(losses=specs, alm=alm, weights=dict.fromkeys(names, 1.0), boundary_mask=bmask)
        counts = count_normalizers(data, specs, alm)
        terms, _ = objective(model, data, {n: float(max(c, 1)) for n, c in counts.items()})
        loss, _ = objective.combine(terms, counts, last_block if gradmag else [])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def live_step() -> None:
        # The reference's way: the teacher forward pass runs inside every step.
        with torch.no_grad():
            logits = teacher.model(input_ids=teacher_ids, attention_mask=(batch["teacher_chunk"] >= -1).long()).logits
            logp = torch.log_softmax(logits[..., : teacher_tok.vocab_size].float(), dim=-1)  # (B, T, V_T)
            realised = logp[:, :-1].gather(-1, teacher_ids[:, 1:, None]).squeeze(-1)
            live = dict(batch)
            live["teacher_logprob"] = torch.cat([torch.zeros(batch_texts, 1), realised], dim=1)
            live["teacher_sigma"] = torch.logsumexp(logp[..., teacher_mask], dim=-1).clamp(max=0.0)
        step(("alm", "sft"), live)

    timed = _median_times(
        {
            "sft": lambda: step(("sft",), batch),
            "shards": lambda: step(("alm", "sft"), batch, gradmag=False),
            "shards_gradmag": lambda: step(("alm", "sft"), batch),
            "live_gradmag": live_step,
        },
        repeats,
    )
    sft_s, shards_s, gradmag_s, live_s = (timed[k] for k in ("sft", "shards", "shards_gradmag", "live_gradmag"))

    # Loader throughput: whole steps of the same size, read + tokenised + aligned + padded.
    spec = TrainData(
        stores=(str(store),),
        student_tokenizer=student_tok,
        plan=StepPlan((len(reader),), batch_size=batch_texts, seed=0),
        data=DataSettings(batch_size=batch_texts, max_student_length=student_len, long_documents="truncate"),
        alm=alm,
        losses=loss_specs(("alm", "sft")),
        micro_batch_size=batch_texts,
    )
    dataset = StepDataset(spec)
    dataset[0]
    t0 = time.perf_counter()
    loader_tokens = sum(dataset[s]["student_tokens"] for s in range(1, 1 + repeats * 2))
    loader_tps = loader_tokens / (time.perf_counter() - t0)
    step_tokens = int(batch["attention_mask"].sum())
    consume_tps = step_tokens / gradmag_s

    metrics = {
        "step_s_sft": sft_s,
        "step_s_alm_sft_shards": shards_s,
        "step_s_alm_sft_shards_gradmag": gradmag_s,
        "step_s_alm_sft_live_teacher_gradmag": live_s,
        "speedup_shards_vs_live": live_s / gradmag_s,
        "loader_tokens_per_s": loader_tps,
        "step_consumes_tokens_per_s": consume_tps,
        "student_tokens_per_step": step_tokens,
        "teacher_rows_per_step": int((batch["teacher_chunk"] >= -1).sum()),
    }
    teacher_name = "random 2-layer Llama (SmolLM2 tokenizer)" if quick else "SmolLM2-135M-Instruct"
    return result(
        "train",
        metrics=metrics,
        targets={
            "alm_sft_shards / sft step time": target(shards_s / sft_s, "<=", 1.10, unit="×"),
            "alm_sft_shards+gradmag / sft step time": target(gradmag_s / sft_s, "<=", 1.10, unit="×"),
            "loader / step tokens per s": target(loader_tps / consume_tps, ">=", 10.0, unit="×"),
        },
        setup=(
            f"CPU, {torch.get_num_threads()} threads; teacher {teacher_name}; student random Llama hidden 128, "
            f"2 layers, GPT-2 tokenizer (50,257); {batch_texts} texts × ≤{student_len} student tokens per step; "
            f"median of {repeats} steps"
        ),
    )


if __name__ == "__main__":
    main(run)
