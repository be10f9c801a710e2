"""The Table 1 miniature at its --quick size: the whole pipeline a user reruns with `make experiment`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_experiment_writes_table_plot_and_sane_numbers(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "XTD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "table1.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "experiment.json").read_text())
    table = (tmp_path / "experiment.md").read_text()
    assert (tmp_path / "experiment.png").stat().st_size > 10_000
    assert "| SFT |" in table and "| ALM+SFT |" in table
    runs = results["runs"]
    assert {(r["target"], r["method"]) for r in runs} == {
        (t, m) for t in ("subword", "bytes") for m in ("SFT", "ALM+SFT")
    }
    for run in runs:
        assert math.isfinite(run["bits_per_byte"]) and 0 < run["bits_per_byte"] < 16, run
        assert run["train_tokens"] > 0
        # Even a few steps of training on in-domain passages beat the untrained FVT initialisation.
        assert run["bits_per_byte"] < results["fvt_bits_per_byte"][run["target"]], run
    # The teacher, on its own tokenizer, is better than either untrained transfer.
    assert results["teacher_bits_per_byte"] < min(results["fvt_bits_per_byte"].values())
