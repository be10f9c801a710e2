"""Training step cost from teacher shards, side by side with a bare Hugging Face SFT step.

Same student, same real tokens (a step of KJV verses: short texts of unequal length, as in
``make demo``), same optimizer for every variant, timed round-robin in one run:

* ``hf_sft``: the bare Hugging Face step: ``model(input_ids, attention_mask, labels).loss``
  on the padded micro-batch, backward, AdamW step;
* ``sft``, ``alm_sft``, ``alm_sft_gradmag``: xtd's steps as ``xtd train`` runs them (fused
  output layer, packed rows; GradMag's extra ``autograd.grad`` per loss through the output
  layer and last block) — targets: ALM+SFT ≤ 1.05×, ALM+SFT+GradMag ≤ 1.2× the bare step;
* ``*_materialised_padded`` and ``alm_sft_fused_padded``: the same losses with the
  model's own logits on padded rows, and with the fused output layer on padded rows:
  what the fused output layer and packing each buy;
* on the tiny student only: ``alm_sft_live_teacher_gradmag``, the reference's way (the
  teacher runs forward inside the step), and the loader's throughput.

Shapes: the 135M shape (SmolLM2-135M's config, random weights, GPT-2 tokenizer: 30
layers, hidden 576) and a tiny student (2 layers, hidden 128); ``--quick`` runs the tiny
one with a random 2-layer teacher. Run: ``python bench/train.py [--quick]``.
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

SMOLLM2_135M = dict(
    hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3
)  # SmolLM2-135M's config.json
TINY = dict(hidden=128, layers=2, intermediate=256, heads=4, kv_heads=2)


def _verses(n: int, skip: int = 0) -> list[str]:
    import json

    from xtd.assets import kjv_path

    with kjv_path().open(encoding="utf-8") as f:
        lines = [json.loads(line)["text"] for _, line in zip(range(skip + n), f, strict=False)]
    return lines[skip:]


def _random_llama(
    tokenizer: Any, folder: Path, *, hidden: int, layers: int, seed: int, intermediate: int = 0, heads: int = 4,
    kv_heads: int = 2,
) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
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


def _median_times(variants: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median CPU time and median wall time of each variant, timed round-robin.

    CPU time (``time.process_time``: every thread of this process) is what the ratios
    use: on a machine shared with other jobs, wall time mostly measures their load (a
    step waiting for a core accumulates wall time, not CPU time).
    """
    for fn in variants.values():
        fn()  # warm-up (AdamW state, allocator)
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    med = statistics.median
    return {n: med(v) for n, v in cpu.items()}, {n: med(v) for n, v in wall.items()}


def _measure_shape(
    name: str, shape: dict[str, int], tmp: Path, store: Path, student_tok: Any, texts_per_step: int, repeats: int,
    live: Any | None = None,
) -> dict[str, float]:
    """Median step time of every variant on one student shape (module docstring)."""
    from xtd.config import ALMSettings
    from xtd.examples import build_example, pad_examples
    from xtd.losses.registry import count_normalizers, loss_specs
    from xtd.model_parts import last_block_parameters
    from xtd.objective import Objective, choose_fused, choose_packing
    from xtd.storage import open_store
    from xtd.student import load_student

    reader = open_store(store)
    docs = [reader[d] for d in range(texts_per_step)]
    examples = [
        build_example(doc, student_tok, columns=[0, 1, 2, 3], max_student_length=256, max_teacher_length=None)
        for doc in docs
    ]
    batch = pad_examples(examples, pad_id=student_tok.pad_id or 0)
    student_dir = _random_llama(student_tok, tmp / f"student-{name}", seed=2, **shape)
    model = load_student(str(student_dir), lora_rank=0).model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    last_block = last_block_parameters(model)
    bmask = torch.as_tensor(student_tok.boundary_mask(), dtype=torch.bool)
    alm = ALMSettings(boundary_classes=("space", "newline", "tab", "special"))
    vocab = student_tok.vocab_size
    assert choose_fused(loss_specs(("alm", "sft")), model, vocab_size=vocab, sample_ids=batch["input_ids"][:1, :8])
    assert choose_packing(model, vocab_size=vocab)

    def step(names: tuple[str, ...], *, gradmag: bool = False, fused: bool = True, packed: bool = True,
             data: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        data = batch if data is None else data
        specs = loss_specs(names)
        objective = Objective(
            losses=specs, alm=alm, weights=dict.fromkeys(names, 1.0), boundary_mask=bmask, fused=fused, packed=packed
        )
        counts = count_normalizers(data, specs, alm)
        terms, _ = objective(model, data, {n: float(max(c, 1)) for n, c in counts.items()})
        loss, _ = objective.combine(terms, counts, last_block if gradmag else [])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def hf_sft() -> None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    variants = {
        "hf_sft": hf_sft,
        "sft": lambda: step(("sft",)),
        "alm_sft": lambda: step(("alm", "sft")),
        "alm_sft_gradmag": lambda: step(("alm", "sft"), gradmag=True),
        "sft_materialised_padded": lambda: step(("sft",), fused=False, packed=False),
        "alm_sft_materialised_padded": lambda: step(("alm", "sft"), fused=False, packed=False),
        "alm_sft_fused_padded": lambda: step(("alm", "sft"), packed=False),
    }
    if live is not None:
        variants["alm_sft_live_teacher_gradmag"] = lambda: step(("alm", "sft"), gradmag=True, data=live(batch, docs))
    timed, wall = _median_times(variants, repeats)
    tokens = int(batch["attention_mask"].sum())
    out = {f"{name}.step_cpu_s.{k}": v for k, v in timed.items()}
    out.update({f"{name}.step_wall_s.{k}": v for k, v in wall.items()})
    out[f"{name}.student_tokens_per_step"] = tokens
    out[f"{name}.padding_share_padded"] = 1.0 - tokens / batch["input_ids"].numel()
    packed_positions = Objective(
        losses=loss_specs(("sft",)), alm=alm, weights={"sft": 1.0}, boundary_mask=bmask, fused=True, packed=True
    ).forward_tokens(batch)
    out[f"{name}.padding_share_packed"] = 1.0 - tokens / packed_positions
    out[f"{name}.alm_sft_gradmag_tokens_per_cpu_s"] = tokens / timed["alm_sft_gradmag"]
    return out


def run(quick: bool = False) -> dict[str, Any]:
    from xtd.assets import embedded_teacher_dir
    from xtd.config import ALMSettings, DataSettings
    from xtd.data_plan import StepPlan
    from xtd.losses.registry import loss_specs
    from xtd.storage import open_store
    from xtd.teacher import load_teacher
    from xtd.tokenization import load_tokenizer
    from xtd.train_data import StepDataset, TrainData

    torch.manual_seed(0)
    texts_per_step = 16  # the demo's --batch-size
    repeats = 3
    tmp = Path(tempfile.mkdtemp(prefix="xtd-bench-train-"))
    teacher_tok = load_tokenizer("embedded:smollm2")
    student_tok = load_tokenizer("embedded:gpt2")
    teacher_dir = (
        _random_llama(teacher_tok, tmp / "teacher", hidden=64, layers=2, seed=1) if quick else embedded_teacher_dir()
    )
    teacher = load_teacher(str(teacher_dir), dtype="fp32", device="cpu")
    texts = _verses(texts_per_step * 3)
    store = tmp / "store"
    _write_store(store, teacher, texts, max_length=256)
    teacher_mask = torch.as_tensor(teacher_tok.boundary_mask(), dtype=torch.bool)

    def live(batch: dict[str, torch.Tensor], docs: list[Any]) -> dict[str, torch.Tensor]:
        # The reference's way: the teacher forward pass runs inside every step.
        n_texts, teacher_len = batch["teacher_logprob"].shape
        teacher_ids = torch.zeros(n_texts, teacher_len, dtype=torch.long)
        for i, doc in enumerate(docs):
            n = min(teacher_len, len(doc.token_ids))
            teacher_ids[i, :n] = torch.from_numpy(np.asarray(doc.token_ids[:n], dtype=np.int64))
        with torch.no_grad():
            mask = (batch["teacher_chunk"] >= -1).long()
            logits = teacher.model(input_ids=teacher_ids, attention_mask=mask, use_cache=False).logits
            logp = torch.log_softmax(logits[..., : teacher_tok.vocab_size].float(), dim=-1)  # (B, T, V_T)
            realised = logp[:, :-1].gather(-1, teacher_ids[:, 1:, None]).squeeze(-1)
            out = dict(batch)
            out["teacher_logprob"] = torch.cat([torch.zeros(n_texts, 1), realised], dim=1)
            out["teacher_sigma"] = torch.logsumexp(logp[..., teacher_mask], dim=-1).clamp(max=0.0)
        return out

    metrics = _measure_shape("tiny", TINY, tmp, store, student_tok, texts_per_step, 5, live=live)
    if not quick:
        metrics.update(_measure_shape("135m", SMOLLM2_135M, tmp, store, student_tok, texts_per_step, repeats))
    for shape_name in ("tiny",) if quick else ("tiny", "135m"):
        cpu = {k.rsplit(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{shape_name}.step_cpu_s.")}
        metrics[f"{shape_name}.hf_sft_tokens_per_cpu_s"] = metrics[f"{shape_name}.student_tokens_per_step"] / cpu["hf_sft"]

    # Loader throughput: whole steps of the same size, read + tokenised + aligned + padded.
    reader = open_store(store)
    spec = TrainData(
        stores=(str(store),),
        student_tokenizer=student_tok,
        plan=StepPlan((len(reader),), batch_size=texts_per_step, seed=0),
        data=DataSettings(batch_size=texts_per_step, max_student_length=256, long_documents="truncate"),
        alm=ALMSettings(boundary_classes=("space", "newline", "tab", "special")),
        losses=loss_specs(("alm", "sft")),
        micro_batch_size=texts_per_step,
    )
    dataset = StepDataset(spec)
    dataset[0]
    t0 = time.perf_counter()
    loader_tokens = sum(dataset[s]["student_tokens"] for s in range(1, 3))
    loader_tps = loader_tokens / (time.perf_counter() - t0)
    metrics["loader_tokens_per_s"] = loader_tps
    shape = "tiny" if quick else "135m"
    times = {k.rsplit(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{shape}.step_cpu_s.")}
    hf = times["hf_sft"]
    metrics["speedup_shards_vs_live_tiny"] = metrics["tiny.step_cpu_s.alm_sft_live_teacher_gradmag"] / metrics[
        "tiny.step_cpu_s.alm_sft_gradmag"
    ]
    for key in (
        "sft", "sft_materialised_padded", "alm_sft", "alm_sft_gradmag", "alm_sft_materialised_padded",
        "alm_sft_fused_padded",
    ):  # fmt: skip
        metrics[f"{shape}.ratio_to_hf_sft.{key}"] = times[key] / hf
    metrics[f"{shape}.gradmag_cost"] = times["alm_sft_gradmag"] / times["alm_sft"]
    teacher_name = "random 2-layer Llama (SmolLM2 tokenizer)" if quick else "SmolLM2-135M-Instruct"
    return result(
        "train",
        metrics=metrics,
        targets={
            f"alm_sft / hf_sft step time ({shape})": target(times["alm_sft"] / hf, "<=", 1.05, unit="×"),
            f"alm_sft+gradmag / hf_sft step time ({shape})": target(times["alm_sft_gradmag"] / hf, "<=", 1.2, unit="×"),
            "loader / step tokens per s": target(
                loader_tps / metrics[f"{shape}.alm_sft_gradmag_tokens_per_cpu_s"], ">=", 10.0, unit="×"
            ),
        },
        setup=(
            f"CPU, {torch.get_num_threads()} threads; teacher {teacher_name}; students with the GPT-2 tokenizer "
            f"(50,257): the 135M shape (SmolLM2-135M config, random weights) and a tiny one (2 layers, hidden 128); "
            f"{texts_per_step} KJV verses per step in one micro-batch; median of {repeats} steps (tiny: 5), "
            "variants timed round-robin; ratios of CPU time (process_time), wall times listed too"
        ),
    )


if __name__ == "__main__":
    main(run)
