"""Typed configuration: one frozen dataclass per command, holding every default and help line.

The command line is generated from these classes (:mod:`xtd.cli._options`); the Python API
takes the same objects (``xtd.train.train(TrainConfig(...))``). ``__post_init__`` validates
and names the flag the user typed. Every config round-trips through ``to_dict`` /
``from_dict`` (nested sections or flag keys) and ``from_file`` (JSON or YAML), and is saved
with every output (store attributes, ``train_config.json``, checkpoint ``config.json``).

One module per command: :mod:`~xtd.config.train` (with the :class:`ALMSettings`,
:class:`DataSettings` and :class:`OptimSettings` sections), :mod:`~xtd.config.evaluate`,
:mod:`~xtd.config.precompute`, :mod:`~xtd.config.align`, :mod:`~xtd.config.hypernet`,
:mod:`~xtd.config.maths`; the
shared machinery, dtype and device spellings in :mod:`~xtd.config._base`.
"""

from __future__ import annotations

from xtd.config._base import (
    DEVICE_PATTERN,
    DTYPE_ALIASES,
    DTYPES,
    ConfigBase,
    Leaf,
    canonical_dtype,
    device_problem,
    flag,
    option,
    section,
)
from xtd.config.align import AlignConfig
from xtd.config.evaluate import EVAL_COMBINE_RULES, EVAL_DEFAULT_HELD_OUT, EvalConfig
from xtd.config.hypernet import (
    HYPERNET_LOSSES,
    RESIDUALS,
    HypernetApplyConfig,
    HypernetConfig,
    HypernetTrainConfig,
    SamplerConfig,
)
from xtd.config.maths import MathsConfig
from xtd.config.precompute import (
    PRECOMPUTE_CHAT_TEMPLATES,
    PRECOMPUTE_ERRORS,
    PRECOMPUTE_TOPK_CODECS,
    PrecomputeConfig,
)
from xtd.config.train import (
    TRAIN_ALM_DISTANCES,
    ALMSettings,
    DataSettings,
    OptimSettings,
    TrainConfig,
    parse_eval_text,
)

__all__ = [
    "DEVICE_PATTERN",
    "DTYPES",
    "DTYPE_ALIASES",
    "EVAL_COMBINE_RULES",
    "EVAL_DEFAULT_HELD_OUT",
    "PRECOMPUTE_CHAT_TEMPLATES",
    "PRECOMPUTE_ERRORS",
    "PRECOMPUTE_TOPK_CODECS",
    "HYPERNET_LOSSES",
    "RESIDUALS",
    "TRAIN_ALM_DISTANCES",
    "ALMSettings",
    "AlignConfig",
    "ConfigBase",
    "DataSettings",
    "EvalConfig",
    "HypernetApplyConfig",
    "HypernetConfig",
    "HypernetTrainConfig",
    "Leaf",
    "MathsConfig",
    "OptimSettings",
    "PrecomputeConfig",
    "SamplerConfig",
    "TrainConfig",
    "canonical_dtype",
    "device_problem",
    "flag",
    "option",
    "parse_eval_text",
    "section",
]
