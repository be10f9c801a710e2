"""Benchmark of ``xtd precompute``: throughput against the bare forward pass, flat memory.

Throughput (one process, one loaded teacher, the same documents and batches): the
*bare forward* runs ``model(input_ids, attention_mask).logits`` over exactly the
padded batches that :mod:`xtd.scoring` plans for these documents (length-sorted
windows packed to ``--batch-tokens``), and nothing else. *Precompute* is the whole
:func:`xtd.precompute.precompute` scoring loop — reading the data, tokenising, the
forward pass, full-vocabulary softmax statistics, top-k, hidden states, and writing
the store in the background thread — timed by its own ``seconds`` (teacher loading
excluded). Both count stored tokens; documents are shorter than the window, so no
token is forwarded twice. The machine is shared, so each precompute run is paired with
a bare run just before it and the median of the pair ratios is reported.

Memory: a fresh process per size runs precompute with a small random Llama (the
SmolLM2 tokenizer, vocab 49,152) over 1× and 4× the data and reports its peak RSS.

``python bench/precompute.py [--quick]`` prints one JSON line and a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import main, result, target  # noqa: E402

from xtd.config import PrecomputeConfig  # noqa: E402

MAX_LENGTH = 512


def _documents(num_tokens: int, tokenizer: Any, max_tokens: int) -> list[str]:
    """Embedded-corpus paragraphs of at most ``max_tokens`` tokens, ``num_tokens`` in all."""
    from xtd.assets import iter_embedded_corpus

    texts: list[str] = []
    total = 0
    for record in iter_embedded_corpus():
        for para in record["text"].split("\n\n"):
            if not para.strip():
                continue
            n = len(tokenizer.encode(para).ids)
            if n < 8 or n > max_tokens:
                continue
            texts.append(para)
            total += n
            if total >= num_tokens:
                return texts
    return texts


def _bare_forward_tokens_per_s(teacher: Any, texts: list[str], batch_tokens: int) -> float:
    """Stored tokens per second of the model's own forward over xtd's batches."""
    from xtd.packing import pack_longest_first

    encs = teacher.tokenizer.encode_batch(texts, add_special_tokens=True)
    ids = [e.ids for e in encs]
    lengths = [len(x) for x in ids]
    batches = pack_longest_first(lengths, max_tokens=batch_tokens)
    tensors = []
    for batch in batches:
        width = max(lengths[i] for i in batch)
        inp = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, i in enumerate(batch):
            inp[row, : lengths[i]] = ids[i]
            mask[row, : lengths[i]] = 1
        tensors.append((torch.from_numpy(inp).to(teacher.device), torch.from_numpy(mask).to(teacher.device)))
    started = time.perf_counter()
    with torch.inference_mode():
        for inp, mask in tensors:
            teacher.model(input_ids=inp, attention_mask=mask, use_cache=False).logits  # noqa: B018
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(lengths) / (time.perf_counter() - started)


def _precompute_tokens_per_s(teacher_spec: str, data: Path, out: Path, batch_tokens: int, **settings: Any) -> float:
    from xtd.precompute import precompute

    config = PrecomputeConfig(
        teacher=teacher_spec,
        data=str(data),
        out=str(out),
        max_length=MAX_LENGTH,
        stride=MAX_LENGTH // 4,
        batch_tokens=batch_tokens,
        overwrite=True,
        **settings,
    )
    res = precompute(config)
    return res.tokens_per_s


_RSS_SCRIPT = """
import json, resource, sys
from xtd.config import PrecomputeConfig
from xtd.precompute import precompute
res = precompute(PrecomputeConfig(teacher=sys.argv[1], data=sys.argv[2], out=sys.argv[3], top_k=32,
                                  batch_tokens=1024, max_length=512, stride=128, overwrite=True))
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "tokens": res.tokens, "tokens_per_s": res.tokens_per_s}))
"""


def _peak_rss(teacher_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(teacher_dir), str(data), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _small_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from xtd.tokenization import load_tokenizer

    tok = load_tokenizer("embedded:smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(folder)
    return folder


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def run(quick: bool = False) -> dict[str, Any]:
    """Measure precompute/bare-forward throughput ratios and peak RSS at 1× vs 4× data."""
    from xtd.teacher import load_teacher

    on_cuda = torch.cuda.is_available()
    num_tokens = (8192 if quick else 65536) if on_cuda else (768 if quick else 3072)
    batch_tokens = 8192 if on_cuda else 1024
    repeats = 2 if quick else 3
    teacher = load_teacher()
    texts = _documents(num_tokens, teacher.tokenizer.hf.backend_tokenizer, MAX_LENGTH)
    metrics: dict[str, Any] = {"device": str(teacher.device), "dtype": teacher.dtype, "batch_tokens": batch_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _write_jsonl(root / "data.jsonl", texts)
        metrics["tokens"] = sum(len(e.ids) for e in teacher.tokenizer.encode_batch(texts, add_special_tokens=True))
        cases = {"topk0": {"top_k": 0}, "topk32": {"top_k": 32}, "topk32_hidden": {"top_k": 32, "hidden": True}}
        # The machine is shared and its load drifts: pair every precompute run with a bare
        # forward run right before it and report the median of the pair ratios.
        ratios: dict[str, list[float]] = {name: [] for name in cases}
        best = dict.fromkeys(cases, 0.0)
        bare = 0.0
        _bare_forward_tokens_per_s(teacher, texts[:4], batch_tokens)  # warm-up
        for _ in range(repeats):
            for name, settings in cases.items():
                base = _bare_forward_tokens_per_s(teacher, texts, batch_tokens)
                tps = _precompute_tokens_per_s("embedded:smollm2", data, root / f"store_{name}", batch_tokens, **settings)
                ratios[name].append(tps / base)
                bare = max(bare, base)
                best[name] = max(best[name], tps)
        metrics["bare_forward_tokens_per_s"] = bare
        for name in cases:
            metrics[f"precompute_{name}_tokens_per_s"] = best[name]
            metrics[f"ratio_{name}"] = float(np.median(ratios[name]))
            metrics[f"ratio_{name}_runs"] = [round(r, 3) for r in ratios[name]]
        if not on_cuda:
            fast = load_teacher(dtype="bf16")
            bf16 = max(_bare_forward_tokens_per_s(fast, texts, batch_tokens) for _ in range(repeats))
            metrics["cpu_bf16_autocast_forward_speedup"] = bf16 / bare
            del fast
        # Flat memory: a small random Llama over 1× and 4× the data, a fresh process each.
        teacher_dir = _small_llama(root / "small_llama")
        per_doc = texts * (2 if quick else 8)
        small = _write_jsonl(root / "x1.jsonl", per_doc)
        large = _write_jsonl(root / "x4.jsonl", per_doc * 4)
        rss1 = _peak_rss(teacher_dir, small, root / "rss1")
        rss4 = _peak_rss(teacher_dir, large, root / "rss4")
        metrics["rss_1x_mb"] = rss1["peak_rss_mb"]
        metrics["rss_4x_mb"] = rss4["peak_rss_mb"]
        metrics["rss_tokens_1x"] = rss1["tokens"]
        metrics["rss_tokens_4x"] = rss4["tokens"]
        metrics["rss_ratio"] = rss4["peak_rss_mb"] / rss1["peak_rss_mb"]
    setup = (
        f"embedded SmolLM2-135M-Instruct on {metrics['device']} ({metrics['dtype']}), "
        f"{metrics['tokens']} tokens of embedded-corpus paragraphs (< {MAX_LENGTH} tokens each), "
        f"batch {batch_tokens} tokens, median of {repeats} paired runs; memory: random 2-layer Llama (hidden 64, "
        f"vocab 49,152), {metrics['rss_tokens_1x']} vs {metrics['rss_tokens_4x']} tokens"
    )
    return result(
        "precompute",
        metrics=metrics,
        targets={
            "precompute / bare forward, top-k 0": target(metrics["ratio_topk0"], ">=", 0.95),
            "peak RSS 4x data / 1x data": target(metrics["rss_ratio"], "<=", 1.1),
        },
        setup=setup,
    )


if __name__ == "__main__":
    main(run)
