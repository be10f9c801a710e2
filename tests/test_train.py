"""The training loop (xtd/train.py): schedule, config validation, checkpoints, and end-to-end
runs on a tiny real teacher store (loss goes down, exact resume, DDP equivalence, bad input)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xtd.checkpoint import RunCounters, truncate_metrics
from xtd.config import TrainConfig
from xtd.errors import ConfigError
from xtd.train import (
    format_line,
    latest_checkpoint,
    lr_at,
    save_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- schedule


def _lr_ref(step: int, lr: float, warmup: int, total: int, schedule: str) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (1 - frac) if schedule == "linear" else lr * (1 + math.cos(math.pi * frac)) / 2


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 10), (3, 10), (9, 10), (100, 1000)])
def test_lr_at_matches_reference(schedule: str, warmup: int, total: int) -> None:
    values = [lr_at(s, lr=3e-4, warmup_steps=warmup, max_steps=total, schedule=schedule) for s in range(total)]
    for s, v in enumerate(values):
        assert v == pytest.approx(_lr_ref(s, 3e-4, warmup, total, schedule), rel=1e-12, abs=1e-18)
    assert all(0 < v <= 3e-4 for v in values[:-1]) or total == 1
    if warmup:
        assert values[warmup - 1] == pytest.approx(3e-4)  # peak at the last warm-up step
        assert all(a < b for a, b in zip(values[:warmup], values[1:warmup], strict=False))
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1 :], strict=False))  # decays


# ----------------------------------------------------------------------------- config


def test_config_defaults_follow_the_spec() -> None:
    c = TrainConfig(store=("s",), out="o")
    assert c.loss_names() == ("alm", "sft") and c.gradmag and c.debias and c.merge
    assert (c.merge_threshold, c.tau, c.distance, c.alm_chunks) == (0.1, 100.0, "binary_ce", "unconstrained")
    assert (c.lora_rank, c.lr, c.weight_decay, c.batch_size, c.max_student_length) == (64, 1e-5, 0.0, 64, 512)
    assert c.resolved_warmup_steps() == 2000 and c.max_steps == 20000
    assert TrainConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"warmup_steps": 5000, "max_steps": 2000}, "--warmup-steps (5000) must be smaller than --max-steps (2000)"),
        ({"losses": "alm+foo"}, "unknown loss 'foo'"),
        ({"losses": "alm_unbiased"}, "unknown loss"),
        ({"losses": "alm+alm"}, "names a loss twice"),
        ({"loss_weights": "kd=2"}, "--loss-weights item 'kd=2'"),
        ({"loss_weights": "alm=-1"}, "WEIGHT ≥ 0"),
        ({"alm_chunks": "unbiased"}, "--alm-chunks must be unconstrained or space"),
        ({"boundary_classes": ("space", "comma")}, "'comma'"),
        ({"micro_batch_size": 8, "batch_size": 4}, "--micro-batch-size (8) must not exceed --batch-size (4)"),
        ({"resume": True, "overwrite": True}, "exclude each other"),
        ({"schedule": "step"}, "--schedule must be linear or cosine"),
        ({"long_documents": "drop"}, "--long-documents must be split or truncate"),
        ({"micro_batch_tokens": 0}, "--micro-batch-tokens (0)"),
        ({"lora_rank": -1}, "--lora-rank (-1)"),
    ],
)
def test_config_validation_names_the_flag(kwargs: dict, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(store=("s",), out="o", **kwargs)
    assert phrase in str(info.value)


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(store=("s",), out="o", lr=-1.0, batch_size=0, schedule="x")
    assert all(p in str(info.value) for p in ("--lr", "--batch-size", "--schedule"))


def test_loss_weights_parse() -> None:
    c = TrainConfig(store=("s",), out="o", losses="alm+sft+kd", loss_weights="sft=0.5, kd=2")
    assert c.loss_weight_map() == {"alm": 1.0, "sft": 0.5, "kd": 2.0}


# ----------------------------------------------------------------------------- checkpoints and logs


def test_checkpoint_is_atomic_and_latest_wins(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    cfg = TrainConfig(store=("s",), out=str(tmp_path))
    save_checkpoint(tmp_path, 2, model, opt, cfg, RunCounters(tokens=5))
    (tmp_path / "checkpoints" / ".tmp-step-00000004-1").mkdir()  # a writer killed mid-way
    save_checkpoint(tmp_path, 3, model, opt, cfg, RunCounters(tokens=9))
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000003"
    assert {p.name for p in latest.iterdir()} == {"trainable.pt", "optimizer.pt", "state.pt", "config.json"}
    state = torch.load(latest / "state.pt", weights_only=True)  # tensors and numbers only
    assert state["step"] == 3 and state["data_position"] == 3 and state["counters"] == {"tokens": 9, "documents": 0, "elapsed_s": 0.0}
    assert json.loads((latest / "config.json").read_text())["out"] == str(tmp_path)
    weights = torch.load(latest / "trainable.pt")
    assert torch.equal(weights["weight"], model.weight.detach())


class _Payload:
    """Pickles to ``os.system("touch <marker>")``: what a crafted state.pt would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    from xtd.checkpoint import load_checkpoint
    from xtd.errors import CheckpointError

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    cfg = TrainConfig(store=("s",), out=str(tmp_path))
    ckpt = save_checkpoint(tmp_path, 2, model, opt, cfg, RunCounters(tokens=5))
    assert load_checkpoint(ckpt, cfg).step == 2  # an xtd checkpoint loads with weights_only=True
    marker = tmp_path / "PWNED"
    torch.save({"step": 2, "counters": {}, "rng": _Payload(marker)}, ckpt / "state.pt")
    with pytest.raises(CheckpointError, match=r"cannot be loaded safely.*unsupported GLOBAL \w+\.system"):
        load_checkpoint(ckpt, cfg)
    assert not marker.exists()
    with open(ckpt / "state.pt", "rb") as fh:  # the payload is real: plain pickle would run it
        torch.load(fh, weights_only=False)
    assert marker.exists()


def test_truncate_metrics_drops_replayed_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')  # cut by a kill
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_log_line_format() -> None:
    record = {"step": 120, "max_steps": 2000, "loss": 2.3141, "alm": 1.9212, "sft": 0.3929, "lr": 3e-4, "tokens_per_s": 8100.0}
    assert format_line(record, ("alm", "sft")) == "step 120/2000 | loss 2.314 (alm 1.921, sft 0.393) | lr 3.0e-04 | 8.1k tok/s"


# ----------------------------------------------------------------------------- end to end on a tiny store


def _texts() -> list[str]:
    from _stores import corpus_texts

    return corpus_texts()


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    """A complete store of the tiny tok_a teacher over 8 short texts (top-4, no hidden)."""
    from _stores import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("stores"), tiny_lm, _texts())


def _config(store: Path, student: Path, out: Path, **kwargs) -> TrainConfig:
    base = dict(
        store=(str(store),),
        student=str(student),
        out=str(out),
        lora_rank=0,
        lr=3e-3,
        warmup_steps=0,
        max_steps=4,
        batch_size=4,
        micro_batch_size=2,
        max_student_length=64,
        checkpoint_every=0,
    )
    base.update(kwargs)
    return TrainConfig(**base)


def test_training_lowers_the_alm_loss(tiny_store: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    # Cross-tokenizer: tok_a teacher, tok_b student; every step sees all 8 texts (whole:
    # truncated, not split, so that the steps' losses compare).
    config = _config(
        tiny_store, tiny_lm_b, tmp_path / "run", losses="alm", max_steps=20, batch_size=8, lr=1e-2,
        long_documents="truncate",
    )
    result = train(config)
    alm = [r["alm"] for r in result.history]
    assert len(alm) == 20 and all(math.isfinite(v) for v in alm)
    assert result.history[0]["count_alm"] > 20  # chunks were actually scored
    # binary_ce floors at the teacher's binary entropy; its excess, the binary KL, floors at 0.
    kl = [r["alm_binary_kl"] for r in result.history]
    assert alm[-1] < alm[0] and sum(kl[-5:]) < 0.5 * sum(kl[:5]), kl
    # The run folder: a loadable HF model, metrics and the final checkpoint.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.out)
    tok = AutoTokenizer.from_pretrained(result.out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert "alm" in (result.out / "README.md").read_text() and str(tiny_store) in (result.out / "README.md").read_text()
    assert latest_checkpoint(result.out).name == "step-00000020"


# ----------------------------------------------------------------------------- kill -9, then --resume

_SLOW_CLI = """
import sys, time
import xtd.train
_train = xtd.train.train
def _slow_train(config, *, progress=None):  # slow each step (through the progress callback) to kill mid-run
    def slowly(record):
        time.sleep(0.25)
        if progress is not None:
            progress(record)
    return _train(config, progress=slowly)
xtd.train.train = _slow_train
from xtd.cli import main
sys.argv = ["xtd", *sys.argv[1:]]
main()
"""


def _cli_args(config: TrainConfig) -> list[str]:
    return [
        "train", "--store", config.store[0], "--student", config.student, "--out", config.out,
        "--losses", config.losses, "--lora-rank", str(config.lora_rank), "--lr", str(config.lr),
        "--warmup-steps", str(config.warmup_steps), "--max-steps", str(config.max_steps),
        "--batch-size", str(config.batch_size), "--micro-batch-size", str(config.micro_batch_size),
        "--max-student-length", str(config.max_student_length), "--checkpoint-every", str(config.checkpoint_every),
    ]  # fmt: skip


def _metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_store: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from xtd.cli import app

    kwargs = dict(losses="alm+sft", max_steps=9, warmup_steps=2, checkpoint_every=3, lr=1e-2)
    reference = train(_config(tiny_store, tiny_lm_b, tmp_path / "straight", **kwargs))
    killed = _config(tiny_store, tiny_lm_b, tmp_path / "killed", **kwargs)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *_cli_args(killed)], env=env, stderr=subprocess.PIPE)
    first = Path(killed.out) / "checkpoints" / "step-00000003"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup runs
    _, stderr = proc.communicate()
    assert first.exists(), stderr.decode()[-2000:]
    done_before = max(_metrics(Path(killed.out)))
    assert done_before < 9, "the run finished before it could be killed"

    result = CliRunner().invoke(app, [*_cli_args(killed), "--resume"])
    assert result.exit_code == 0, result.output
    resumed = _metrics(Path(killed.out))
    assert sorted(resumed) == list(range(1, 10))
    for step in range(4, 10):  # every step after the last checkpoint was replayed exactly
        for key in ("loss", "alm", "sft", "lr"):
            assert resumed[step][key] == pytest.approx(reference.history[step - 1][key], abs=1e-5, rel=0), (step, key)


# ----------------------------------------------------------------------------- two DDP ranks (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, config: TrainConfig) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    train(config)


def test_two_gloo_ranks_give_the_single_rank_first_step_loss(tiny_store: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    kwargs = dict(losses="alm+sft", max_steps=1, batch_size=8, micro_batch_size=2)
    single = train(_config(tiny_store, tiny_lm_b, tmp_path / "one", **kwargs))
    ddp = _config(tiny_store, tiny_lm_b, tmp_path / "two", **kwargs)
    mp.spawn(_ddp_worker, args=(2, _free_port(), ddp), nprocs=2, join=True)
    two = _metrics(Path(ddp.out))[1]
    one = single.history[0]
    assert two["count_alm"] == one["count_alm"] and two["count_sft"] == one["count_sft"]
    for key in ("loss", "alm", "sft"):
        assert two[key] == pytest.approx(one[key], abs=1e-5, rel=1e-5), key


def test_token_budget_micro_batches_give_the_same_step(tiny_store: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    # Without GradMag: its weights come from each micro-batch's own gradients, so only
    # the loss (not the gradient) is independent of the cut when it is on.
    kwargs = dict(losses="alm+sft", max_steps=1, batch_size=8, micro_batch_size=8, gradmag=False)
    whole = train(_config(tiny_store, tiny_lm_b, tmp_path / "whole", **kwargs)).history[0]
    packed = train(_config(tiny_store, tiny_lm_b, tmp_path / "packed", micro_batch_tokens=48, **kwargs)).history[0]
    assert packed["count_alm"] == whole["count_alm"] and packed["count_sft"] == whole["count_sft"]
    for key in ("loss", "alm", "sft", "grad_norm"):
        assert packed[key] == pytest.approx(whole[key], abs=1e-5, rel=1e-5), key


def test_long_documents_are_split_into_more_texts(tiny_store: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    # At 8 student tokens per text most of the 8 texts are too long: split makes pieces
    # (more texts per epoch), truncate keeps one text per document.
    kwargs = dict(losses="alm+sft", max_steps=2, batch_size=4, micro_batch_size=4, max_student_length=8)
    split = train(_config(tiny_store, tiny_lm_b, tmp_path / "split", **kwargs)).history
    cut = train(_config(tiny_store, tiny_lm_b, tmp_path / "cut", long_documents="truncate", **kwargs)).history
    assert cut[-1]["epoch"] == pytest.approx(1.0)  # 2 steps × 4 texts = the 8 documents
    assert split[-1]["epoch"] < 0.7  # the same 8 texts are a part of the pieces
    assert all(math.isfinite(r["loss"]) for r in split)


# ----------------------------------------------------------------------------- SmolLM2 → GPT-2 tokenizer


@pytest.mark.slow
def test_smollm2_moves_to_the_gpt2_tokenizer(tmp_path: Path) -> None:
    from _stores import make_tiny_store
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xtd.assets import embedded_teacher_dir

    texts = [t[:300] for t in _texts()[:4]]
    store = make_tiny_store(tmp_path, embedded_teacher_dir(), texts, top_k=0, max_length=96)
    config = TrainConfig(
        store=(str(store),),
        student="embedded:smollm2",
        tokenizer="embedded:gpt2",
        out=str(tmp_path / "gpt2-student"),
        lora_rank=8,
        lr=1e-4,
        warmup_steps=0,
        max_steps=3,
        batch_size=2,
        max_student_length=48,
        checkpoint_every=2,
    )
    result = train(config)
    assert result.steps == 3 and all(math.isfinite(r["alm"]) and math.isfinite(r["sft"]) for r in result.history)
    assert result.history[0]["count_alm"] > 10
    model = AutoModelForCausalLM.from_pretrained(result.out)
    tok = AutoTokenizer.from_pretrained(result.out)
    assert len(tok) == 50257 and model.get_input_embeddings().weight.shape[0] >= 50257
    assert not any("lora" in name for name, _ in model.named_parameters())  # LoRA merged
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert generated.shape[1] == ids.shape[1] + 5
    assert isinstance(tok.decode(generated[0]), str)
    assert "embedded:gpt2" in (result.out / "README.md").read_text()


# ----------------------------------------------------------------------------- every loss wires up


@pytest.fixture(scope="module")
def hidden_store(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    from _stores import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("hidden"), tiny_lm, _texts()[:4], hidden=True)


@pytest.mark.parametrize(
    ("losses", "same_tokenizer", "extra"),
    [
        ("alm+sft+kd", True, {}),
        ("alm+uld+mined+latents", False, {}),
        ("alm+sft", False, {"alm_chunks": "space", "lora_rank": 4, "gradmag": False, "loss_weights": "sft=0.5"}),
        ("sft", False, {"schedule": "cosine", "max_grad_norm": 0.0}),
    ],
)
def test_every_loss_trains_a_few_steps(
    hidden_store: Path, tiny_lm: Path, tiny_lm_b: Path, tmp_path: Path, losses: str, same_tokenizer: bool, extra: dict
) -> None:
    student = tiny_lm if same_tokenizer else tiny_lm_b
    result = train(_config(hidden_store, student, tmp_path / "run", losses=losses, max_steps=2, **extra))
    names = losses.split("+")
    assert result.steps == 2 and set(names) <= set(result.losses)
    for record in result.history:
        assert all(math.isfinite(record[n]) and record[f"count_{n}"] > 0 for n in names), record
        weights = TrainConfig(store=("s",), out="o", losses=losses, **{k: v for k, v in extra.items() if k == "loss_weights"})
        assert record["loss"] == pytest.approx(sum(w * record[n] for n, w in weights.loss_weight_map().items()))
        if len(names) > 1 and extra.get("gradmag", True):
            assert sum(record[f"gradmag_{n}"] for n in names) == pytest.approx(1.0)  # docs/method.md, "GradMag": Σ w_i / W = 1
    if same_tokenizer:
        # The student *is* the teacher here: KD at step 1 is ≈ 0 (q8 top-k rounding aside)
        # only if the teacher rows line up with the student's tokens row for row.
        assert abs(result.history[0]["kd"]) < 1e-3
        assert result.history[0]["alm_binary_kl"] < 1e-6


# ----------------------------------------------------------------------------- learning curves


def test_eval_text_logs_learning_curves_scored_like_xtd_eval(tiny_store: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    from xtd.evaluate import bits_per_byte
    from xtd.student import load_causal_lm, model_tokenizer

    held = tmp_path / "held.txt"
    held.write_text("To be, or not to be, that is the question.\n" * 6)
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"text": "In the beginning God created"}\n{"text": "the heaven and the earth."}\n')
    config = _config(
        tiny_store, tiny_lm_b, tmp_path / "run", losses="alm+sft", max_steps=5, eval_every=2, eval_max_length=16,
        eval_text=(f"held={held}", str(samples)),
    )
    result = train(config)
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "eval_held_bits_per_byte" in r}
    assert sorted(scored) == [2, 4, 5]  # every 2 steps and after the last
    assert all("eval_samples_bits_per_byte" in r for r in scored.values())
    assert [r["step"] for r in result.history if "eval_held_bits_per_byte" in r] == [2, 4, 5]
    # The last value is the saved model's bits per byte, scored as xtd eval scores it.
    model, tok = load_causal_lm(str(result.out)), model_tokenizer(str(result.out))
    final = bits_per_byte(model, tok, [held.read_text()], max_length=16, stride=8).bits_per_byte
    assert scored[5]["eval_held_bits_per_byte"] == pytest.approx(final, rel=1e-5)
    assert scored[2]["eval_held_bits_per_byte"] != scored[5]["eval_held_bits_per_byte"]  # the model moved


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"eval_every": 3}, "--eval-every needs at least one --eval-text"),
        ({"eval_text": ("a=x.txt", "a=y.txt")}, "names a set twice"),
        ({"eval_text": ("bad name=x.txt",)}, "must be NAME=FILE"),
        ({"eval_text": ("x.txt",), "eval_max_length": 1}, "--eval-max-length (1)"),
    ],
)
def test_eval_flags_are_validated(kwargs: dict, phrase: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        TrainConfig(store=("s",), out="o", **kwargs)


def test_a_missing_eval_file_fails_before_training(tiny_store: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from xtd.cli import app

    out = tmp_path / "run"
    args = ["train", "--store", str(tiny_store), "--student", str(tiny_lm_b), "--out", str(out), "--max-steps", "2",
            "--lora-rank", "0", "--eval-text", f"held={tmp_path / 'none.txt'}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
    assert not (out / "metrics.jsonl").exists()
