"""Golden numbers: seeded tiny runs whose results must not move when the code is reorganised.

Each case runs real code end to end on CPU in float32 — training (every loss, GradMag and
fixed weights, both chunk kinds, LoRA and full fine-tuning, the alignment cache, a
hidden-size projection), a precompute (windows, top-k, hidden states) and an evaluation —
and compares what it measures with ``tests/golden/golden.json``: integers and digests
exactly, floats to 1e-5 relative (float32 reductions may round differently on another CPU;
on the machine that wrote the file they match exactly).

The file was written on the commit before the reorganisation of issue 13 and is never
rewritten by the suite; ``python tests/test_golden.py --write`` regenerates it after a
deliberate change of the maths.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

GOLDEN = Path(__file__).with_name("golden") / "golden.json"
# Timing fields of a metrics record: the only ones that depend on the machine's speed.
_TIMING = {"tokens_per_s", "step_time_s", "eta_s"}


def _texts(n: int = 8, chars: int = 400) -> list[str]:
    from _stores import corpus_texts

    return corpus_texts(n, chars)


def _metrics(run: Path, steps: int = 5) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in _TIMING} for r in records[:steps]]


def _train_cases(work: Path, tiny_lm: Path, tiny_lm_b: Path, wide_lm_b: Path) -> dict[str, Any]:
    from _stores import make_tiny_store

    from xtd.cli import app
    from xtd.config import TrainConfig
    from xtd.train import train

    store = make_tiny_store(work, tiny_lm, _texts(), top_k=4, hidden=True)
    same_tok = make_tiny_store(work, tiny_lm_b, _texts(), name="store_b", top_k=4)
    base = dict(
        lr=3e-3, max_steps=5, batch_size=4, micro_batch_size=2, max_student_length=48,
        checkpoint_every=0, warmup_steps=2,
    )  # fmt: skip
    cases = {
        # cross-tokenizer, every cross-tokenizer loss, GradMag, LoRA, long documents split
        "cross_all_losses": TrainConfig(
            store=(str(store),), student=str(tiny_lm_b), out=str(work / "a"), losses="alm+sft+uld+mined+latents",
            lora_rank=4, **base,
        ),
        # same tokenizer: KD with ALM, fixed weights, space chunks without merging, truncation,
        # full fine-tuning, cosine decay, a token budget per micro-batch
        "same_tok_kd_space": TrainConfig(
            store=(str(same_tok),), student=str(tiny_lm_b), out=str(work / "b"), losses="alm+kd",
            gradmag=False, loss_weights="alm=1,kd=0.5", alm_chunks="space", merge=False,
            long_documents="truncate", lora_rank=0, schedule="cosine", micro_batch_tokens=96, tau=5.0,
            distance="binary_kl", **base,
        ),
        # latents through a trained projection (student hidden 48, teacher 32); no debiasing
        "projection_no_debias": TrainConfig(
            store=(str(store),), student=str(wide_lm_b), out=str(work / "c"), losses="alm+latents",
            lora_rank=0, debias=False, boundary_classes=("space", "newline"), **base,
        ),
    }
    out: dict[str, Any] = {}
    for name, config in cases.items():
        result = train(config)
        out[name] = _metrics(result.out)
    # The alignment cache: xtd align --cache, then a run that reads it.
    from typer.testing import CliRunner

    cached = make_tiny_store(work, tiny_lm, _texts(), name="store_cached", top_k=0)
    runner = CliRunner()
    done = runner.invoke(app, ["align", "--cache", str(cached), "--student-tokenizer", str(tiny_lm_b)])
    assert done.exit_code == 0, done.output
    result = train(
        TrainConfig(
            store=(str(cached),), student=str(tiny_lm_b), out=str(work / "d"), losses="alm+sft",
            lora_rank=0, long_documents="truncate", **base,
        )
    )
    out["alignment_cache"] = _metrics(result.out)
    return out


def _array_digest(values: np.ndarray | None) -> str | list[float] | None:
    """Integer arrays: a digest of their bytes. Float arrays: the sums of their absolute values and squares
    (NaN rows left out) — another thread count may round single elements differently."""
    if values is None:
        return None
    values = np.ascontiguousarray(values)
    if np.issubdtype(values.dtype, np.floating):
        x = values.astype(np.float64)
        x = x[np.isfinite(x)]
        return [str(values.dtype), list(values.shape), float(np.abs(x).sum()), float((x * x).sum())]
    return hashlib.sha256(str(values.dtype).encode() + str(values.shape).encode() + values.tobytes()).hexdigest()[:16]


def _precompute_case(work: Path, tiny_lm: Path) -> dict[str, Any]:
    from xtd.config import PrecomputeConfig
    from xtd.precompute import precompute
    from xtd.storage import open_store

    data = work / "data.jsonl"
    texts = _texts(6, 600) + ["", "tabs\tand\nnewlines  ", "é ü 👍🏽"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = work / "precomputed"
    precompute(
        PrecomputeConfig(
            teacher=str(tiny_lm), data=str(data), out=str(out), top_k=4, hidden=True, max_length=48, stride=16,
            batch_tokens=256, dtype="fp32",
        )
    )
    reader = open_store(str(out))
    fields = ("token_ids", "token_spans", "token_logprob", "boundary_logmass", "topk_ids", "topk_logprobs",
              "tail_logmass", "hidden")  # fmt: skip
    docs = []
    for d in range(len(reader)):
        doc = reader[d]
        docs.append({"doc_index": int(doc.doc_index), **{f: _array_digest(getattr(doc, f)) for f in fields}})
    return {"num_tokens": int(reader.num_tokens), "documents": docs}


def _eval_case(work: Path, tiny_lm: Path, tiny_lm_b: Path) -> dict[str, Any]:
    from xtd.config import EvalConfig
    from xtd.evaluate import evaluate

    text = work / "heldout.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(4, 700)), encoding="utf-8")
    rows = evaluate(
        EvalConfig(model=(str(tiny_lm), str(tiny_lm_b)), text=str(text), max_length=32, stride=16, dtype="float32")
    )
    keep = ("num_texts", "num_bytes", "num_tokens", "nll_nats", "bits_per_byte")
    return {"rows": [{k: r.likelihood.to_dict()[k] for k in keep} for r in rows]}


def measure(work: Path, tiny_lm: Path, tiny_lm_b: Path, wide_lm_b: Path) -> dict[str, Any]:
    """Everything the golden file holds, measured now."""
    return {
        "train": _train_cases(work, tiny_lm, tiny_lm_b, wide_lm_b),
        "precompute": _precompute_case(work, tiny_lm),
        "eval": _eval_case(work, tiny_lm, tiny_lm_b),
    }


def _compare(now: Any, golden: Any, where: str, problems: list[str]) -> None:
    if isinstance(golden, dict):
        if not isinstance(now, dict) or set(now) != set(golden):
            problems.append(f"{where}: keys {sorted(now) if isinstance(now, dict) else now!r} != {sorted(golden)}")
            return
        for key in golden:
            _compare(now[key], golden[key], f"{where}.{key}", problems)
    elif isinstance(golden, list):
        if not isinstance(now, list) or len(now) != len(golden):
            problems.append(f"{where}: length {len(now) if isinstance(now, list) else now!r} != {len(golden)}")
            return
        for i, (a, b) in enumerate(zip(now, golden, strict=True)):
            _compare(a, b, f"{where}[{i}]", problems)
    elif isinstance(golden, float) and not isinstance(now, bool) and isinstance(now, int | float):
        if not (now == golden or math.isclose(now, golden, rel_tol=1e-5, abs_tol=1e-9)):
            problems.append(f"{where}: {now!r} != {golden!r}")
    elif now != golden:
        problems.append(f"{where}: {now!r} != {golden!r}")


def _exact_differences(now: Any, golden: Any, where: str = "") -> list[str]:
    if isinstance(golden, dict) and isinstance(now, dict):
        return [d for k in golden if k in now for d in _exact_differences(now[k], golden[k], f"{where}.{k}")]
    if isinstance(golden, list) and isinstance(now, list):
        return [d for i, (a, b) in enumerate(zip(now, golden, strict=False)) for d in _exact_differences(a, b, f"{where}[{i}]")]
    return [] if now == golden else [where]


@pytest.fixture(scope="module")
def wide_lm_b(tok_b, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """A random 2-layer Llama of hidden size 48 with tok_b (latents needs a projection to 32)."""
    from conftest import make_tiny_llama

    return make_tiny_llama(tok_b, tmp_path_factory.mktemp("wide_lm_b"), seed=2, hidden=48)


def test_golden_numbers_hold(tiny_lm: Path, tiny_lm_b: Path, wide_lm_b: Path, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    now = measure(tmp_path, tiny_lm, tiny_lm_b, wide_lm_b)
    problems: list[str] = []
    _compare(now, golden, "golden", problems)
    assert not problems, "\n".join(problems[:20])
    # Report (not fail on) float differences below the tolerance: another CPU may round so.
    inexact = _exact_differences(now, golden)
    if inexact:
        print(f"golden: {len(inexact)} values within tolerance but not bit-equal, e.g. {inexact[:3]}")


if __name__ == "__main__":  # python tests/test_golden.py --write
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden.py --write   (regenerates tests/golden/golden.json)")
    sys.path.insert(0, str(Path(__file__).parent))
    import conftest
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        toks = [
            PreTrainedTokenizerFast(
                tokenizer_file=str(conftest._train_bpe(size, root / f"tok{size}" / "tokenizer.json")),
                eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>",
            )
            for size in (400, 700)
        ]  # fmt: skip
        lm = conftest.make_tiny_llama(toks[0], root / "tiny_lm")
        lm_b = conftest.make_tiny_llama(toks[1], root / "tiny_lm_b", seed=1)
        wide = conftest.make_tiny_llama(toks[1], root / "wide_lm_b", seed=2, hidden=48)
        work = root / "work"
        work.mkdir()
        values = measure(work, lm, lm_b, wide)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(values, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
