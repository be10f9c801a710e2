"""Zero-shot tokenizer transfer with an embedding-prediction hypernetwork (ZeTT) trained from a store.

Modules: ``config`` (settings), ``sampler`` (training tokenizers drawn from recent
text), ``decomposition`` (target tokens as base-token pieces), ``model`` (the hypernetwork,
saving and loading), ``step`` (what a training step predicts), ``data`` (a training step's tokenizer,
micro-batches and vocabulary), ``train`` (``xtd hypernet train``), ``apply`` (``xtd
hypernet apply``). Names are imported lazily, so ``import xtd.hypernet`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from xtd.config import HypernetApplyConfig, HypernetConfig, HypernetTrainConfig, SamplerConfig

_LAZY = {
    "TokenizerSampler": "sampler",
    "SampledTokenizer": "sampler",
    "pretokenize": "sampler",
    "DECOMPOSITION_RULES": "decomposition",
    "Decomposer": "decomposition",
    "Decomposition": "decomposition",
    "decompose": "decomposition",
    "Hypernet": "model",
    "HypernetBundle": "model",
    "build_hypernet": "model",
    "save_hypernet": "model",
    "load_hypernet": "model",
    "StepVocabulary": "step",
    "prepare_step": "step",
    "choose_vocabulary": "step",
    "HypernetStepDataset": "data",
    "HypernetTrainResult": "train",
    "PredictedLM": "train",
    "train_hypernet": "train",
    "ApplyResult": "apply",
    "apply_hypernet": "apply",
}

__all__ = ["HypernetApplyConfig", "HypernetConfig", "HypernetTrainConfig", "SamplerConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xtd.hypernet' has no attribute {name!r}")
    return getattr(importlib.import_module(f"xtd.hypernet.{module}"), name)
