"""The maths use case: the CPU experiment at its --quick size (what `make experiment-maths
QUICK=1` runs) and the GPU recipe's dry run, whose every xtd command must parse back into
exactly the config the recipe built."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def _recipe_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location("maths_gpu", ROOT / "experiments" / "maths_gpu.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "maths_gpu", module)  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class _Captured(Exception):
    def __init__(self, config: Any) -> None:
        super().__init__("captured")
        self.config = config


def _capture(config: Any, **kwargs: Any) -> Any:
    raise _Captured(config)


def test_gpu_recipe_dry_run_prints_every_stage_and_the_cost(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "maths_gpu.py"), "--work", str(tmp_path / "w"), "--dry-run",
         "--gpus", "4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for stage in ("# data", "# precompute", "# train-SFT", "# train-ALM", "# train-ALM+SFT", "# train-MinED", "# eval"):
        assert stage in out
    assert "--nproc-per-node=4" in out and "nvidia/OpenMath2-Llama3.1-8B" in out and "google/gemma-2-2b-it" in out
    assert not (tmp_path / "w").exists()  # a dry run writes nothing
    cost = json.loads(out[out.index("{"):])["cost_estimate_h100"]
    assert cost["precompute_gpu_hours"] > 0 and cost["train_gpu_hours_per_method"] > 0
    assert cost["total_gpu_hours"] > cost["precompute_gpu_hours"] + 4 * cost["train_gpu_hours_per_method"]


def test_gpu_recipe_commands_parse_into_the_recipe_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import xtd.precompute
    import xtd.train
    from xtd.cli import app

    recipe_mod = _recipe_module(monkeypatch)
    recipe = recipe_mod.Recipe(gpus=2)
    work = tmp_path / "w"
    steps = recipe_mod.commands(recipe, work)
    monkeypatch.setattr(xtd.train, "train", _capture)
    monkeypatch.setattr(xtd.precompute, "precompute", _capture)
    runner = CliRunner()
    expected = {"precompute": recipe_mod.precompute_config(recipe, work)}
    expected.update({f"train-{m}": recipe_mod.train_config(recipe, work, m) for m in recipe.methods})
    for name, config in expected.items():
        argv = steps[name]
        assert argv[:5] == ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "xtd"]
        result = runner.invoke(app, argv[5:])
        assert isinstance(result.exception, _Captured), (name, result.output)
        assert result.exception.config == config, name
    train = expected["train-ALM+SFT"]
    assert train.lora_rank == 0 and train.lr == 5e-6 and train.max_steps == 5000 and train.batch_size == 64
    assert train.max_student_length == 1024 and train.losses == "alm+sft"


@pytest.mark.slow
def test_quick_experiment_writes_table_plot_and_sane_numbers(tmp_path: Path) -> None:
    # The default cache: the MinED map of SmolLM2 × GPT-2 (≈ 30 s to build) is built once per machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "maths.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "maths.json").read_text())
    table = (tmp_path / "maths.md").read_text()
    assert (tmp_path / "maths.png").stat().st_size > 10_000
    for method in ("SFT", "ALM", "ALM+SFT", "MinED"):
        assert f"| student + {method} |" in table
    assert "numbers split at different places" in table
    runs = results["runs"]
    assert sorted(r["method"] for r in runs) == sorted(("SFT", "ALM", "ALM+SFT", "MinED"))
    n = results["size"]["test_problems"]
    for record in [results["teacher"], results["student_untrained"], *runs]:
        assert record["problems"] == n and 0 <= record["correct"] <= n
        assert math.isfinite(record["solution_bits_per_byte"]) and 0 < record["solution_bits_per_byte"] < 20
    # Per-problem outputs are kept for every model.
    outputs = tmp_path / "maths-work" / "outputs"
    assert len(list(outputs.glob("*.jsonl"))) == 2 + len(runs)
    first = json.loads((outputs / "teacher.jsonl").read_text().splitlines()[0])
    assert {"id", "generated", "prediction", "correct", "answer"} <= set(first)
    # Even a few steps of SFT on the teacher's maths store move the student towards the solutions.
    untrained = results["student_untrained"]["solution_bits_per_byte"]
    assert all(r["solution_bits_per_byte"] < untrained for r in runs if r["method"] in ("SFT", "ALM+SFT"))
    # The audit saw the digits the two tokenizers cut differently.
    audit = results["align_report"]
    assert audit["numbers"] > 0 and audit["numbers_split_differently"] > 0 and audit["merge"]["groups"] > 0
