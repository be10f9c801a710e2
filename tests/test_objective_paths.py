"""The objective's two output paths and its packed forward (xtd/objective.py).

On real micro-batches (a tiny teacher's store, real tokenizers, a random tiny Llama student):
the fused path (final hidden states + output layer in row slabs) gives the materialised
path's loss terms and gradients, and a packed forward (documents side by side in rows,
position ids restarting per document) gives the padded forward's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xtd.config import ALMSettings, DataSettings
from xtd.data_plan import StepPlan
from xtd.losses.registry import count_normalizers, loss_specs
from xtd.objective import Objective, PackedRows, choose_fused, choose_packing
from xtd.student import load_student
from xtd.tokenization import load_tokenizer
from xtd.train_data import StepDataset, TrainData

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Let there be light:",
    "def f(x):\n    return [i for i in range(x)]\n",
    "Numbers 3.14 and 42, tabs\tand  double  spaces.",
    "A",
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    from _stores import make_tiny_store

    return make_tiny_store(tmp_path_factory.mktemp("paths"), tiny_lm, TEXTS, top_k=4)


def _micro_batches(store: Path, student_dir: Path, names: tuple[str, ...]) -> list[dict[str, torch.Tensor]]:
    data = TrainData(
        stores=(str(store),),
        student_tokenizer=load_tokenizer(str(student_dir)),
        plan=StepPlan((len(TEXTS),), batch_size=6, seed=0),
        micro_batch_size=6,
        data=DataSettings(batch_size=6, max_student_length=40),
        alm=ALMSettings(),
        losses=loss_specs(names),
    )
    return StepDataset(data)[0]["micro_batches"]


def _terms_and_grads(model, objective: Objective, batch: dict[str, torch.Tensor]):
    counts = count_normalizers(batch, objective.losses, objective.alm)
    terms, _ = objective(model, batch, {n: float(max(c, 1)) for n, c in counts.items()})
    loss = sum(terms.values())
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {n: float(t.detach()) for n, t in terms.items()}, grads


@pytest.mark.parametrize(
    ("names", "same_tokenizer", "lora"),
    [(("alm", "sft"), False, 0), (("alm", "kd"), True, 0), (("alm", "sft"), False, 4)],
)
def test_fused_and_packed_paths_equal_the_materialised_padded_path(
    stores: Path, tiny_lm: Path, tiny_lm_b: Path, names: tuple[str, ...], same_tokenizer: bool, lora: int
) -> None:
    student_dir = tiny_lm if same_tokenizer else tiny_lm_b
    student = load_student(str(student_dir), lora_rank=lora, lora_alpha=float(lora or 1))
    model = student.model.double().train()
    tok = student.tokenizer
    batch = _micro_batches(stores, student_dir, names)[0]
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # some padding to remove
    specs = loss_specs(names)
    bmask = torch.as_tensor(tok.boundary_mask(), dtype=torch.bool)
    assert choose_fused(specs, model, vocab_size=tok.vocab_size, sample_ids=batch["input_ids"][:1, :8])
    assert choose_packing(model, vocab_size=tok.vocab_size)
    rows = PackedRows.of(batch["input_ids"], batch["attention_mask"])
    assert rows.input_ids.shape[0] < batch["input_ids"].shape[0]  # fewer rows than texts: texts share rows

    def objective(**kwargs) -> Objective:
        return Objective(losses=specs, alm=ALMSettings(), weights=dict.fromkeys(names, 1.0), boundary_mask=bmask,
                         **kwargs)  # fmt: skip

    want_terms, want_grads = _terms_and_grads(model, objective(), batch)
    for kwargs in ({"fused": True}, {"fused": True, "packed": True}):
        terms, grads = _terms_and_grads(model, objective(**kwargs), batch)
        assert terms.keys() == want_terms.keys()
        for name in want_terms:
            assert terms[name] == pytest.approx(want_terms[name], rel=1e-10, abs=1e-12), (kwargs, name)
        assert grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=f"{kwargs} {name}")


def test_losses_that_read_full_logits_keep_the_materialised_path(tiny_lm_b: Path) -> None:
    model = load_student(str(tiny_lm_b), lora_rank=0).model
    ids = torch.arange(1, 9)[None]
    assert not choose_fused(loss_specs(("alm", "uld")), model, vocab_size=100, sample_ids=ids)
    assert choose_fused(loss_specs(("alm", "sft", "latents")), model, vocab_size=100, sample_ids=ids)


def test_packed_rows_place_every_token_once_with_restarting_positions() -> None:
    ids = torch.arange(1, 25).reshape(4, 6)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2, [0] * 6])
    rows = PackedRows.of(ids, mask)
    assert rows.input_ids.shape == (2, 6)  # [text 0], [text 2, text 1]
    assert rows.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [13, 14, 15, 16, 7, 8]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]]
    assert sorted(rows.target.tolist()) == torch.nonzero(mask.reshape(-1)).squeeze(1).tolist()
    hidden = rows.unpack(rows.input_ids[..., None].double(), 4)[..., 0]
    assert torch.equal(hidden, torch.where(mask.bool(), ids, 0).double())
    assert PackedRows.layout_size(mask) == 12
