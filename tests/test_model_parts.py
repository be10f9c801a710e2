"""xtd.model_parts on tiny real transformers models (Llama, GPT-2, Qwen2 with a padded
vocabulary, Gemma 2's soft-cap, Granite's logit scaling, a peft LoRA head): the decoder's
hidden states and the read-out layer reproduce the model's logits, and ALM+SFT through
the fused path gives the materialised path's loss and gradients for every parameter."""

from __future__ import annotations

import pytest
import torch
from test_losses import random_batch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from xtd.errors import ConfigError
from xtd.losses import alm_loss, fused_student_path, sft_loss, student_path
from xtd.model_parts import check_output_layer, final_hidden_states, output_layer

WIDTH = 64  # output columns of every tiny model
LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _llama(**kw):
    return LlamaForCausalLM(LlamaConfig(vocab_size=WIDTH, hidden_size=32, intermediate_size=64, **LAYERS, **kw))


def _lora_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():  # peft starts B at zero; make the head's adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return model


MODELS = {
    "llama_tied": lambda: _llama(tie_word_embeddings=True),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=WIDTH, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                               eos_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)),
    "qwen2_untied_padded": lambda: Qwen2ForCausalLM(
        Qwen2Config(vocab_size=WIDTH, hidden_size=32, intermediate_size=64, tie_word_embeddings=False, **LAYERS)
    ),
    "gemma2_softcap": lambda: Gemma2ForCausalLM(
        Gemma2Config(vocab_size=WIDTH, hidden_size=32, intermediate_size=64, head_dim=8, final_logit_softcapping=0.5,
                     **LAYERS)
    ),
    "granite_scaled": lambda: GraniteForCausalLM(
        GraniteConfig(vocab_size=WIDTH, hidden_size=32, intermediate_size=64, logits_scaling=4.0, **LAYERS)
    ),
    "llama_lora_head": _lora_head,
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().double()


@pytest.mark.parametrize("name", list(MODELS))
def test_hidden_states_and_layer_reproduce_the_logits(name):
    model = _model(name)
    ids = torch.randint(0, WIDTH, (2, 9), generator=torch.Generator().manual_seed(1))
    layer = output_layer(model)
    assert check_output_layer(model, layer, ids) < 1e-10
    model.eval()
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = final_hidden_states(model, ids)
    assert torch.allclose(hidden, out.hidden_states[-1], atol=1e-12)
    if name == "gemma2_softcap":
        assert layer.softcap == 0.5 and out.logits.abs().max().item() <= 0.5
    if name == "granite_scaled":
        assert layer.logit_scale == 0.25
    if name == "llama_lora_head":
        assert layer.lora_a is not None and layer.lora_scale == 2.0
    tied = layer.weight is model.get_input_embeddings().weight  # the parameter itself, not a copy
    assert tied == (name in ("llama_tied", "gpt2", "gemma2_softcap"))


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_alm_sft_equals_materialised_on_a_model(name):
    model = _model(name).train()
    vocab = 50 if name == "qwen2_untied_padded" else WIDTH  # 14 padding columns
    targets, _, _, _ = random_batch(3, bsz=2, extreme=False)
    bsz, seq = targets.student_chunk.shape
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen)
    attention = torch.ones(bsz, seq, dtype=torch.long)
    attention[1, seq - 1 :] = 0  # a padded row
    boundary = torch.rand(vocab, generator=gen) < 0.25
    params = [p for p in model.parameters() if p.requires_grad]

    def objective(logprob, sigma):
        alm, _ = alm_loss(logprob, sigma, targets, tau=5.0, normalizer=3)
        return alm + sft_loss(logprob, targets.student_scored, normalizer=5)

    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    want = objective(*student_path(logits, ids, boundary))
    g_want = torch.autograd.grad(want, params, allow_unused=True)

    hidden = final_hidden_states(model, ids, attention)
    got = objective(*fused_student_path(hidden, output_layer(model, vocab_size=vocab), ids, boundary,
                                        chunk_elements=vocab * 5))
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for a, b in zip(g_got, g_want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-11)


class _DoubledLogits(LlamaForCausalLM):
    """A model whose forward does more than its head: the check must catch it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_check_catches_a_forward_the_layer_does_not_express():
    torch.manual_seed(0)
    model = _DoubledLogits(LlamaConfig(vocab_size=WIDTH, hidden_size=32, intermediate_size=64, **LAYERS))
    with pytest.raises(ConfigError, match="does not reproduce the model's logits"):
        check_output_layer(model, output_layer(model), torch.randint(0, WIDTH, (1, 5)))
    assert model.training  # restored


def test_layers_the_fused_path_cannot_express():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="no output embedding"):
        output_layer(_llama().model)  # a bare decoder
    dropout = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["lm_head"], lora_dropout=0.1)).train()
    with pytest.raises(ConfigError, match="dropout"):
        output_layer(dropout)
    dropout.eval()
    assert output_layer(dropout).lora_a is not None  # no dropout at evaluation


def test_lora_and_gradmag_find_the_same_blocks_on_an_unusual_model() -> None:
    """One rule for "the decoder blocks": a shallow list of small helper layers beside the
    real blocks (where the shallowest-list rule GradMag once used picked the helpers), and
    expert lists inside each block, never win against the blocks themselves."""
    from xtd.model_parts import decoder_blocks, last_block_parameters
    from xtd.student import find_lora_targets

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Linear(16, 16)
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)) for _ in range(4))

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.adapters = nn.ModuleList(nn.Sequential(nn.Linear(16, 2)) for _ in range(6))  # shallow, small
            self.decoder = nn.Module()
            self.decoder.layers = nn.ModuleList(Block() for _ in range(3))

    model = Odd()
    name, blocks = decoder_blocks(model)
    assert name == "decoder.layers" and blocks is model.decoder.layers
    assert {id(p) for p in last_block_parameters(model)} == {id(p) for p in model.decoder.layers[2].parameters()}
    targets = find_lora_targets(model)
    assert targets and all(t.startswith("decoder.layers.") for t in targets)
