"""bench/gpu_check.py's parts that run without a GPU: the no-CUDA exit and the comparison of
loss terms across (device, autocast) runs, here bf16 autocast on CPU against fp32."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:  # noqa: ANN001
    gpu_check = _module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cuda"] is False and report["ok"] is True and "no CUDA" in report["message"]


def test_terms_under_bf16_autocast_match_fp32_within_the_check_tolerance(tmp_path: Path, tiny_lm: Path, tiny_lm_b: Path) -> None:
    from _stores import make_tiny_store

    from xtd.examples import build_example, pad_examples
    from xtd.storage import open_store
    from xtd.student import load_student

    gpu_check = _module()
    texts = ["In the beginning God created the heaven and the earth.", "Let there be light:", "And it was so."]
    reader = open_store(str(make_tiny_store(tmp_path, tiny_lm, texts, top_k=0)))
    student = load_student(str(tiny_lm_b), lora_rank=0)
    tok = student.tokenizer
    batch = pad_examples(
        [build_example(reader[d], tok, columns=[0, 1, 2, 3], max_student_length=32, max_teacher_length=None)
         for d in range(len(reader))],
        pad_id=tok.pad_id or 0,
    )  # fmt: skip
    mask = torch.as_tensor(tok.boundary_mask(), dtype=torch.bool)
    result = gpu_check.compare_terms(student.model, batch, mask, runs=(("cpu", None), ("cpu", torch.bfloat16)))
    assert set(result) == {"cpu/fp32", "cpu/bfloat16"}
    assert result["cpu/fp32"]["alm"] > 0 and result["cpu/fp32"]["sft"] > 0
    assert 0 < result["cpu/bfloat16"]["rel_diff_sft"]  # autocast really ran in bf16
    assert gpu_check.within(result, gpu_check.AMP_RTOL, "cpu/bfloat16")
    assert not gpu_check.within(result, 0.0, "cpu/bfloat16")
