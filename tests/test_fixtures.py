"""The shared fixtures themselves: real tokenizers and a real (tiny) model."""

from __future__ import annotations


def test_tokenizers_differ_and_round_trip(tok_a, tok_b, corpus):
    assert len(tok_a) == 400 and len(tok_b) == 700
    for text in corpus:
        assert tok_a.decode(tok_a.encode(text, add_special_tokens=False)) == text
        assert tok_b.decode(tok_b.encode(text, add_special_tokens=False)) == text
    assert tok_a.encode("To be, or not to be") != tok_b.encode("To be, or not to be")


def test_tiny_lm_loads_and_scores(tiny_lm, tok_a):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    ids = torch.tensor([tok_a.encode("Hello world!")])
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok_a))
    assert torch.isfinite(logits).all()
