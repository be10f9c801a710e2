"""The experiments (experiments/): setting A at its --quick size end to end, the diagnostics
against the ALM loss, and the GPU recipe's commands (which must parse as the configs they show)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SETS = ("validation", "in_domain", "retention", "teacher_samples")


@pytest.fixture()
def experiments_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXPERIMENTS))


@pytest.mark.slow
def test_quick_setting_a_runs_every_method_on_every_evaluation_set(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "XTD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "table1.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    setting = json.loads((tmp_path / "experiment.json").read_text())["A"]
    table = (tmp_path / "experiment.md").read_text()
    assert (tmp_path / "experiment-A.png").stat().st_size > 10_000
    assert "| SFT |" in table and "| ALM+SFT |" in table and "gap closed" in table
    teacher = setting["teacher"]["bits_per_byte"]
    assert set(teacher) == set(SETS) and setting["teacher"]["tokens_per_parameter"] > 1
    for name, target in setting["targets"].items():
        assert name in ("subword", "bytes")
        fvt = target["fvt"]
        # The teacher, on its own tokenizer, beats its untrained transfer on every set.
        assert all(teacher[s] < fvt[s] for s in SETS), (teacher, fvt)
        assert set(target["methods"]) == {"SFT", "ALM+SFT"}
        for result in target["methods"].values():
            assert result["lr"] in setting["protocol"]["lrs"] and len(result["lr_grid"]) == 2
            assert len(result["runs"]) == 2 and {r["seed"] for r in result["runs"]} == {0, 1}
            for run in result["runs"]:
                assert run["lr"] == result["lr"] and run["train_tokens"] > 0
                assert len(run["curve"]) >= 2 and run["curve"][-1]["step"] == target["steps"]
                assert all(math.isfinite(run["final"][s]) and 0 < run["final"][s] < 16 for s in SETS), run
            # Training on the distillation domain beats the untrained initialisation there.
            assert result["summary"]["bits_per_byte"]["in_domain"]["mean"] < fvt["in_domain"]
            assert result["summary"]["bits_per_byte"]["retention"]["std"] is not None
            diag = result["diagnostics"]
            assert diag["groups"] > 0 and 0 <= diag["dropped_share"] < 1
            assert sum(b["groups"] for b in diag["buckets"]) == diag["groups"]
    for target in setting["targets"].values():  # the lm-eval tasks beside bits per byte
        for tasks in (setting["teacher"]["tasks"], target["fvt_tasks"], *(r["tasks"] for r in target["methods"].values())):
            assert set(tasks) == {"xtd_next_verse", "xtd_next_line"}
            assert all(t["num_examples"] == 40 and 0 <= t["acc_bytes"] <= 1 for t in tasks.values())
    assert "xtd_next_line: acc_bytes (acc)" in table
    assert "bytes" in setting["targets"]
    byte_losses = {m: r["losses"] for m, r in setting["targets"]["bytes"]["methods"].items()}
    assert byte_losses == {"SFT": "sft", "ALM+SFT": "alm+sft+latents"}  # the paper's byte recipe


def test_diagnostics_groups_are_the_groups_the_alm_loss_compares(
    experiments_on_path: None, tiny_lm: Path, tiny_lm_b: Path, tmp_path: Path
) -> None:
    import torch
    from _stores import make_tiny_store
    from diagnostics import group_values, summarise_groups

    from xtd.assets import iter_embedded_corpus
    from xtd.config import ALMSettings, DataSettings
    from xtd.data_plan import StepPlan
    from xtd.losses import ALMTargets, alm_loss, student_path
    from xtd.losses.registry import loss_specs
    from xtd.objective import student_forward
    from xtd.student import load_causal_lm, model_tokenizer
    from xtd.tokenization import BOUNDARY_CLASSES
    from xtd.train_data import StepDataset, TrainData

    texts = [r["text"][:300] for _, r in zip(range(6), iter_embedded_corpus(), strict=False)]
    store = make_tiny_store(tmp_path, tiny_lm, texts, top_k=0)
    model, tok = load_causal_lm(str(tiny_lm_b)), model_tokenizer(str(tiny_lm_b))
    spec = TrainData(stores=(str(store),), student_tokenizer=tok, plan=StepPlan((6,), 6), micro_batch_size=3,
                     data=DataSettings(batch_size=6, max_student_length=128, long_documents="truncate"),
                     alm=ALMSettings(boundary_classes=BOUNDARY_CLASSES), losses=loss_specs(("alm",)))
    mask = torch.as_tensor(tok.boundary_mask(BOUNDARY_CLASSES))
    parts = []
    for batch in StepDataset(spec)[0]["micro_batches"]:
        with torch.no_grad():
            logprob, sigma = student_path(student_forward(model, batch)[0], batch["input_ids"], mask)
        targets = ALMTargets.from_batch(batch)
        part = group_values(logprob, sigma, targets)
        parts.append(part)
        for debias, key in ((True, "mean_abs_gap_debiased"), (False, "mean_abs_gap")):
            loss, stats = alm_loss(logprob, sigma, targets, distance="abs", debias=debias)
            assert int(stats["alm_groups"]) == part["contributing"] == len(part["teacher_logprob"])
            assert float(loss) == pytest.approx(summarise_groups([part])[key], rel=1e-5)
    summary = summarise_groups(parts)
    assert summary["groups"] == sum(p["contributing"] for p in parts) > 0
    assert sum(b["groups"] for b in summary["buckets"]) == summary["groups"]


def test_table1_reports_lm_eval_tasks_beside_bits_per_byte(experiments_on_path: None, tiny_lm: Path) -> None:
    import report
    from table1 import task_scores

    from xtd.eval_tasks import run_tasks
    from xtd.lm_eval_model import load_xtd_lm

    scores = task_scores(tiny_lm, 128, 3)
    assert scores == run_tasks(load_xtd_lm([str(tiny_lm)], max_length=128), ("xtd_next_verse", "xtd_next_line"), limit=3)
    assert all(s["num_examples"] == 3 for s in scores.values())
    setting = {"teacher": {"tasks": scores}}
    target = {"fvt_tasks": scores, "methods": {"ALM+SFT": {"tasks": scores}, "SFT": {}}}
    lines = report._tasks_table(setting, target)
    verse = scores["xtd_next_verse"]
    assert f"| ALM+SFT | {verse['acc_bytes']:.3f} ({verse['acc']:.3f}) |" in "\n".join(lines)
    assert "3 documents each" in lines[0] and not any(line.startswith("| SFT |") for line in lines)
    assert report._tasks_table({"teacher": {}}, {"methods": {}}) == []  # older results render as before


def test_gpu_recipe_dry_run_prints_commands_that_parse_to_its_configs(
    experiments_on_path: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "gpu_recipe.py"), "--dry-run", "--out", str(tmp_path / "gpu")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\nxtd train ") == 2 + 2 * 3 * 2  # FVT inits + targets × methods × seeds
    assert "xtd precompute --teacher google/gemma-2-2b-it" in proc.stdout and "--sample-from" in proc.stdout
    estimate = json.loads(proc.stdout[: proc.stdout.index("\n# ")])["estimate"]["hours"]
    assert 0 < estimate["one subword run (LoRA: 4N per token)"] < estimate["everything"]
    assert not (tmp_path / "gpu").exists()  # a dry run runs nothing

    import gpu_recipe
    from typer.testing import CliRunner

    import xtd.train
    from xtd.cli import app

    seen = []
    monkeypatch.setattr(xtd.train, "train", lambda config, progress=None: seen.append(config) or _Result())
    configs = gpu_recipe.train_configs(gpu_recipe.Recipe(), tmp_path / "gpu")
    for config in configs:
        result = CliRunner().invoke(app, gpu_recipe.train_args(config)[1:])
        assert result.exit_code == 0, result.output
    assert seen == configs
    byte_alm = [c for c in configs if c.tokenizer == "bytes" and "alm" in c.losses and c.max_steps]
    assert byte_alm and all(c.losses.endswith("+latents") and c.untie and c.lora_rank == 0 for c in byte_alm)


class _Result:
    out, steps, tokens, losses, nothing_to_do = "x", 0, 0, {}, False
