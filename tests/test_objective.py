"""The student's forward pass (xtd/objective.py): under autocast the losses see float32 logits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from xtd.losses import student_path
from xtd.objective import student_forward

VOCAB = 300


def _model(layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # logits of a realistic size (a few units), where bf16 rounding shows
        model.get_input_embeddings().weight.mul_(40.0)
    return model.eval()


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 17:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


def _boundary_mask() -> torch.Tensor:
    return torch.arange(VOCAB) % 7 == 0


def test_autocast_body_with_a_float32_output_layer_equals_the_float32_path() -> None:
    # No decoder layers: the body is the embedding lookup and the final RMSNorm, which
    # autocast leaves in float32. The output layer is the only matmul, so with it outside
    # autocast ℓ^S and σ^S must equal the float32 path to float32 precision.
    model, batch, bmask = _model(layers=0), _batch(), _boundary_mask()
    with torch.no_grad():
        ref_logits, _ = student_forward(model, batch)
        logits, _ = student_forward(model, batch, autocast_dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what a whole-model autocast gives
            naive = model(**batch).logits
    assert logits.dtype == torch.float32 and naive.dtype == torch.bfloat16
    ref_lp, ref_sig = student_path(ref_logits, batch["input_ids"], bmask)
    lp, sig = student_path(logits, batch["input_ids"], bmask)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(sig, ref_sig, rtol=1e-6, atol=1e-5)
    # The check can fail: a bf16 output layer moves ℓ^S far beyond float32 tolerance.
    naive_lp, _ = student_path(naive, batch["input_ids"], bmask)
    assert (naive_lp - ref_lp).abs().max() > 1e-3


def test_autocast_logits_are_the_float32_head_of_the_autocast_body() -> None:
    # With decoder layers the body itself runs in bf16; the logits must still be the
    # float32 output layer applied to its (float32) final hidden states.
    model, batch = _model(layers=2), _batch()
    with torch.no_grad():
        logits, hidden = student_forward(model, batch, autocast_dtype=torch.bfloat16, output_hidden_states=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            last = model.model(**batch, use_cache=False).last_hidden_state
        expected = last.float() @ model.lm_head.weight.float().T  # (B, S, V)
    assert logits.dtype == torch.float32 and hidden is not None and len(hidden) == 3
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-5)


def test_autocast_reaches_the_body_through_a_lora_wrapper() -> None:
    from peft import LoraConfig, get_peft_model

    model, batch = _model(layers=2), _batch()
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for module in wrapped.modules():  # non-zero adapters, so that the check sees them
            if hasattr(module, "lora_B"):
                for linear in module.lora_B.values():
                    linear.weight.normal_(0, 0.5)
        logits, _ = student_forward(wrapped, batch, autocast_dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            last = wrapped.get_base_model().model(**batch, use_cache=False).last_hidden_state
        with_adapters = last.float() @ model.lm_head.weight.float().T
        with wrapped.disable_adapter(), torch.autocast("cpu", dtype=torch.bfloat16):
            without = wrapped.get_base_model().model(**batch, use_cache=False).last_hidden_state
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, with_adapters, rtol=1e-6, atol=1e-5)
    assert (logits - without.float() @ model.lm_head.weight.float().T).abs().max() > 1e-2  # adapters used


@pytest.mark.parametrize("layers", [0, 2])
def test_without_autocast_the_forward_is_the_models_own(layers: int) -> None:
    model, batch = _model(layers=layers), _batch()
    with torch.no_grad():
        logits, hidden = student_forward(model, batch)
        torch.testing.assert_close(logits, model(**batch).logits, rtol=0, atol=0)
    assert hidden is None
