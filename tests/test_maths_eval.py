"""xtd.maths_eval: batched greedy generation against one-at-a-time decoding, the stop rule,
solution bits per byte against a naive reference, the store view of prompts, and the
``answer_format`` hook of ``xtd eval --task``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from xtd.errors import ConfigError
from xtd.evaluate import exact_match, read_tasks
from xtd.maths import (
    ANSWER_FORMAT,
    chat_record,
    generate,
    prompt_view,
    store_view,
    task_record,
    write_split,
)
from xtd.maths_eval import (
    MathsOutput,
    MathsScore,
    generate_solutions,
    prompt_ids,
    score_problems,
    solution_bits_per_byte,
    solution_inputs,
)
from xtd.student import load_causal_lm
from xtd.tokenization import load_tokenizer

PROMPTS = ["user: What is 2 + 2?\nassistant: ", "Hi", "A much longer prompt, with words and 1234 digits, to pad.", "x"]


@pytest.fixture(scope="module")
def lm_a(tiny_lm: Path):
    return load_causal_lm(tiny_lm)


@pytest.fixture(scope="module")
def tok_a_bt(tiny_lm: Path):
    return load_tokenizer(str(tiny_lm))


def _ids(tok, text: str) -> np.ndarray:
    return np.asarray([tok.bos_id, *tok.encode(text).ids.tolist()], dtype=np.int64)


def _reference_greedy(model, tok, prompt: str, max_new_tokens: int, stop=lambda text: False) -> str:
    """Slow, obvious decoding: one prompt, full forward pass per new token, no cache."""
    ids = [tok.bos_id, *tok.encode(prompt).ids.tolist()]
    new: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
        token = int(logits.argmax())
        if token == tok.eos_id:
            break
        new.append(token)
        if stop(b"".join(tok.token_bytes[i] for i in new).decode("utf-8", errors="replace")):
            break
    return b"".join(tok.token_bytes[i] for i in new).decode("utf-8", errors="replace")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_greedy_matches_one_at_a_time(lm_a, tok_a_bt, batch_size: int) -> None:
    got = generate_solutions(lm_a, tok_a_bt, [_ids(tok_a_bt, p) for p in PROMPTS], max_new_tokens=12,
                             batch_size=batch_size)
    for prompt, (text, count) in zip(PROMPTS, got, strict=True):
        assert text == _reference_greedy(lm_a, tok_a_bt, prompt, 12)
        assert 0 < count <= 12


def test_stop_rule_cuts_each_row_at_its_first_stop(lm_a, tok_a_bt) -> None:
    def stop(text: str) -> bool:
        return len(text.encode()) >= 5

    got = generate_solutions(lm_a, tok_a_bt, [_ids(tok_a_bt, p) for p in PROMPTS], max_new_tokens=12,
                             batch_size=4, stop=stop)
    for prompt, (text, _) in zip(PROMPTS, got, strict=True):
        assert text == _reference_greedy(lm_a, tok_a_bt, prompt, 12, stop)


def test_solution_bits_per_byte_matches_naive_reference(lm_a, tok_a_bt) -> None:
    questions = ["3 * 4?", "add 17 and 25", "x"]
    solutions = ["3 * 4 = 12\n#### 12", " 17 + 25 = 42\n#### 42", "ÿ #### 0"]
    inputs = [solution_inputs(tok_a_bt, q, s, mode="store", chat_tokenizer=None)
              for q, s in zip(questions, solutions, strict=True)]
    nll, num_bytes = solution_bits_per_byte(lm_a, tok_a_bt, inputs, batch_size=2)
    ref_nll, ref_bytes = 0.0, 0
    for question, solution in zip(questions, solutions, strict=True):
        prompt = prompt_view(question, None)
        enc = tok_a_bt.encode(prompt + solution)
        ids = torch.tensor([[tok_a_bt.bos_id, *enc.ids.tolist()]])
        with torch.no_grad():
            logp = lm_a(input_ids=ids).logits[0].double().log_softmax(-1)
        start = len(prompt.encode())
        for k, (lo, hi) in enumerate(enc.spans.tolist()):
            if hi > start:  # token k sits at position k + 1 after the BOS
                ref_nll -= float(logp[k, enc.ids[k]])
                ref_bytes += hi - lo
    assert num_bytes == ref_bytes >= sum(len(s.encode()) for s in solutions)
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_template_prompt_uses_the_models_own_chat_template() -> None:
    tok = load_tokenizer("embedded:smollm2")
    ids = prompt_ids(tok, "What is 2 + 2?", mode="template")
    assert ids[0] == tok.bos_id == 1 and int((ids == 2).sum()) == 2  # <|im_start|>…<|im_end|> as special ids
    assert tok.hf.decode(ids.tolist()).endswith("<|im_start|>assistant\n")
    store = prompt_ids(tok, "What is 2 + 2?", mode="store", chat_tokenizer=tok)
    assert int((store == 2).sum()) == 0 and store[0] == tok.bos_id  # specials stripped, BOS kept
    full, first, nbytes = solution_inputs(tok, "What is 2 + 2?", "2 + 2 = 4\n#### 4", mode="template")
    assert full[:first].tolist() == ids.tolist() and nbytes == len("2 + 2 = 4\n#### 4")
    with pytest.raises(ConfigError, match="no chat template"):
        prompt_ids(load_tokenizer("embedded:gpt2"), "q", mode="template")


def test_scores_and_outputs() -> None:
    outputs = (
        MathsOutput("a", "k", "12", "3 * 4 = 12\n#### 12\n", "12", True, 3, 1, 1),
        MathsOutput("b", "k", "13", "#### 14\n", "14", False, 3, 0, 0),
        MathsOutput("c", "k", "15", "5 + 5 = 11", None, False, 9, 0, 1),
    )
    score = MathsScore("m", outputs, solution_nll_nats=math.log(2) * 30, solution_bytes=10)
    assert score.exact_match == pytest.approx(1 / 3)
    assert score.bits_per_byte == pytest.approx(3.0)
    summary = score.to_dict()
    assert summary["correct"] == 1 and summary["answered"] == 2 and summary["problems"] == 3
    assert summary["steps"] == 2 and summary["step_accuracy"] == 0.5
    assert json.loads(json.dumps(outputs[2].to_dict()))["prediction"] is None


def test_score_problems_end_to_end(lm_a, tok_a_bt) -> None:
    problems = generate("test", 3)
    score = score_problems(lm_a, tok_a_bt, problems, None, name="tiny", max_new_tokens=6, batch_size=2)
    assert [o.id for o in score.outputs] == [p.id for p in problems]
    assert score.exact_match == 0.0  # a random model does not solve these
    assert math.isfinite(score.bits_per_byte) and score.bits_per_byte > 1.0
    assert score.solution_bytes >= sum(len(p.solution.encode()) for p in problems)


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer and its chat template."""
    from conftest import make_tiny_llama

    return make_tiny_llama(load_tokenizer("embedded:smollm2").hf, tmp_path_factory.mktemp("chat_teacher"))


def test_store_view_is_what_precompute_stores(tmp_path: Path, chat_teacher: Path) -> None:
    from xtd.config import PrecomputeConfig
    from xtd.precompute import precompute
    from xtd.storage import open_store

    problems = generate("train", 3)
    data = write_split(tmp_path / "train.jsonl", [chat_record(p) for p in problems])
    precompute(PrecomputeConfig(out=str(tmp_path / "store"), teacher=str(chat_teacher), data=str(data), top_k=0))
    reader = open_store(tmp_path / "store")
    tok = load_tokenizer("embedded:smollm2")
    for d, problem in enumerate(problems):
        messages = chat_record(problem)["messages"]
        rendered = tok.hf.apply_chat_template(messages, tokenize=False)
        stored = bytes(reader[d].text).decode()
        assert stored == store_view(rendered, tok)
        assert "<|im_start|>" not in stored and problem.solution in stored
        # The prompt is the stored text up to the solution.
        assert stored.startswith(prompt_view(problem.question, tok) + problem.solution)
        (lo, hi), = reader[d].loss_spans.tolist()
        assert stored.encode()[lo:hi].decode() == problem.solution
    assert prompt_view("Q?", None) == "system: Solve the problem step by step.\nuser: Q?\nassistant: "
    assert prompt_view("Q?", None, system=None) == "user: Q?\nassistant: "


def test_eval_task_hook_scores_the_final_answer(lm_a, tok_a_bt, tmp_path: Path) -> None:
    problems = generate("test", 4)
    path = write_split(tmp_path / "tasks.jsonl", [task_record(p, None) for p in problems])
    tasks = read_tasks(path)
    assert all(t["answer_format"] == ANSWER_FORMAT for t in tasks)
    result = exact_match(lm_a, tok_a_bt, tasks, max_new_tokens=10)
    # The same generations as maths_eval (stop rule and BOS alike); no marker → "" and wrong.
    ours = generate_solutions(lm_a, tok_a_bt, [_ids(tok_a_bt, t["prompt"]) for t in tasks], max_new_tokens=10)
    assert result.num_correct == 0 and list(result.predictions) == [""] * 4
    assert all("####" not in text for text, _ in ours)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**tasks[0], "answer_format": "words"}) + "\n")
    from xtd.errors import DataError

    with pytest.raises(DataError, match="unknown answer_format 'words'"):
        read_tasks(bad)


def test_eval_task_hook_uses_the_final_answer(lm_a, tok_a_bt, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a model that always writes the same solution, only the final answer decides."""
    written = tok_a_bt.encode("3 * 4 = 12 apples\n#### 12 apples\n").ids.tolist()

    def fake_generate(input_ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
        return torch.cat([input_ids, torch.tensor([written])], dim=1)

    monkeypatch.setattr(lm_a, "generate", fake_generate)
    maths = {"prompt": "q", "answer_format": ANSWER_FORMAT}
    tasks = [{**maths, "answer": "12"}, {**maths, "answer": "12.0"}, {**maths, "answer": "120"},
             {**maths, "answer": "1"}, {"prompt": "q", "answer": "12"}, {"prompt": "q", "answer": "3 * 4 = 12 apples"}]
    result = exact_match(lm_a, tok_a_bt, tasks, max_new_tokens=20)
    assert list(result.predictions) == ["12", "12", "12", "12", "3 * 4 = 12 apples", "3 * 4 = 12 apples"]
    # final-number tasks: right by value, near misses wrong; plain tasks: the first line must equal the answer.
    assert result.num_correct == 3


def test_prompt_view_and_task_record_match_training_text() -> None:
    tok = load_tokenizer("embedded:smollm2")
    problem = generate("test", 1)[0]
    record = task_record(problem, tok)
    assert record["answer"] == problem.answer and record["answer_format"] == ANSWER_FORMAT
    assert record["prompt"].endswith(f"user\n{problem.question}\nassistant\n")
    assert np.all([s not in record["prompt"] for s in ("<|im_start|>", "<|im_end|>")])
