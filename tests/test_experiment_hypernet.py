"""experiments/hypernet.py at its --quick size end to end: every method and seed trains, every
unseen tokenizer is scored for FVT and every hypernetwork, and the report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.slow
def test_quick_hypernet_experiment(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "XTD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "hypernet.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "hypernet.json").read_text())
    assert (tmp_path / "hypernet.png").stat().st_size > 10_000
    table = (tmp_path / "hypernet.md").read_text()
    assert "| gpt2 | shakespeare |" in table and "SFT (ZeTT)" in table
    runs = results["runs"]
    assert set(runs) == {"ALM", "SFT"} and all(len(r) == results["size"]["seeds"] >= 2 for r in runs.values())
    for run in (r for group in runs.values() for r in group):
        assert 0 < run["sample_share"] <= run["data_share"] < 1 and run["mean_bytes_per_token"] > 1
        assert 0 <= run["wait_share"]
    original = results["evaluation"]["original"]
    for name, entry in results["evaluation"]["tokenizers"].items():
        assert entry["vocab_size"] > 30_000, name
        for method in ("ALM", "SFT"):
            assert len(entry[method]) == results["size"]["seeds"]
            for scores in entry[method]:
                assert set(scores) == set(original) and all(0 < v < 20 for v in scores.values())


def test_gpu_recipe_dry_run_prints_commands_that_parse_to_its_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "hypernet_gpu.py"), "--dry-run", "--out", str(tmp_path / "gpu")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\nxtd hypernet train ") == 2 * 2  # methods × seeds
    assert proc.stdout.count("\nxtd hypernet apply ") == 4 * 2 * 2  # tokenizers × methods × seeds
    assert "xtd precompute --teacher google/gemma-2-2b-it" in proc.stdout
    hours = json.loads(proc.stdout[: proc.stdout.index("\n# ")])["estimate"]["hours"]
    assert 0 < hours["one hypernetwork run (4N per token)"] < hours["everything"]
    assert not (tmp_path / "gpu").exists()  # a dry run runs nothing

    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import hypernet_gpu
    from typer.testing import CliRunner

    import xtd.hypernet.train
    from xtd.cli import app

    seen = []

    class _Result:
        out, steps, tokens, losses, nothing_to_do = "x", 0, 0, {}, False

    monkeypatch.setattr(xtd.hypernet.train, "train_hypernet", lambda config, progress=None: seen.append(config) or _Result())
    configs = hypernet_gpu.hypernet_configs(hypernet_gpu.Recipe(), tmp_path / "gpu")
    for config in configs:
        result = CliRunner().invoke(app, ["hypernet", "train", *hypernet_gpu.config_args(config)])
        assert result.exit_code == 0, result.output
    assert seen == configs and {c.losses for c in configs} == {"alm", "sft"}
