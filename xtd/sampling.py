"""Seeded samples from a teacher: a fixed text set that measures how close a student is.

Bits per byte of a student on texts that the teacher itself sampled (ancestral
sampling at temperature 1, nothing truncated) estimates the cross-entropy
H(teacher) + KL(teacher ‖ student) per byte: the teacher's own score on the same file
is the entropy part, so the difference between a student and its teacher is a
distillation-fidelity measure that needs no labels.

The sample file is JSON lines, one sample per line, and ``xtd eval --text`` scores it
like any other text (the ``text`` field; the others describe the sample):

* ``index``: position in the file; sample ``i`` draws its tokens from a
  ``torch.Generator`` seeded with ``seed · 1_000_003 + i``, so its randomness does not
  depend on the other samples;
* ``prompt``: the text the sample continues (``""`` when unconditional); ``text`` is
  the prompt followed by the sampled continuation, so prompt bytes are scored too;
* ``num_tokens``: sampled teacher tokens; ``stop``: ``"eos"`` or ``"length"``;
* ``logprob``: the teacher's log-probability of its sampled tokens (nats, fp32).

Reproducibility: the same teacher weights, prompts, seed, token budget and batch size
give a byte-identical file on the same software (a different batch size changes the
padding and so, in the last bits, the logits).

Dimension letters: ``B`` samples in a batch, ``P`` prompt tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from xtd.errors import ConfigError
from xtd.runtime import resolve_device, resolve_dtype, torch_dtype
from xtd.student import load_causal_lm, model_tokenizer
from xtd.texts import read_prompts

__all__ = ["sample_texts", "write_samples", "teacher_samples", "SEED_STRIDE", "SAMPLE_BATCH"]

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003
"""Sample ``i`` of seed ``s`` uses generator seed ``s · SEED_STRIDE + i``."""
SAMPLE_BATCH = 8
"""Samples decoded together by ``xtd eval --sample-from`` (part of what fixes the file)."""


def _start_id(tokenizer: Any) -> int:
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is None:
        raise ConfigError(
            f"tokenizer {tokenizer.name!r} has neither a BOS nor an EOS token: a teacher sample needs a start token"
        )
    return int(start)


def _max_positions(model: torch.nn.Module) -> int | None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


@torch.inference_mode()
def sample_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    num_samples: int,
    max_new_tokens: int,
    seed: int = 0,
    prompts: Sequence[str] = (),
    batch_size: int = SAMPLE_BATCH,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Draw ``num_samples`` texts from ``model`` by ancestral sampling at temperature 1.

    Each sample starts from the tokenizer's BOS (its EOS when it has no BOS), followed by
    the prompt ``prompts[i % len(prompts)]`` when prompts are given, and stops at EOS or
    after ``max_new_tokens`` tokens. Tokens are drawn from the fp32 softmax over the
    tokenizer's ids (vocabulary padding excluded); the text is the UTF-8 decoding of the
    byte views (special tokens have none; invalid UTF-8 becomes U+FFFD).

    Args:
        model: a causal LM (``model(input_ids, attention_mask, position_ids,
            past_key_values, use_cache=True)``), in eval mode or not (set here).
        tokenizer: its :class:`xtd.tokenization.ByteTokenizer`.
        num_samples: how many samples.
        max_new_tokens: token budget per sample, after the prompt.
        seed: sample ``i`` uses generator seed ``seed · SEED_STRIDE + i``.
        prompts: texts to continue (cycled); empty = unconditional samples.
        batch_size: samples decoded together (left-padded prompts, one KV cache).
        progress: ``progress(description, advance, total)`` in samples.

    Returns:
        One record per sample (module docstring), in index order.

    Raises:
        ConfigError: bad counts, no start token, or prompt + budget beyond the model's positions.
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ConfigError(
            f"--num-samples ({num_samples}), --sample-tokens ({max_new_tokens}) and the batch size "
            f"({batch_size}) must all be at least 1"
        )
    start = _start_id(tokenizer)
    prompt_list = list(prompts) or [""]
    encoded = [tokenizer.encode(p).ids.astype(np.int64) for p in prompt_list]
    limit = _max_positions(model)
    longest = 1 + max(len(e) for e in encoded) + max_new_tokens
    if limit is not None and longest > limit:
        raise ConfigError(
            f"a prompt of {longest - 1 - max_new_tokens} tokens plus --sample-tokens ({max_new_tokens}) exceeds "
            f"the model's {limit} positions; use shorter prompts or fewer sample tokens"
        )
    vocab = int(tokenizer.vocab_size)
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    if progress is not None:
        progress("sampling", 0, num_samples)
    try:
        for first in range(0, num_samples, batch_size):
            indices = list(range(first, min(first + batch_size, num_samples)))
            prefixes = [np.concatenate([[start], encoded[i % len(encoded)]]) for i in indices]
            generators = [torch.Generator().manual_seed(seed * SEED_STRIDE + i) for i in indices]
            tokens, logprobs, stops = _decode(model, prefixes, generators, max_new_tokens, vocab, tokenizer.eos_id)
            for row, i in enumerate(indices):
                prompt = prompt_list[i % len(prompt_list)]
                raw = b"".join(tokenizer.token_bytes[t] for t in tokens[row])
                records.append(
                    {
                        "index": i,
                        "prompt": prompt,
                        "text": prompt + raw.decode("utf-8", errors="replace"),
                        "num_tokens": len(tokens[row]),
                        "stop": stops[row],
                        "logprob": round(logprobs[row], 6),
                    }
                )
            if progress is not None:
                progress("sampling", len(indices), num_samples)
    finally:
        model.train(was_training)
    return records


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def _decode(
    model: torch.nn.Module,
    prefixes: list[np.ndarray],
    generators: list[torch.Generator],
    max_new_tokens: int,
    vocab: int,
    eos_id: int | None,
) -> tuple[list[list[int]], list[float], list[str]]:
    """One batch of samples with a KV cache; returns per row the tokens (EOS excluded),
    their summed log-prob and the stop reason."""
    device = next(model.parameters()).device
    bsz, width = len(prefixes), max(len(p) for p in prefixes)
    ids = torch.zeros(bsz, width, dtype=torch.long)  # (B, P), left-padded
    mask = torch.zeros(bsz, width, dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        ids[row, width - len(prefix) :] = torch.from_numpy(prefix)
        mask[row, width - len(prefix) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = {_cache_keyword(model): DynamicCache(config=model.config)}  # filled in place
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
    logits = out.logits[:, -1]  # (B, V')
    tokens: list[list[int]] = [[] for _ in range(bsz)]
    total = [0.0] * bsz
    stops = ["length"] * bsz
    done = [False] * bsz
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for _ in range(max_new_tokens):
        logp = logits[:, :vocab].float().log_softmax(-1).cpu()  # (B, V)
        chosen = torch.empty(bsz, dtype=torch.long)
        for row in range(bsz):
            chosen[row] = torch.multinomial(logp[row].exp(), 1, generator=generators[row])[0]
            if done[row]:
                continue
            token = int(chosen[row])
            total[row] += float(logp[row, token])
            if eos_id is not None and token == eos_id:
                done[row], stops[row] = True, "eos"
            else:
                tokens[row].append(token)
        if all(done):
            break
        mask = torch.cat([mask, torch.ones(bsz, 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=chosen[:, None].to(device), attention_mask=mask, position_ids=next_pos, use_cache=True, **cache
        )
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens, total, stops


def write_samples(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write sample records as JSON lines, atomically (a temporary file, then a rename).

    Keys keep their order and floats their ``repr``, so equal records give equal bytes.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def teacher_samples(config: Any, *, progress: Callable[[str, int, int], None] | None = None) -> list[dict[str, Any]]:
    """What ``xtd eval --sample-from`` runs: load the teacher, sample, write ``--samples-out``.

    Args:
        config: an :class:`xtd.config.EvalConfig` with ``sample_from`` set.
        progress: ``progress(description, advance, total)``.

    Returns:
        The sample records (their ``text`` is what the models are then scored on).
    """
    import gc


    prompts = read_prompts(config.prompts) if config.prompts is not None else []
    tokenizer = model_tokenizer(config.sample_from)
    device = resolve_device(config.device)
    model = load_causal_lm(config.sample_from, dtype=torch_dtype(resolve_dtype(config.dtype, device))).to(device)
    records = sample_texts(
        model, tokenizer, num_samples=config.num_samples, max_new_tokens=config.sample_tokens,
        seed=config.sample_seed, prompts=prompts, progress=progress,
    )
    del model
    gc.collect()
    if config.samples_out is not None:
        path = write_samples(records, config.samples_out)
        logger.info("wrote %d teacher samples of %s to %s", len(records), config.sample_from, path)
    return records
