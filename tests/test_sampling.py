"""Teacher samples (xtd/sampling.py): seeded and reproducible, true to the teacher's
distribution, and scored by `xtd eval` through the same path as any text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xtd.cli import app
from xtd.errors import ConfigError
from xtd.sampling import sample_texts, write_samples
from xtd.texts import read_prompts

runner = CliRunner()


@pytest.fixture(scope="module")
def peaked_lm(tok_a, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose output is sharp enough that samples end at EOS now and then."""
    from conftest import make_tiny_llama
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llama(tok_a, tmp_path_factory.mktemp("peaked"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
        model.get_output_embeddings().weight.data[tok_a.eos_token_id] += 0.05
    model.save_pretrained(folder)
    return folder


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    from xtd.student import model_tokenizer

    return AutoModelForCausalLM.from_pretrained(folder), model_tokenizer(str(folder))


def _eval(args: list[str]):
    return runner.invoke(app, ["eval", *args])


def test_same_teacher_prompts_and_seed_give_a_byte_identical_file(peaked_lm: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("To be, or not\nIn the beginning\n\nA\n")
    args = ["--sample-from", str(peaked_lm), "--num-samples", "7", "--sample-tokens", "24", "--prompts", str(prompts)]
    first, second, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    for out, seed in ((first, "5"), (second, "5"), (other, "6")):
        result = _eval([*args, "--sample-seed", seed, "--samples-out", str(out)])
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
    records = [json.loads(line) for line in first.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(7))
    assert [r["prompt"] for r in records] == ["To be, or not", "In the beginning", "A"] * 2 + ["To be, or not"]
    for r in records:
        assert r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"])
        assert r["stop"] in ("eos", "length") and 0 < r["num_tokens"] <= 24 and r["logprob"] < 0


def test_sample_log_probs_are_the_teachers_teacher_forced_log_probs(peaked_lm: Path) -> None:
    # Left-padded prompts of different lengths and a KV cache must give exactly the
    # distribution a plain forward pass over [BOS] + prompt + sample gives.
    model, tok = _load(peaked_lm)
    prompts = ["", "Hello world, and", "x"]
    records = sample_texts(model, tok, num_samples=16, max_new_tokens=12, seed=0, prompts=prompts, batch_size=5)
    alone = sample_texts(model, tok, num_samples=16, max_new_tokens=12, seed=0, prompts=prompts, batch_size=1)
    assert [r["text"] for r in alone] == [r["text"] for r in records]  # a sample does not depend on its batch
    assert {r["stop"] for r in records} == {"eos", "length"}
    for r in records:
        prefix = [tok.bos_id, *tok.encode(r["prompt"]).ids.tolist()]
        full = prefix + _sampled_ids(model, tok, prefix, r) + ([tok.eos_id] if r["stop"] == "eos" else [])
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([full[:-1]])).logits[0].float().log_softmax(-1)  # predicts full[1:]
        expected = sum(float(logp[p - 1, full[p]]) for p in range(len(prefix), len(full)))
        assert r["logprob"] == pytest.approx(expected, abs=1e-4)


def _sampled_ids(model, tok, prefix: list[int], record: dict) -> list[int]:
    """The sampled ids, drawn again with the sample's own generator (a batch of one)."""
    from xtd.sampling import SEED_STRIDE, _decode

    g = torch.Generator().manual_seed(0 * SEED_STRIDE + record["index"])
    tokens, total, stops = _decode(model, [np.asarray(prefix)], [g], 12, tok.vocab_size, tok.eos_id)
    assert total[0] == pytest.approx(record["logprob"], abs=1e-5) and stops[0] == record["stop"]
    assert b"".join(tok.token_bytes[t] for t in tokens[0]).decode("utf-8", "replace") == record["text"][len(record["prompt"]):]
    return tokens[0]


def test_first_tokens_follow_the_teachers_distribution(tiny_lm: Path) -> None:
    from xtd.sampling import _decode

    model, tok = _load(tiny_lm)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)  # one likely token (p ≈ 0.4), a long tail
        probs = model(input_ids=torch.tensor([[tok.bos_id]])).logits[0, -1].float().softmax(-1).numpy()
    n, counts = 2000, np.zeros(len(probs))
    for first in range(0, n, 100):
        gens = [torch.Generator().manual_seed(first + k) for k in range(100)]
        tokens, _, stops = _decode(model, [np.asarray([tok.bos_id])] * 100, gens, 1, tok.vocab_size, tok.eos_id)
        for ids, stop in zip(tokens, stops, strict=True):
            counts[tok.eos_id if stop == "eos" else ids[0]] += 1
    # Pearson's chi-square over the 5 likeliest tokens and the rest (5 degrees of freedom):
    # 30 is exceeded with probability ≈ 1e-5 when the sampler is right.
    top = np.argsort(-probs)[:5]
    observed = np.append(counts[top], n - counts[top].sum())
    expected = n * np.append(probs[top], 1 - probs[top].sum())
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 30, (observed, expected)


def test_samples_are_scored_by_the_same_path_as_any_text(peaked_lm: Path, tiny_lm: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    common = ["--max-length", "16", "--stride", "8", "--json"]
    direct = _eval(["--sample-from", str(peaked_lm), "--num-samples", "5", "--sample-tokens", "30",
                    "--samples-out", str(out), "-m", str(tiny_lm), "-m", str(peaked_lm), *common])
    assert direct.exit_code == 0, direct.output
    again = _eval(["--text", str(out), "-m", str(tiny_lm), "-m", str(peaked_lm), *common])
    assert again.exit_code == 0, again.output
    rows, rows_again = json.loads(direct.stdout)["results"], json.loads(again.stdout)["results"]
    assert [r["bits_per_byte"] for r in rows] == [r["bits_per_byte"] for r in rows_again]
    assert rows[0]["num_bytes"] == sum(len(json.loads(x)["text"].encode()) for x in out.read_text().splitlines())
    # A random student is far from the teacher on the teacher's own samples.
    assert rows[0]["bits_per_byte"] > rows[1]["bits_per_byte"]


def test_write_samples_is_atomic_and_keeps_key_order(tmp_path: Path) -> None:
    path = write_samples([{"index": 0, "text": "é"}], tmp_path / "deep" / "s.jsonl")
    assert path.read_bytes() == '{"index": 0, "text": "é"}\n'.encode()
    assert [p.name for p in path.parent.iterdir()] == ["s.jsonl"]


def test_read_prompts(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n  two \n")
    assert read_prompts(txt) == ["one", "  two "]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"text": "a\\nb"}\n')
    assert read_prompts(jl) == ["a\nb"]


def test_sampling_refuses_a_budget_beyond_the_models_positions(tiny_lm: Path) -> None:
    model, tok = _load(tiny_lm)
    with pytest.raises(ConfigError, match="positions"):
        sample_texts(model, tok, num_samples=1, max_new_tokens=5000)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--prompts", "p.txt", "-m", "x"], "need --sample-from"),
        (["--sample-from", "x", "--text", "t.txt", "-m", "x"], "drop --text"),
        (["--sample-from", "x", "--num-samples", "0", "--samples-out", "o.jsonl"], "--num-samples (0)"),
        (["--sample-from", "x"], "nothing to evaluate"),
    ],
)
def test_bad_sampling_flags_give_one_error_line(args: list[str], phrase: str) -> None:
    result = _eval(args)
    assert result.exit_code == 1, result.output
    assert phrase in " ".join(result.output.split()) and "Traceback" not in result.output


def test_a_missing_prompt_file_fails_before_the_teacher_loads(tmp_path: Path) -> None:
    result = _eval(["--sample-from", "/no/such/teacher", "--prompts", str(tmp_path / "none.txt"),
                    "--samples-out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1 and "prompt file" in result.output and "Traceback" not in result.output
