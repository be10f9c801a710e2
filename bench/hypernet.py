"""Hypernetwork training step: tokenizer sampling and per-step preparation vs the step itself.

Every ``xtd hypernet train`` step samples a tokenizer, tokenizes the step's texts with it,
decomposes its vocabulary into base tokens and aligns the texts with the teacher's spans
before the hypernetwork and the frozen model run. This benchmark times, per step and
within one run:

* ``sample``: :meth:`TokenizerSampler.observe` on the step's texts + :meth:`sample`;
* ``prepare``: :func:`xtd.hypernet.prepare_step` (tokenize, choose and decompose the
  vocabulary);
* ``align``: :func:`xtd.align.align_many` of the texts' sampled-tokenizer spans with the
  base tokenizer's spans (the teacher's, as a store holds them);
* ``train``: one optimizer step of the hypernetwork: predict the sampled vocabulary's
  embeddings, run the frozen base model on them, next-token cross-entropy over the
  sampled vocabulary, backward, AdamW (an SFT step: the ALM terms only add to it, so the
  ratio below is an upper bound).

Target: (sample + prepare + align) ≤ 10% of the training step at the size of the Table 1
miniature (base: Llama hidden 128, 4 layers, byte-level BPE 2,048; 16 passages of ≈ 320
bytes per step, ≤ 128 tokens each; sampled vocabularies 2,048 ± 512). Also reported, with
no target: the same preparation at the paper's size (SmolLM2's tokenizer as the base,
vocabularies 32,768 ± 8,192, 64 texts of 2,000 characters). Run:
``python bench/hypernet.py [--quick]``.
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


def _passages(n: int, chars: int, skip: int = 0) -> list[str]:
    from xtd.assets import iter_embedded_corpus

    out: list[str] = []
    for record in iter_embedded_corpus():
        text = record["text"]
        for start in range(0, len(text) - chars, chars):
            out.append(text[start : start + chars])
        if len(out) >= skip + n:
            break
    return out[skip : skip + n]


def _base_model(folder: Path, texts: list[str], *, vocab: int, hidden: int, layers: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtd.tokenization import load_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(texts, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    tok = load_tokenizer(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(folder)
    return folder


def _prepare(sampler: Any, decomposer: Any, texts: list[str], rng: np.random.Generator, max_tokens: int) -> dict[str, Any]:
    """One step's preparation, each phase timed."""
    from xtd.align import align_many
    from xtd.hypernet import prepare_step

    t0 = time.perf_counter()
    sampler.observe(texts)
    drawn = sampler.sample(rng)
    t1 = time.perf_counter()
    step = prepare_step(drawn.tokenizer, decomposer, texts)
    t2 = time.perf_counter()
    teacher = decomposer.base.encode_batch(texts)  # in training: the store's spans
    align_many([(t.spans, s.spans) for t, s in zip(teacher, step.encodings, strict=True)])
    t3 = time.perf_counter()
    local = [ids[:max_tokens] for ids in step.local_ids]
    return {"sample": t1 - t0, "prepare": t2 - t1, "align": t3 - t2, "step": step, "local": local, "drawn": drawn}


def run(quick: bool = False) -> dict[str, Any]:
    from xtd.hypernet import (
        Decomposer,
        HypernetConfig,
        SamplerConfig,
        TokenizerSampler,
        build_hypernet,
    )
    from xtd.tokenization import load_tokenizer

    steps, warm = (4, 4) if quick else (12, 16)
    batch, chars, max_tokens = 16, 320, 128
    tmp = Path(tempfile.mkdtemp(prefix="xtd-bench-hypernet-"))
    corpus = _passages(4000, chars)
    folder = _base_model(tmp / "base", corpus, vocab=2048, hidden=128, layers=4)
    bundle = build_hypernet(folder, HypernetConfig())
    hypernet, model = bundle.hypernet, bundle.model
    hypernet.train()
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=1e-4)
    hidden = bundle.layout.hidden_size
    sampler = TokenizerSampler(bundle.tokenizer, SamplerConfig(vocab_size_mean=2048, vocab_size_std=512, vocab_size_min=1024, vocab_size_max=4096))
    texts = _passages((warm + steps + 1) * batch, chars, skip=4000)
    for i in range(warm):  # a window in its steady state
        sampler.observe(texts[i * batch : (i + 1) * batch])

    def train_step(prep: dict[str, Any]) -> float:
        step = prep["step"]
        t0 = time.perf_counter()
        rows = hypernet(torch.from_numpy(step.decomposition.pieces))  # (U, H)
        length = max(ids.shape[0] for ids in prep["local"])
        ids = torch.zeros(len(prep["local"]), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, local in enumerate(prep["local"]):
            ids[i, : local.shape[0]] = torch.from_numpy(local)
            mask[i, : local.shape[0]] = 1
        states = model.base_model(inputs_embeds=rows[ids, :hidden], attention_mask=mask).last_hidden_state
        logits = states @ rows[:, :hidden].T  # (B, S, U)
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    phases: dict[str, list[float]] = {"sample": [], "prepare": [], "align": [], "train": []}
    vocab, bpt, tokens = [], [], []
    for s in range(steps + 1):
        rng = np.random.default_rng([0, s])
        prep = _prepare(sampler, bundle.decomposer, texts[(warm + s) * batch : (warm + s + 1) * batch], rng, max_tokens)
        seconds = train_step(prep)
        if s == 0:
            continue  # warm-up: allocator, AdamW state
        for name in ("sample", "prepare", "align"):
            phases[name].append(prep[name])
        phases["train"].append(seconds)
        vocab.append(prep["drawn"].tokenizer.vocab_size)
        bpt.append(prep["step"].stats["bytes_per_token"])
        tokens.append(sum(ids.shape[0] for ids in prep["local"]))
    med = {name: statistics.median(values) for name, values in phases.items()}
    overhead = med["sample"] + med["prepare"] + med["align"]

    # The paper's size: SmolLM2's tokenizer as base, 32k ± 8k vocabularies, 64 texts of 2,000 chars.
    big_batch, big_chars, big_steps = (16, 1000, 2) if quick else (64, 2000, 4)
    smollm2 = load_tokenizer("embedded:smollm2")
    big_sampler = TokenizerSampler(smollm2, SamplerConfig())
    big_decomposer = Decomposer(smollm2)
    big_texts = _passages((8 + big_steps) * big_batch, big_chars)
    for i in range(8):  # a warm window, and a warm decomposition cache
        chunk = big_texts[i * big_batch : (i + 1) * big_batch]
        big_sampler.observe(chunk)
        if i >= 6:
            big_decomposer(big_sampler.sample(np.random.default_rng([2, i])).tokenizer)
    big: dict[str, list[float]] = {"sample": [], "prepare": [], "align": []}
    for s in range(big_steps):
        chunk = big_texts[(8 + s) * big_batch : (9 + s) * big_batch]
        prep = _prepare(big_sampler, big_decomposer, chunk, np.random.default_rng([1, s]), 512)
        for name in big:
            big[name].append(prep[name])

    metrics = {
        "sample_s": med["sample"],
        "prepare_s": med["prepare"],
        "align_s": med["align"],
        "train_step_s": med["train"],
        "sample_share_of_step": med["sample"] / med["train"],
        "sampled_vocab_size_mean": float(np.mean(vocab)),
        "sampled_vocab_size_range": f"{min(vocab)}–{max(vocab)}",
        "bytes_per_token_mean": float(np.mean(bpt)),
        "tokens_per_step_mean": float(np.mean(tokens)),
        "paper_size_sample_s": statistics.median(big["sample"]),
        "paper_size_prepare_s": statistics.median(big["prepare"]),
        "paper_size_align_s": statistics.median(big["align"]),
    }
    return result(
        "hypernet",
        metrics=metrics,
        targets={
            "sampling+preparation+alignment / hypernetwork step": target(overhead / med["train"], "<=", 0.10, unit="×"),
        },
        setup=(
            f"CPU, {torch.get_num_threads()} threads; base random Llama hidden 128, 4 layers, BPE 2,048 (tied); "
            f"hypernetwork 3 layers, 16 heads, width 128, ≤ 8 pieces; {batch} passages × ≤ {max_tokens} tokens "
            f"per step; whole sampled vocabulary predicted; median of {steps} steps after a {warm}-batch window"
        ),
    )


if __name__ == "__main__":
    main(run)
