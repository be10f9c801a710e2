"""Device and dtype resolution (xtd/runtime.py): one spelling for every command."""

from __future__ import annotations

import pytest
import torch

from xtd.config import DTYPES, EvalConfig, PrecomputeConfig, TrainConfig, canonical_dtype
from xtd.errors import ConfigError
from xtd.runtime import resolve_device, resolve_dtype, torch_dtype


def test_every_command_spells_dtypes_alike_and_stores_the_short_form() -> None:
    for long, short in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        assert canonical_dtype(long) == short == canonical_dtype(short)
        assert EvalConfig(model=("m",), dtype=long).dtype == short
        assert PrecomputeConfig(out="s", dtype=long).dtype == short
    assert EvalConfig(model=("m",)).dtype == "fp32" and PrecomputeConfig(out="s").dtype == "auto"
    for bad in ("int8", "float64", ""):
        with pytest.raises(ConfigError, match="--dtype"):
            canonical_dtype(bad)
        with pytest.raises(ConfigError, match="--dtype"):
            EvalConfig(model=("m",), dtype=bad)


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == "bf16"
    assert [torch_dtype(d) for d in DTYPES if d != "auto"] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ConfigError, match="resolved"):
        torch_dtype("auto")


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="--device must be"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == torch.device("cuda:1")  # torchrun: the local rank's GPU
    for make in (lambda d: TrainConfig(store=("s",), out="o", device=d), lambda d: EvalConfig(model=("m",), device=d),
                 lambda d: PrecomputeConfig(out="s", device=d)):  # fmt: skip
        assert make("cuda:3").device == "cuda:3"
        with pytest.raises(ConfigError, match="--device"):
            make("tpu")
