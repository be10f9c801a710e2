"""xtd hypernet train: trains a hypernetwork from a store with no teacher model, is exact at
identity (base tokenizer, base model's own store: ALM ≈ 0), and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xtd.cli import app
from xtd.config import HypernetTrainConfig

runner = CliRunner()

_TIMING = ("tokens_per_s", "step_time_s", "eta_s", "sample_s", "data_s", "data_wait_s")


def _texts() -> list[str]:
    from _stores import corpus_texts

    return corpus_texts()


@pytest.fixture(scope="module")
def own_store(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    """A store written by the base model itself (tiny_lm over 8 texts)."""
    from _stores import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("hn-stores"), tiny_lm, _texts(), top_k=0)


@pytest.fixture(scope="module")
def orphan_store(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    """A store whose teacher folder no longer exists."""
    from _stores import make_tiny_store

    root = tmp_path_factory.mktemp("hn-orphan")
    teacher = shutil.copytree(tiny_lm, root / "teacher")
    store = make_tiny_store(root, teacher, _texts(), top_k=0)
    shutil.rmtree(teacher)
    return store


def _config(store: Path, model: Path, out: Path, **kwargs) -> HypernetTrainConfig:
    base = dict(
        store=(str(store),), model=str(model), out=str(out), lr=1e-3, warmup_steps=0, max_steps=4,
        batch_size=4, micro_batch_size=2, max_student_length=64, checkpoint_every=0, device="cpu",
        num_heads=4, num_layers=1, max_vocab=300,
        vocab_size_mean=600, vocab_size_std=100, vocab_size_min=400, vocab_size_max=800, max_whitespace_run=4,
    )  # fmt: skip
    base.update(kwargs)
    return HypernetTrainConfig(**base)


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in _TIMING} for line in lines]


def test_trains_from_a_store_whose_teacher_is_gone(orphan_store: Path, tiny_lm: Path, tmp_path: Path) -> None:
    from _stores import describe

    from xtd.hypernet.model import load_hypernet

    teacher = orphan_store.parent / "teacher"
    assert not teacher.exists() and str(teacher) in json.dumps(describe(orphan_store))  # the store names it
    out = tmp_path / "run"
    args = ["hypernet", "train", "--store", str(orphan_store), "--model", str(tiny_lm), "--out", str(out),
            "--max-steps", "3", "--batch-size", "4", "--max-student-length", "64", "--lr", "1e-3",
            "--num-heads", "4", "--num-layers", "1", "--max-vocab", "300", "--vocab-size-mean", "600",
            "--vocab-size-std", "100", "--vocab-size-min", "400", "--vocab-size-max", "800",
            "--max-whitespace-run", "4", "--device", "cpu", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["steps"] == 3 and np.isfinite(summary["losses"]["alm"])
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    sizes = {r["vocab_size"] for r in records}
    assert len(sizes) > 1 and all(400 <= v <= 800 for v in sizes)  # a tokenizer sampled per step
    assert all(r["bytes_per_token"] > 1.0 and r["predicted_tokens"] >= 300 for r in records)
    bundle = load_hypernet(out)  # the run folder holds a hypernetwork that reloads
    assert any(float(p.detach().abs().max()) > 0 for p in bundle.hypernet.out_proj.parameters())  # it trained


def test_identity_on_the_base_tokenizer_scores_alm_zero(own_store: Path, tiny_lm: Path, tmp_path: Path) -> None:
    from xtd.hypernet.train import train_hypernet

    config = _config(
        own_store, tiny_lm, tmp_path / "id", fixed_tokenizer=str(tiny_lm), max_vocab=0, max_steps=1,
        distance="binary_kl", losses="alm+sft",
    )  # fmt: skip
    result = train_hypernet(config)
    first = result.history[0]
    assert first["vocab_size"] == 400 and first["predicted_tokens"] == 400
    assert first["count_alm"] > 10
    assert abs(first["alm"]) < 1e-4  # the base model against its own store: zero up to storage precision
    assert first["sft"] > 1.0  # while the next-token loss of a random model is not
    # the same run on a sampled tokenizer is far from zero
    sampled = train_hypernet(_config(own_store, tiny_lm, tmp_path / "s", max_steps=1, distance="binary_kl"))
    assert sampled.history[0]["alm"] > 100 * max(abs(first["alm"]), 1e-6)


def test_kill_and_resume_give_the_uninterrupted_run(own_store: Path, tiny_lm: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from xtd.hypernet.train import train_hypernet

    whole = tmp_path / "whole"
    train_hypernet(_config(own_store, tiny_lm, whole, max_steps=5, checkpoint_every=2))

    class Killed(Exception):
        pass

    def kill_at_3(record) -> None:
        if record["step"] == 3:
            raise Killed

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train_hypernet(_config(own_store, tiny_lm, cut, max_steps=5, checkpoint_every=2), progress=kill_at_3)
    assert [r["step"] for r in _records(cut)] == [1, 2, 3]  # step 3 logged, its checkpoint not written
    result = runner.invoke(app, ["hypernet", "train", "--resume", "--out", str(cut)])
    assert result.exit_code == 0, result.output
    assert _records(cut) == _records(whole)
    a, b = load_file(str(whole / "hypernet.safetensors")), load_file(str(cut / "hypernet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_gives_one_error_line(own_store: Path, tiny_lm: Path, tmp_path: Path) -> None:
    def error(args: list[str], phrase: str) -> None:
        result = runner.invoke(app, ["hypernet", "train", *args])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert result.output.strip().startswith("error:"), result.output
        assert phrase in " ".join(result.output.split()), result.output

    common = ["--model", str(tiny_lm), "--out", str(tmp_path / "r")]
    error(["--store", str(tmp_path / "missing"), *common], "missing")
    error(["--store", str(own_store), *common, "--losses", "kd"], "--losses")
    error(["--store", str(own_store), *common, "--max-vocab", "-1"], "--max-vocab")


def test_help_ends_with_examples() -> None:
    result = runner.invoke(app, ["hypernet", "train", "--help"])
    assert result.exit_code == 0
    assert "Examples" in result.output and "xtd hypernet train --resume --out" in result.output


def test_train_init_from_a_hypernetwork_is_hypernet_apply(own_store: Path, tiny_lm: Path, tok_b_path: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from xtd.config import HypernetConfig
    from xtd.hypernet.model import build_hypernet, save_hypernet

    bundle = build_hypernet(tiny_lm, HypernetConfig(num_heads=4, num_layers=1), seed=3)
    with torch.no_grad():  # as if trained: not the identity
        bundle.hypernet.out_proj.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    folder = save_hypernet(bundle, tmp_path / "hn")
    applied = runner.invoke(app, ["hypernet", "apply", "--hypernet", str(folder), "--tokenizer", str(tok_b_path),
                                  "--out", str(tmp_path / "applied"), "--device", "cpu"])  # fmt: skip
    assert applied.exit_code == 0, applied.output
    trained = runner.invoke(app, ["train", "--store", str(own_store), "--student", str(tiny_lm), "--tokenizer",
                                  str(tok_b_path), "--init", f"hypernet:{folder}", "--max-steps", "0", "--lora-rank",
                                  "0", "--out", str(tmp_path / "student"), "--device", "cpu"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "applied").get_input_embeddings().weight
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "student").get_input_embeddings().weight
    assert a.shape[0] == 700 and torch.equal(a, b)
    fvt = runner.invoke(app, ["train", "--store", str(own_store), "--student", str(tiny_lm), "--tokenizer",
                              str(tok_b_path), "--max-steps", "0", "--lora-rank", "0", "--out", str(tmp_path / "fvt"),
                              "--device", "cpu"])  # fmt: skip
    assert fvt.exit_code == 0, fvt.output
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "fvt").get_input_embeddings().weight
    assert not torch.equal(a, c)  # FVT is another initialisation
    for args, phrase in ((["--init", f"hypernet:{folder}"], "--tokenizer"), (["--init", "zeros"], "--init")):
        result = runner.invoke(app, ["train", "--store", str(own_store), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.startswith("error:") and phrase in result.output, result.output


def test_predicted_lm_at_identity_is_the_base_model_with_a_soft_capped_head(tok_a, tok_a_path: Path, tmp_path: Path) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from xtd.config import HypernetConfig
    from xtd.hypernet.model import build_hypernet
    from xtd.hypernet.train import PredictedLM
    from xtd.tokenization import load_tokenizer

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tok_a), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0, pad_token_id=tok_a.pad_token_id,
        bos_token_id=tok_a.bos_token_id, eos_token_id=tok_a.eos_token_id,
    )  # fmt: skip
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma")
    tok_a.save_pretrained(tmp_path / "gemma")
    bundle = build_hypernet(tmp_path / "gemma", HypernetConfig(num_heads=4, num_layers=1))
    base = load_tokenizer(str(tok_a_path))
    model = PredictedLM(bundle.hypernet, bundle.model)
    model.pieces = torch.from_numpy(bundle.decompose(base).pieces)
    ids = torch.from_numpy(base.encode("To be, or not to be, that is the question").ids.astype(np.int64))[None]
    with torch.no_grad():
        got = model(ids, torch.ones_like(ids))
        want = bundle.model(input_ids=ids).logits
    assert float(want.abs().max()) < 3.0  # the cap is live
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
