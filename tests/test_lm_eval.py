"""lm-evaluation-harness on xtd models (xtd.lm_eval_model, xtd.eval_tasks): the offline
tasks built from held-out text, and `xtd eval --tasks` on a subword student, a byte-level
student and an ensemble, checked against log-likelihood choices computed by hand with
plain forward passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from typer.testing import CliRunner

from xtd.cli import app
from xtd.eval_tasks import LOCAL_TASKS, choice_docs, local_task_docs

runner = CliRunner()
LIMIT = 6


@pytest.fixture(scope="module")
def byte_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xtd.embedded_tokenizers import bytes_hf

    return make_tiny_llama(bytes_hf(), tmp_path_factory.mktemp("byte_lm"), seed=3)


@pytest.fixture(scope="module")
def tiny_lm_twin(tok_a, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second random model over tok_a (an ensemble member that differs from tiny_lm)."""
    return make_tiny_llama(tok_a, tmp_path_factory.mktemp("tiny_lm_twin"), seed=7)


def _hand_choice_logps(folders: list[Path], docs: list[dict], rule: str = "single") -> list[list[float]]:
    """log p(choice | context) per document and choice, by plain forward passes.

    As lm-eval's Hugging Face model does, trailing whitespace of the context (here its line
    break) moves to the continuation: the text is ``BOS + tokens(context) + tokens("\\n" +
    choice)`` (the test checks that encoding the two parts apart gives the same tokens as
    encoding them together, so the continuation's tokens are exactly the ones after the
    context's); members are combined per position by the mean probability (``p``) or the
    renormalised mean log-probability (``logp``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders[0])
    models = [AutoModelForCausalLM.from_pretrained(f).eval() for f in folders]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = []
    for doc in docs:
        context = doc["context"].rstrip()
        space = doc["context"][len(context) :]
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        row = []
        for choice in doc["choices"]:
            cont = tok(space + choice, add_special_tokens=False)["input_ids"]
            assert tok(context + space + choice, add_special_tokens=False)["input_ids"] == ctx + cont
            ids = torch.tensor([[bos, *ctx, *cont]])
            with torch.no_grad():
                member = torch.stack([m(input_ids=ids).logits[0].float().log_softmax(-1) for m in models])
            if rule == "p":
                logp = member.logsumexp(0) - math.log(len(models))
            elif rule == "logp":
                logp = member.mean(0).log_softmax(-1)
            else:
                logp = member[0]
            positions = range(1 + len(ctx), ids.shape[1])
            row.append(sum(float(logp[q - 1, ids[0, q]]) for q in positions))
        out.append(row)
    return out


def _accuracies(docs: list[dict], logps: list[list[float]]) -> dict[str, float]:
    acc = np.mean([int(np.argmax(lp)) == d["label"] for d, lp in zip(docs, logps, strict=True)])
    per_byte = [[x / len(c.encode()) for x, c in zip(lp, d["choices"], strict=True)] for d, lp in zip(docs, logps, strict=True)]
    acc_bytes = np.mean([int(np.argmax(lp)) == d["label"] for d, lp in zip(docs, per_byte, strict=True)])
    return {"acc": float(acc), "acc_bytes": float(acc_bytes)}


def test_local_task_documents_are_deterministic_and_well_formed():
    for name in LOCAL_TASKS:
        docs = local_task_docs(name)
        assert docs == local_task_docs(name) and len(docs) >= 100
        for doc in docs:
            assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
            assert 0 <= doc["label"] < 4 and doc["context"].endswith("\n")
        labels = np.bincount([d["label"] for d in docs], minlength=4)
        assert labels.min() > len(docs) / 10  # the gold choice is not always in one place
    verse = local_task_docs("xtd_next_verse")[0]
    assert verse["context"].count("\n") == 1  # one verse of context
    docs = choice_docs([["a1", "a2", "a3"], ["b1", "b2"]], context_lines=2, num_docs=3, num_choices=2, seed=0)
    assert [d["context"] for d in docs] == ["a1\n", "a1\na2\n", "b1\n"]
    assert [d["choices"][d["label"]] for d in docs] == ["a2", "a3", "b2"]


def test_loglikelihood_equals_hand_computed(tiny_lm: Path, byte_lm: Path):
    from lm_eval.api.instance import Instance

    from xtd.lm_eval_model import load_xtd_lm

    docs = local_task_docs("xtd_next_line")[:2]
    for folder in (tiny_lm, byte_lm):
        lm = load_xtd_lm([str(folder)])
        requests = [Instance("loglikelihood", d, (d["context"], c), i) for d in docs for i, c in enumerate(d["choices"])]
        got = [lp for lp, _ in lm.loglikelihood(requests)]
        want = [x for row in _hand_choice_logps([folder], docs) for x in row]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        # The rolling log-likelihood of a text is the choice log-likelihood after an empty context.
        text = docs[0]["context"] + docs[0]["choices"][0]
        (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        (whole,) = _hand_choice_logps([folder], [{"context": "", "choices": [text]}])
        assert rolling == pytest.approx(whole[0], rel=1e-4)


def _cli_rows(args: list[str]) -> list[dict]:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


def test_cli_tasks_match_hand_computed_choices(tiny_lm: Path, tiny_lm_twin: Path, byte_lm: Path):
    rows = _cli_rows([
        "--model", str(tiny_lm), "--model", str(byte_lm), "--ensemble", f"{tiny_lm},{tiny_lm_twin}",
        "--tasks", "xtd_next_verse,xtd_next_line", "--task-limit", str(LIMIT),
    ])  # fmt: skip
    assert len(rows) == 4  # subword, bytes, ensemble (p), ensemble (logp)
    assert all("bits_per_byte" not in r for r in rows)  # --tasks alone scores no text
    cases = [([tiny_lm], "single"), ([byte_lm], "single"), ([tiny_lm, tiny_lm_twin], "p"), ([tiny_lm, tiny_lm_twin], "logp")]
    seen = set()
    for row, (folders, rule) in zip(rows, cases, strict=True):
        for task in LOCAL_TASKS:
            docs = local_task_docs(task)[:LIMIT]
            want = _accuracies(docs, _hand_choice_logps(folders, docs, rule))
            got = row["tasks"][task]
            assert got["num_examples"] == LIMIT
            assert got["acc"] == pytest.approx(want["acc"]) and got["acc_bytes"] == pytest.approx(want["acc_bytes"])
            seen.add((got["acc"], got["acc_bytes"]))
    assert len(seen) > 1  # the check can tell models apart
    table = runner.invoke(app, ["eval", "--model", str(tiny_lm), "--tasks", "xtd_next_verse", "--task-limit", "2"])
    assert table.exit_code == 0 and "xtd_next_verse" in table.stdout


def test_task_yaml_file_and_held_out_together(tiny_lm: Path, tmp_path: Path):
    from xtd.eval_tasks import task_folder

    (tmp_path / "mine.yaml").write_text(
        (task_folder() / "xtd_next_line.yaml").read_text().replace("task: xtd_next_line", "task: my_next_line")
    )
    (tmp_path / "xtd_tasks.py").write_text((task_folder() / "xtd_tasks.py").read_text())
    row = _cli_rows(["--model", str(tiny_lm), "--tasks", str(tmp_path / "mine.yaml"), "--task-limit", "3",
                     "--held-out", "1", "--max-length", "128", "--stride", "64"])[0]  # fmt: skip
    assert row["tasks"]["my_next_line"]["num_examples"] == 3 and row["bits_per_byte"] > 0


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--tasks", "no_such_task_xyz"], "unknown task"),
        (["--tasks", "missing.yaml"], "no such task file"),
        (["--tasks", "xtd_next_verse", "--task-limit", "0"], "--task-limit"),
    ],
)
def test_task_errors_are_one_line(tiny_lm: Path, args: list[str], phrase: str):
    result = runner.invoke(app, ["eval", "--model", str(tiny_lm), *args])
    assert result.exit_code == 1, result.output
    assert phrase in result.output and "Traceback" not in result.output


def test_missing_lm_eval_names_the_extra(tiny_lm: Path, monkeypatch: pytest.MonkeyPatch):
    import builtins

    from xtd import eval_tasks

    real_import = builtins.__import__

    def no_lm_eval(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    eval_tasks._task_manager.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    result = runner.invoke(app, ["eval", "--model", str(tiny_lm), "--tasks", "xtd_next_line"])
    assert result.exit_code == 1 and "pip install 'xtd[eval]'" in result.output
    assert "Traceback" not in result.output
