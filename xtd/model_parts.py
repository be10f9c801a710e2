"""What xtd finds inside a causal LM, structurally: its decoder blocks, its output layer as
tensors, and its final hidden states without the lm_head.

**Decoder blocks.** :func:`decoder_blocks` is the one rule for "the transformer blocks"
(LoRA puts its adapters on the linears inside them; GradMag measures gradients on the
last of them): the largest ``nn.ModuleList`` — by parameter count — of modules of one
type that hold linear layers (``nn.Linear`` or GPT-2's ``Conv1D``). That is
``model.layers`` of Llama/Qwen/Gemma/Mistral and ``transformer.h`` of GPT-2, also under a
peft wrapper; lists inside a block (MoE experts) are smaller and never chosen.

**Output layer.** The fused losses (:func:`xtd.losses.fused_output`) take the student's final hidden states
and its output layer instead of its logits, so a training forward must skip the model's
own ``lm_head`` (which would build the (B, S, V) logits). For every Hugging Face causal LM
the logits are ``lm_head(decoder(x))``, sometimes followed by a scale or a soft-cap:

* :func:`final_hidden_states` runs the decoder alone (``model.base_model``: the
  ``LlamaModel`` inside ``LlamaForCausalLM``, ``GPT2Model`` inside ``GPT2LMHeadModel``) with
  ``use_cache=False``; a model without a separate decoder falls back to
  ``logits_to_keep=1`` and the last entry of ``hidden_states``;
* :func:`output_layer` reads the head's weight (tied or untied), bias, a peft LoRA adapter
  on the head, Cohere's ``logit_scale``, Granite's ``logits_scaling`` and Gemma's
  ``final_logit_softcapping`` into an :class:`~xtd.losses.OutputLayer`;
* :func:`check_output_layer` proves, on a few tokens, that the two reproduce the model's
  own logits, so a model whose forward does something else is caught before training.

Dimension letters: ``B`` batch, ``S`` tokens, ``H`` hidden size, ``V'`` output columns.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from xtd.errors import ConfigError
from xtd.losses import OutputLayer

__all__ = ["check_output_layer", "decoder_blocks", "final_hidden_states", "last_block_parameters", "output_layer"]

logger = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, Conv1D)
"""The linear layers of a transformer: torch's, and GPT-2's ``Conv1D`` (a transposed one)."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(name, blocks)`` of the model's decoder blocks (module docstring), or None."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1 or isinstance(module[0], LINEAR_TYPES):
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def last_block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (LoRA factors included) of the last decoder block: where
    GradMag measures each loss's gradient (docs/method.md, "GradMag").

    Raises:
        ConfigError: no decoder blocks, or the last block has no trainable parameters.
    """
    found = decoder_blocks(model)
    if found is None:
        raise ConfigError(
            f"cannot find the transformer blocks of {type(model).__name__} (no nn.ModuleList of "
            "identical layers with linears); GradMag needs them — turn it off with --no-gradmag"
        )
    name, blocks = found
    params = [p for p in blocks[-1].parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            f"the last transformer block ({name}.{len(blocks) - 1}) of {type(model).__name__} has no "
            "trainable parameters; GradMag needs some — train LoRA on it or use --no-gradmag"
        )
    logger.debug("GradMag uses %d tensors of %s.%d", len(params), name, len(blocks) - 1)
    return params


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers injected in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def final_hidden_states(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
) -> Tensor:
    """(B, S, H) hidden states after the model's final norm, without running its lm_head.

    Args:
        model: a transformers causal LM, or a peft model around one.
        input_ids: (B, S) token ids.
        attention_mask: (B, S) 1 for real tokens, or None.
        **kwargs: passed to the decoder (e.g. ``position_ids``).

    Raises:
        ConfigError: the model exposes neither a decoder nor hidden states.
    """
    hf = _hf_model(model)
    decoder = getattr(hf, "base_model", hf)
    if decoder is not hf:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out[0]  # last_hidden_state
    # No separate decoder: let the model apply its head to the last position only.
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        logits_to_keep=1,
        output_hidden_states=True,
        **kwargs,
    )
    if getattr(out, "hidden_states", None) is None:
        raise ConfigError(f"{type(hf).__name__} returns no hidden states; train it with materialised logits")
    return out.hidden_states[-1]


def _lora_factors(head: nn.Module) -> tuple[nn.Module, Tensor | None, Tensor | None, float]:
    """(base linear, lora_A weight, lora_B weight, scale) of a peft LoRA layer, or of a plain one."""
    if not hasattr(head, "base_layer") or not hasattr(head, "lora_A"):
        return head, None, None, 1.0
    base = head.base_layer
    active = [name for name in getattr(head, "active_adapters", []) if name in head.lora_A]
    if getattr(head, "merged", False) or getattr(head, "disable_adapters", False) or not active:
        return base, None, None, 1.0  # merged adapters live in the base weight already
    if len(active) > 1:
        raise ConfigError(f"the output layer has {len(active)} active LoRA adapters; the fused path supports one")
    name = active[0]
    if getattr(head, "use_dora", {}).get(name, False):
        raise ConfigError("the output layer uses DoRA, which the fused path does not implement")
    dropout = head.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0 and head.training:
        raise ConfigError(
            f"the output layer's LoRA has dropout {dropout.p}; the fused path computes without dropout"
        )
    return base, head.lora_A[name].weight, head.lora_B[name].weight, float(head.scaling[name])


def output_layer(model: nn.Module, *, vocab_size: int | None = None) -> OutputLayer:
    """The model's output layer as an :class:`~xtd.losses.OutputLayer` of its own parameters.

    Args:
        model: a transformers causal LM, or a peft model around one.
        vocab_size: the real vocabulary V (the tokenizer's); default: every output column.

    Raises:
        ConfigError: no output embedding, or one the fused path cannot express.
    """
    hf = _hf_model(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is None:
        raise ConfigError(f"{type(hf).__name__} has no output embedding (lm_head)")
    base, lora_a, lora_b, lora_scale = _lora_factors(head)
    weight = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or weight is None:
        raise ConfigError(f"the output layer of {type(hf).__name__} is a {type(base).__name__}, not a linear map")
    config = getattr(hf, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text_config = get_text() if callable(get_text) else config
    logit_scale = 1.0
    if isinstance(getattr(hf, "logit_scale", None), (int, float)):  # Cohere multiplies
        logit_scale = float(hf.logit_scale)
    elif getattr(text_config, "logits_scaling", None):  # Granite divides
        logit_scale = 1.0 / float(text_config.logits_scaling)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return OutputLayer(
        weight=weight,
        vocab_size=int(vocab_size or weight.shape[0]),
        bias=base.bias,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_scale=lora_scale,
        logit_scale=logit_scale,
        softcap=float(softcap) if softcap else None,
    )


@torch.no_grad()
def check_output_layer(model: nn.Module, layer: OutputLayer, input_ids: Tensor, *, rtol: float = 1e-4) -> float:
    """Check that ``layer.logits(final_hidden_states(model, ids))`` equals ``model(ids).logits``.

    Runs in eval mode (dropout off) and restores the training flag.

    Args:
        model: the model :func:`output_layer` read.
        layer: its output layer.
        input_ids: (B, S) a few token ids.
        rtol: tolerance relative to the largest logit magnitude.

    Returns:
        The largest absolute difference.

    Raises:
        ConfigError: the difference exceeds the tolerance (the model's forward does more
            than a linear head, scale and soft-cap); train it with materialised logits.
    """
    was_training = model.training
    model.eval()
    try:
        want = model(input_ids=input_ids, use_cache=False).logits.float()
        got = layer.logits(final_hidden_states(model, input_ids)).float()
    finally:
        model.train(was_training)
    if got.shape != want.shape:
        raise ConfigError(
            f"{type(_hf_model(model)).__name__}: the output layer gives logits {tuple(got.shape)} but the "
            f"model {tuple(want.shape)}; train it with materialised logits"
        )
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    if not diff <= rtol * (1.0 + scale):
        raise ConfigError(
            f"{type(_hf_model(model)).__name__}: the fused output layer does not reproduce the model's "
            f"logits (largest difference {diff:.3g}); train it with materialised logits"
        )
    return diff
