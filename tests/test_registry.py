"""The loss registry: adding a loss is one entry. A toy loss registered here is validated by
the config, read for by the data path (its top-k), refused on a store without top-k by the
input checks, counted and computed by the objective — with no other edit anywhere."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from xtd.config import TrainConfig
from xtd.errors import ConfigError, StoreFormatError
from xtd.losses.registry import LOSSES, LossData, LossInputs, LossSpec, register
from xtd.train import train

CALLS = {"count": 0, "compute": 0}


def _toy_count(data: LossData) -> int:
    CALLS["count"] += 1
    return int(data.batch["sft_mask"].sum())


def _toy(inputs: LossInputs, normalizer: float):  # noqa: ANN202
    CALLS["compute"] += 1
    # the data path read the top-k this entry asked for
    assert inputs.batch["teacher_topk_logprobs"].shape[-1] == 4
    logprob = inputs.outputs().path[0]  # (B, S) the student's log-prob of each next token
    mask = inputs.batch["sft_mask"]
    return -(logprob * mask).sum() / normalizer, {"toy_tokens": float(mask.sum())}


@pytest.fixture
def toy() -> Iterator[LossSpec]:
    spec = register(LossSpec(name="toy", summary="SFT again, to test the registry", count=_toy_count,
                             compute=_toy, needs_topk=True, needs_chunks=False))  # fmt: skip
    CALLS.update(count=0, compute=0)
    try:
        yield spec
    finally:
        LOSSES.pop("toy")


def _texts() -> list[str]:
    from xtd.assets import iter_embedded_corpus

    return [r["text"][:300] for _, r in zip(range(6), iter_embedded_corpus(), strict=False)]


def _config(store: Path, student: Path, out: Path, losses: str) -> TrainConfig:
    return TrainConfig(
        store=(str(store),), student=str(student), out=str(out), losses=losses, gradmag=False, lora_rank=0,
        lr=1e-3, warmup_steps=0, max_steps=3, batch_size=4, micro_batch_size=2, max_student_length=48,
        checkpoint_every=0,
    )  # fmt: skip


def test_an_unregistered_loss_is_refused_by_the_config() -> None:
    assert "toy" not in LOSSES
    with pytest.raises(ConfigError, match="unknown loss 'toy'"):
        TrainConfig(store=("s",), out="o", losses="alm+toy")


def test_a_toy_loss_trains_from_its_one_entry(toy: LossSpec, tiny_lm: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    from _stores import make_tiny_store

    assert TrainConfig(store=("s",), out="o", losses="alm+toy").loss_names() == ("alm", "toy")
    store = make_tiny_store(tmp_path, tiny_lm, _texts(), top_k=4)
    result = train(_config(store, tiny_lm_b, tmp_path / "run", "sft+toy"))
    assert len(result.history) == 3 and CALLS["count"] > 0 and CALLS["compute"] > 0
    for record in result.history:
        # the toy loss is SFT with SFT's count: the same term, normalised the same way
        assert math.isfinite(record["toy"]) and record["toy"] == pytest.approx(record["sft"], rel=1e-6)
        assert record["loss"] == pytest.approx(record["sft"] + record["toy"], rel=1e-6)


def test_the_input_checks_read_the_entrys_needs(toy: LossSpec, tiny_lm: Path, tiny_lm_b: Path, tmp_path: Path) -> None:
    from _stores import make_tiny_store

    store = make_tiny_store(tmp_path, tiny_lm, _texts(), top_k=0)
    with pytest.raises(StoreFormatError, match=r"--losses toy needs teacher top-k"):
        train(_config(store, tiny_lm_b, tmp_path / "run", "alm+toy"))
