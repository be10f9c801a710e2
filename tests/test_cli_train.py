"""``xtd train`` on the command line: defaults match TrainConfig, bad input gives one line
before any training, ``--max-steps 0`` writes the untrained student."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from xtd.cli import app

runner = CliRunner()


def _texts() -> list[str]:
    return [
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles",
        "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end",
        "Hello world! Tabs\tand  spaces.",
    ]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> dict[str, Path]:
    from _stores import make_tiny_store

    root = tmp_path_factory.mktemp("cli_stores")
    return {
        "full": make_tiny_store(root, tiny_lm, _texts(), name="full"),
        "no_topk": make_tiny_store(root, tiny_lm, _texts(), name="no_topk", top_k=0),
        "unfinished": make_tiny_store(root, tiny_lm, _texts(), name="unfinished", complete=False),
    }


def _args(store: Path, student: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--store", str(store), "--student", str(student), "--out", str(out), "--lora-rank", "0",
        "--max-steps", "2", "--warmup-steps", "0", "--batch-size", "2", "--max-student-length", "32", "--json", *extra,
    ]  # fmt: skip


def _assert_one_line_error(result, phrase: str, out: Path) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error:"), result.output
    assert phrase in " ".join(result.output.split()), result.output
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # nothing trained


def test_help_shows_examples() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "xtd train --store" in result.output and "--resume" in result.output


def test_missing_store(tmp_path: Path, tiny_lm_b: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, _args(tmp_path / "nope", tiny_lm_b, out))
    _assert_one_line_error(result, "no store at", out)


def test_unfinished_store(stores: dict[str, Path], tiny_lm_b: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, _args(stores["unfinished"], tiny_lm_b, out))
    _assert_one_line_error(result, "is unfinished", out)


def test_kd_needs_the_teachers_tokenizer(stores: dict[str, Path], tiny_lm_b: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, _args(stores["full"], tiny_lm_b, out, "--losses", "kd"))
    _assert_one_line_error(result, "kd needs the student to use the teacher's tokenizer", out)


@pytest.mark.parametrize("loss", ["kd", "uld", "mined"])
def test_topk_loss_on_a_store_without_topk(stores: dict[str, Path], tiny_lm: Path, tmp_path: Path, loss: str) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, _args(stores["no_topk"], tiny_lm, out, "--losses", f"alm+{loss}"))
    _assert_one_line_error(result, "needs teacher top-k log-probs", out)


def test_latents_on_a_store_without_hidden_states(stores: dict[str, Path], tiny_lm_b: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, _args(stores["full"], tiny_lm_b, out, "--losses", "alm+latents"))
    _assert_one_line_error(result, "latents needs teacher hidden states", out)


def test_cached_alignment_for_another_tokenizer(stores: dict[str, Path], tiny_lm_b: Path, tmp_path: Path) -> None:
    from xtd.storage import open_store, write_alignment

    store = tmp_path / "store"
    shutil.copytree(stores["full"], store)
    n = len(open_store(store))
    docs = ({"student_ids": np.zeros(1, np.int32), "teacher_chunk": np.zeros(0, np.int32)} for _ in range(n))
    write_alignment(store, "0123456789abcdef", docs, num_documents=n)
    out = tmp_path / "run"
    result = runner.invoke(app, _args(store, tiny_lm_b, out))
    _assert_one_line_error(result, "holds cached alignments only for student tokenizer(s) 0123456789abcdef", out)


def test_bad_flag_value_names_the_flag(stores: dict[str, Path], tiny_lm_b: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, _args(stores["full"], tiny_lm_b, out, "--warmup-steps", "5"))
    _assert_one_line_error(result, "--warmup-steps (5) must be smaller than --max-steps (2)", out)


def test_a_folder_xtd_did_not_write_is_refused_whatever_the_flags(
    stores: dict[str, Path], tiny_lm_b: Path, tmp_path: Path
) -> None:
    from _stores import tree_digest

    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text('{"mine": true}')
    before = tree_digest(out)
    for flags in ((), ("--resume",), ("--overwrite",)):
        result = runner.invoke(app, _args(stores["full"], tiny_lm_b, out, *flags))
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        text = " ".join(result.output.split())
        assert "did not write" in text and "'README.md'" in text and "--overwrite" not in text, text
    assert tree_digest(out) == before


def test_a_used_run_folder_needs_resume_or_overwrite_and_a_rerun_has_nothing_to_do(
    stores: dict[str, Path], tiny_lm_b: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = _args(stores["full"], tiny_lm_b, out)
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, args)  # the same command, as a Makefile reruns it
    assert again.exit_code == 0 and '"nothing_to_do": true' in again.output, again.output
    more = list(args)
    more[more.index("--max-steps") + 1] = "3"
    result = runner.invoke(app, more)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--resume" in result.output and "--overwrite" in result.output
    resumed = runner.invoke(app, [*more, "--resume"])
    assert resumed.exit_code == 0 and '"steps": 3' in resumed.output, resumed.output


def test_max_steps_zero_writes_the_untrained_student(
    stores: dict[str, Path], tiny_lm: Path, tok_b_path: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    # A tokenizer change (FVT init) at --max-steps 0: the demo evaluates exactly this student.
    args = _args(stores["full"], tiny_lm, out, "--tokenizer", str(tok_b_path))
    args[args.index("--max-steps") + 1] = "0"
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 700  # tok_b's vocabulary
    assert '"steps": 0' in result.output
    assert not (out / "checkpoints").exists()


def test_resume_reads_the_saved_settings_and_config_reproduces_them(
    stores: dict[str, Path], tiny_lm_b: Path, tmp_path: Path
) -> None:
    import json

    out = tmp_path / "run"
    first = runner.invoke(app, _args(stores["full"], tiny_lm_b, out, "--tau", "5", "--lr", "1e-3"))
    assert first.exit_code == 0, first.output
    saved = json.loads((out / "train_config.json").read_text())
    # --resume --out DIR needs no other flag: the finished run has nothing to do
    again = runner.invoke(app, ["train", "--resume", "--out", str(out), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout.splitlines()[-1])["nothing_to_do"], again.output
    # … and a flag given again that changes the maths is refused, one that may change is taken
    changed = runner.invoke(app, ["train", "--resume", "--out", str(out), "--tau", "7"])
    assert changed.exit_code == 1 and "--tau" in changed.output and "Traceback" not in changed.output, changed.output
    longer = runner.invoke(app, ["train", "--resume", "--out", str(out), "--max-steps", "3", "--json"])
    assert longer.exit_code == 0 and json.loads(longer.stdout.splitlines()[-1])["steps"] == 3, longer.output
    # --config FILE: the saved settings, with the flags typed here overriding them
    copy = tmp_path / "copy"
    resumed = json.loads((out / "train_config.json").read_text())
    assert {**resumed, "max_steps": 2} == saved
    rerun = runner.invoke(
        app, ["train", "--config", str(out / "train_config.json"), "--out", str(copy), "--max-steps", "2", "--json"]
    )
    assert rerun.exit_code == 0, rerun.output
    mine = json.loads((copy / "train_config.json").read_text())
    assert {**mine, "out": saved["out"]} == saved and not mine["resume"]
    first_records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][:2]
    copy_records = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    deterministic = ("step", "loss", "alm", "sft", "lr", "tokens")
    assert [{k: r.get(k) for k in deterministic} for r in copy_records] == [
        {k: r.get(k) for k in deterministic} for r in first_records
    ]
